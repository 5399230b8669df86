"""Shared Triton helpers of the attention kernels: tile loads and the matmul wrapper.

Layout everywhere is [B, L, H, D] with arbitrary strides (never copied). A kernel addresses one
(batch, head) slice as an [L, D] matrix with row stride s_row and column stride s_col; rows past
the sequence end read as zero, which keeps masked key columns out of every product:

    q k^T over a zero row of k gives a zero logit, masked to -inf before the softmax;
    a zero row of v (or of its tangent) adds nothing to P V.

Dots accumulate in fp32. The CPU interpreter's tl.dot on bf16 returns garbage (docs/design.md,
platform fact 6), so interpreted runs upcast both operands to fp32 (UPCAST).
"""
import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreted() -> bool:
    """True when Triton runs kernels in its numpy interpreter (CPU CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32 (acc None: a fresh product)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def load_rows(base, row0, n_rows, s_row, s_col, BLOCK: tl.constexpr, D: tl.constexpr,
              MASK: tl.constexpr):
    """The [BLOCK, D] tile of rows row0.. of an [n_rows, D] matrix; rows past n_rows read 0."""
    offs_r = row0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ptrs = base + offs_r[:, None] * s_row + offs_d[None, :] * s_col
    if MASK:
        return tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def load_kv(src, start_n, Lk, s_row, s_col, BLOCK: tl.constexpr, D: tl.constexpr,
            MASK: tl.constexpr, TMA: tl.constexpr):
    """A key-side tile, through a tensor descriptor (TMA) or masked pointer loads."""
    if TMA:
        return src.load([start_n, 0])  # the copy engine zero-fills rows past Lk
    else:
        return load_rows(src, start_n, Lk, s_row, s_col, BLOCK, D, MASK)
