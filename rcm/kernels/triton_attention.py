"""Triton FlashAttention kernels: fused forward+JVP, forward, backward.

Layout everywhere is ``[B, L, H, D]`` with arbitrary strides (never copied); ``q: [B, Lq, H, D]``,
``k, v: [B, Lk, H, D]``; D in {64, 128, 256}; bf16 / fp16 / fp32 with fp32 accumulation.

Math (RCM_METHOD.md §6), per query row i, with tau the softmax scale:

    S = tau Q K^T,  P = softmax(S),  O = P V,  lse = log sum_j exp(S_ij)
    Sdot = tau (Qdot K^T + Q Kdot^T)
    Odot = (P * Sdot) V - diag(rowsum(P * Sdot)) O + P Vdot

Online recurrence, in the exp2 domain (c = tau log2 e), over key blocks j, one program per
(query block, batch*head); running state m (row max of c*S), l (row sum), acc (~ P V),
acc_t (~ (P*Sdot) V + P Vdot: ONE accumulator, the reference keeps two), r (~ rowsum(P*Sdot)):

    m' = max(m, rowmax(c S_j));  alpha = 2^(m - m');  p = 2^(c S_j - m')
    l = alpha l + rowsum(p);  h = p * Sdot_j;  r = alpha r + rowsum(h)
    acc = alpha acc + p V_j;  acc_t = alpha acc_t + h V_j + p Vdot_j
    epilogue:  O = acc / l;  Odot = acc_t / l - (r / l) O;  lse = (m + log2 l) ln 2

With LAZY rescaling the running max is only moved when some row's block max exceeds it by more
than 8 (log2 units), so p <= 2^8 and the alpha multiplies of the two [M, D] accumulators are
skipped on almost every block (exact either way: every term carries the same stale max).

Sequence lengths, batch, heads and strides are runtime ints; lengths and H are excluded from
specialization so a new length never recompiles. Tails are handled by masks on the last key
block only (peeled) and by masked query loads/stores.

Backward (primal output only), FlashAttention-2 style: delta = rowsum(dO * O); one kernel for
dK, dV (a program per key block, looping over query blocks); one for dQ (a program per query
block, looping over key blocks); P is recomputed from the saved lse.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter's tl.dot on bf16 returns garbage (DESIGN fact 6): upcast there.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_rows(base, row0, n_rows, s_row, s_col, BLOCK: tl.constexpr, D: tl.constexpr,
               MASK: tl.constexpr):
    """Load a [BLOCK, D] tile of rows row0.. of a [n_rows, D] matrix; rows past n_rows read 0."""
    offs_r = row0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ptrs = base + offs_r[:, None] * s_row + offs_d[None, :] * s_col
    if MASK:
        return tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_kv(src, start_n, Lk, s_row, s_col, BLOCK: tl.constexpr, D: tl.constexpr,
             MASK: tl.constexpr, TMA: tl.constexpr):
    if TMA:
        return src.load([start_n, 0])  # the copy engine zero-fills rows past Lk
    else:
        return _load_rows(src, start_n, Lk, s_row, s_col, BLOCK, D, MASK)


@triton.jit
def _sdot(q, qd, k, kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N: tl.constexpr, D: tl.constexpr,
          MASK: tl.constexpr, TMA: tl.constexpr, HAS_QD: tl.constexpr, HAS_KD: tl.constexpr,
          PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Unscaled tangent logits Qdot K^T + Q Kdot^T of one key block (one fp32 accumulator)."""
    if HAS_QD:
        sd = _mma(qd, tl.trans(k), None, PREC, UPCAST)
        if HAS_KD:
            kd = _load_kv(kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N, D, MASK, TMA)
            sd = _mma(q, tl.trans(kd), sd, PREC, UPCAST)
    else:
        kd = _load_kv(kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N, D, MASK, TMA)
        sd = _mma(q, tl.trans(kd), None, PREC, UPCAST)
    return sd


@triton.jit
def _fwd_block(
    acc, acc_t, m_i, l_i, r_i, q, qd, k_base, kd_base, v_base, vd_base, start_n, Lk,
    s_kl, s_kd, s_kdl, s_kdd, s_vl, s_vd, s_vdl, s_vdd, qk_scale, scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    HAS_QD: tl.constexpr, HAS_KD: tl.constexpr, HAS_VD: tl.constexpr,
    LAZY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    EARLY: tl.constexpr,
):
    JVP: tl.constexpr = HAS_QD or HAS_KD or HAS_VD
    HAS_SD: tl.constexpr = HAS_QD or HAS_KD
    k = _load_kv(k_base, start_n, Lk, s_kl, s_kd, BLOCK_N, D, MASK, TMA)
    s = _mma(q, tl.trans(k), None, PREC, UPCAST)  # [M, N] fp32, unscaled
    if EARLY and HAS_SD:  # issue the tangent-logit matmuls before the softmax math
        sd = _sdot(q, qd, k, kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N, D, MASK, TMA,
                   HAS_QD, HAS_KD, PREC, UPCAST)
    if MASK:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
    m_blk = tl.max(s, 1) * qk_scale
    if LAZY:
        m_new = tl.maximum(m_i, m_blk)
        if tl.max(m_new - m_i, 0) > 8.0:
            alpha = tl.math.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            if JVP:
                acc_t = acc_t * alpha[:, None]
                r_i = r_i * alpha
            m_i = m_new
        p = tl.math.exp2(s * qk_scale - m_i[:, None])
        l_i += tl.sum(p, 1)
    else:
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if JVP:
            acc_t = acc_t * alpha[:, None]
            r_i = r_i * alpha
        m_i = m_new
    v = _load_kv(v_base, start_n, Lk, s_vl, s_vd, BLOCK_N, D, MASK, TMA)
    p_lo = p.to(v.dtype)
    if HAS_SD:
        if not EARLY:
            sd = _sdot(q, qd, k, kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N, D, MASK, TMA,
                       HAS_QD, HAS_KD, PREC, UPCAST)
        # masked key columns: k = kd = 0 there, so sd = 0 and p = 0: h = 0.
        h = p * (sd * scale)
        r_i += tl.sum(h, 1)
        acc_t = _mma(h.to(v.dtype), v, acc_t, PREC, UPCAST)
    if HAS_VD:
        vd = _load_kv(vd_base, start_n, Lk, s_vdl, s_vdd, BLOCK_N, D, MASK, TMA)
        acc_t = _mma(p_lo, vd, acc_t, PREC, UPCAST)
    acc = _mma(p_lo, v, acc, PREC, UPCAST)
    return acc, acc_t, m_i, l_i, r_i


@triton.jit(do_not_specialize=["H", "Lq", "Lk"])
def _fwd_kernel(
    Q, K, V, QD, KD, VD, O, OD, LSE,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_qdb, s_qdl, s_qdh, s_qdd,
    s_kdb, s_kdl, s_kdh, s_kdd,
    s_vdb, s_vdl, s_vdh, s_vdd,
    s_ob, s_ol, s_oh,
    H, Lq, Lk, scale, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_QD: tl.constexpr, HAS_KD: tl.constexpr, HAS_VD: tl.constexpr,
    LAZY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    EARLY: tl.constexpr,
):
    JVP: tl.constexpr = HAS_QD or HAS_KD or HAS_VD
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    hh = pid_bh % H
    b64 = b.to(tl.int64)
    h64 = hh.to(tl.int64)
    start_m = pid_m * BLOCK_M

    q = _load_rows(Q + b64 * s_qb + h64 * s_qh, start_m, Lq, s_ql, s_qd, BLOCK_M, D, True)
    if HAS_QD:
        qd = _load_rows(QD + b64 * s_qdb + h64 * s_qdh, start_m, Lq, s_qdl, s_qdd, BLOCK_M, D, True)
    else:
        qd = q
    k_base = K + b64 * s_kb + h64 * s_kh
    v_base = V + b64 * s_vb + h64 * s_vh
    kd_base = KD + b64 * s_kdb + h64 * s_kdh
    vd_base = VD + b64 * s_vdb + h64 * s_vdh
    if TMA:  # per-(b, h) 2-D views [Lk, D]; unit last stride and 16-byte rows checked on host
        k_base = tl.make_tensor_descriptor(k_base, [Lk, D], [s_kl, 1], [BLOCK_N, D])
        v_base = tl.make_tensor_descriptor(v_base, [Lk, D], [s_vl, 1], [BLOCK_N, D])
        if HAS_KD:
            kd_base = tl.make_tensor_descriptor(kd_base, [Lk, D], [s_kdl, 1], [BLOCK_N, D])
        if HAS_VD:
            vd_base = tl.make_tensor_descriptor(vd_base, [Lk, D], [s_vdl, 1], [BLOCK_N, D])

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    acc_t = tl.zeros([BLOCK_M, D], tl.float32)

    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, acc_t, m_i, l_i, r_i = _fwd_block(
            acc, acc_t, m_i, l_i, r_i, q, qd, k_base, kd_base, v_base, vd_base, start_n, Lk,
            s_kl, s_kd, s_kdl, s_kdd, s_vl, s_vd, s_vdl, s_vdd, qk_scale, scale,
            D, BLOCK_N, False, HAS_QD, HAS_KD, HAS_VD, LAZY, PREC, UPCAST, TMA, EARLY)
    if n_full < Lk:
        acc, acc_t, m_i, l_i, r_i = _fwd_block(
            acc, acc_t, m_i, l_i, r_i, q, qd, k_base, kd_base, v_base, vd_base, n_full, Lk,
            s_kl, s_kd, s_kdl, s_kdd, s_vl, s_vd, s_vdl, s_vdd, qk_scale, scale,
            D, BLOCK_N, True, HAS_QD, HAS_KD, HAS_VD, LAZY, PREC, UPCAST, TMA, EARLY)

    l_rcp = 1.0 / l_i
    o = acc * l_rcp[:, None]
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Lq
    o_off = b64 * s_ob + h64 * s_oh + offs_m[:, None] * s_ol + offs_d[None, :]
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    if JVP:
        od = acc_t * l_rcp[:, None] - (r_i * l_rcp)[:, None] * o
        tl.store(OD + o_off, od.to(OD.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=["H", "Lq"])
def _bwd_delta_kernel(O, DO, DELTA, s_ob, s_ol, s_oh, s_od, s_gb, s_gl, s_gh, s_gd, H, Lq,
                      D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    o = _load_rows(O + b64 * s_ob + h64 * s_oh, start_m, Lq, s_ol, s_od, BLOCK_M, D, True)
    do = _load_rows(DO + b64 * s_gb + h64 * s_gh, start_m, Lq, s_gl, s_gd, BLOCK_M, D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit(do_not_specialize=["H", "Lq", "Lk"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_gb, s_gl, s_gh, s_gd,
    s_kgb, s_kgl, s_kgh,
    H, Lq, Lk, scale, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # dV = P^T dO;  dS = P * (dO V^T - delta);  dK = tau dS^T Q   (transposed: rows = keys)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    k = _load_rows(K + b64 * s_kb + h64 * s_kh, start_n, Lk, s_kl, s_kd, BLOCK_N, D, True)
    v = _load_rows(V + b64 * s_vb + h64 * s_vh, start_n, Lk, s_vl, s_vd, BLOCK_N, D, True)
    q_base = Q + b64 * s_qb + h64 * s_qh
    g_base = DO + b64 * s_gb + h64 * s_gh
    row_base = pid_bh.to(tl.int64) * Lq
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q = _load_rows(q_base, start_m, Lq, s_ql, s_qd, BLOCK_M, D, True)
        do = _load_rows(g_base, start_m, Lq, s_gl, s_gd, BLOCK_M, D, True)
        # rows past Lq: lse = +inf makes p = 0 there
        lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), None, PREC, UPCAST)  # [N, M]
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        dv = _mma(p_t.to(do.dtype), do, dv, PREC, UPCAST)
        dp_t = _mma(v, tl.trans(do), None, PREC, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(ds_t.to(q.dtype), q, dk, PREC, UPCAST)
    dk = dk * scale
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    off = b64 * s_kgb + h64 * s_kgh + offs_n[:, None] * s_kgl + offs_d[None, :]
    n_ok = (offs_n < Lk)[:, None]
    tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["H", "Lq", "Lk"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_gb, s_gl, s_gh, s_gd,
    s_qgb, s_qgl, s_qgh,
    H, Lq, Lk, scale, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # dQ = tau dS K,  dS = P * (dO V^T - delta)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q = _load_rows(Q + b64 * s_qb + h64 * s_qh, start_m, Lq, s_ql, s_qd, BLOCK_M, D, True)
    do = _load_rows(DO + b64 * s_gb + h64 * s_gh, start_m, Lq, s_gl, s_gd, BLOCK_M, D, True)
    row_base = pid_bh.to(tl.int64) * Lq
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b64 * s_kb + h64 * s_kh
    v_base = V + b64 * s_vb + h64 * s_vh
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        k = _load_rows(k_base, start_n, Lk, s_kl, s_kd, BLOCK_N, D, True)
        v = _load_rows(v_base, start_n, Lk, s_vl, s_vd, BLOCK_N, D, True)
        s = _mma(q, tl.trans(k), None, PREC, UPCAST)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(offs_n[None, :] < Lk, s * qk_scale, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = _mma(do, tl.trans(v), None, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, PREC, UPCAST)
    dq = dq * scale
    offs_d = tl.arange(0, D)
    off = b64 * s_qgb + h64 * s_qgh + offs_m[:, None] * s_qgl + offs_d[None, :]
    tl.store(DQ + off, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


# ----------------------------------------------------------------------------------------------
# configurations: a measured table, no autotuning (a first call compiles exactly one kernel)
# ----------------------------------------------------------------------------------------------

class Cfg(NamedTuple):
    bm: int  # query rows per program (forward / dq); query rows per inner step (dkdv)
    bn: int  # key rows per inner step (forward / dq); key rows per program (dkdv)
    warps: int
    stages: int
    lazy: bool = True  # lazy rescaling of the running max (forward kernels only)
    tma: bool = False  # K/V tiles through tensor descriptors (forward kernels only)
    early: bool = False  # JVP: issue the tangent-logit matmuls before the softmax math


# Tables keyed by (head dim, 16-bit dtype?) for sm_90 (H100/H200), from the device sweeps in
# docs/kernels.md (H100, triton 3.6). Fused JVP, bf16, D=128, BM=128 / 8 warps (two consumer
# warpgroups): BN=64, 2 stages, pointer loads: 568 TFLOP/s at 2x24x4096 (0.71x matmul) and 573 at
# 1x12x32760; the same through tensor descriptors 538 / 544; BN=32: 454; BM=64 / 4 warps: 469;
# BN=128 (1 stage, 158 spills): 258; 3 stages: over the 227 KiB of shared memory. Issuing the
# tangent-logit matmuls before the softmax (early): 578 / 596. D=64: BM=64 / 4 warps / 3 stages
# 471 (no spills), BM=128 / BN=128 475 (spills). D=256 and fp32 spill heavily: correct, slow.
_JVP_CFG_SM90 = {
    (64, True): Cfg(64, 64, 4, 3, tma=True),
    (128, True): Cfg(128, 64, 8, 2, early=True),
    (256, True): Cfg(64, 64, 8, 1),
    (64, False): Cfg(64, 32, 4, 2),
    (128, False): Cfg(32, 32, 4, 2),
    (256, False): Cfg(32, 16, 4, 1),
}
# Primal forward (used for fp32, and where SDPA refuses the inputs): BN=128, 3 stages, descriptors:
# 458 TFLOP/s at 2x24x4096x128 (cuDNN: 607, so 16-bit inputs route there, see forward()).
_FWD_CFG_SM90 = {
    (64, True): Cfg(128, 64, 8, 3, tma=True),
    (128, True): Cfg(128, 128, 8, 3, tma=True),
    (256, True): Cfg(128, 64, 8, 2),
    (64, False): Cfg(64, 32, 4, 2),
    (128, False): Cfg(32, 32, 4, 2),
    (256, False): Cfg(32, 32, 4, 1),
}
# Backward: dkdv with 128 keys a program, 64 query rows a step, 8 warps, 3 stages: 338 TFLOP/s at
# 2x24x4096x128 (SDPA flash backward: 300; 2 stages 316; 4 warps 334; 128 rows/step: 149).
_BWD_CFG_SM90 = {
    (64, True): Cfg(64, 128, 8, 3),
    (128, True): Cfg(64, 128, 8, 3),
    (256, True): Cfg(32, 64, 8, 1),
    (64, False): Cfg(32, 64, 4, 2),
    (128, False): Cfg(32, 64, 4, 1),
    (256, False): Cfg(16, 32, 4, 1),
}
# Pre-Hopper and unknown GPUs: conservative tiles (not measured: no such machine here).
_FWD_CFG_OTHER = {(d, lo): Cfg(64, 32, 4, 2) if d < 256 else Cfg(32, 32, 4, 1)
                  for d in SUPPORTED_HEAD_DIMS for lo in (True, False)}
_BWD_CFG_OTHER = {(d, lo): Cfg(32, 64, 4, 2) if d < 256 else Cfg(16, 32, 4, 1)
                  for d in SUPPORTED_HEAD_DIMS for lo in (True, False)}
# Interpreter (CPU CI): small tiles, so that small test shapes still cover several blocks.
_INTERP_CFG = Cfg(32, 16, 4, 1)

# Last compiled kernels launched (registers, spills, shared memory for the notes).
LAST: dict = {}
# Hook for the device sweep and tests: {"jvp"|"fwd"|"bwd": Cfg} overrides the tables.
OVERRIDE: dict = {}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: 3xTF32 keeps the error near fp32's (plain tf32 sits near the 5e-4 bound).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _cfg(kind: str, q: torch.Tensor) -> Cfg:
    if kind in OVERRIDE:
        return OVERRIDE[kind]
    found = _WORKING.get((kind, q.shape[-1], q.dtype, q.device))
    if found is not None:
        return found
    key = (q.shape[-1], q.dtype != torch.float32)
    if _interpreted() or q.device.type != "cuda":
        return _INTERP_CFG
    sm90 = torch.cuda.get_device_capability(q.device)[0] == 9
    if kind == "jvp":
        return (_JVP_CFG_SM90 if sm90 else _FWD_CFG_OTHER)[key]
    if kind == "fwd":
        return (_FWD_CFG_SM90 if sm90 else _FWD_CFG_OTHER)[key]
    return (_BWD_CFG_SM90 if sm90 else _BWD_CFG_OTHER)[key]


# (kind, D, dtype, device) -> the config that last compiled within the chip's resources
_WORKING: dict = {}


def _smaller(c: Cfg) -> Optional[Cfg]:
    """Next config down when one exceeds shared memory or registers (other GPUs, fp32)."""
    if c.stages > 1:
        return c._replace(stages=c.stages - 1)
    if c.bn > 16:
        return c._replace(bn=c.bn // 2)
    if c.bm > 16:
        return c._replace(bm=c.bm // 2, warps=max(4, c.warps // 2))
    return None


def _with_fallback(kind: str, q: torch.Tensor, launch):
    """launch(cfg) with the table's config; on OutOfResources walk down to one that fits."""
    cfg = _cfg(kind, q)
    while True:
        try:
            res = launch(cfg)
        except triton.runtime.errors.OutOfResources:
            cfg = _smaller(cfg) if kind not in OVERRIDE else None
            if cfg is None:
                raise
            continue
        _WORKING[(kind, q.shape[-1], q.dtype, q.device)] = cfg
        return res


_ALLOCATOR_SET = False


def _tma_ok(*ts) -> bool:
    """Tensor descriptors need unit last stride and 16-byte aligned rows and bases."""
    global _ALLOCATOR_SET
    if _interpreted() or not hasattr(tl, "make_tensor_descriptor"):
        return False
    for t in ts:
        if t is None:
            continue
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((t.stride(i) * es) % 16 for i in range(3)):
            return False
    if not _ALLOCATOR_SET:
        # device-side descriptors need scratch memory from a global allocator
        triton.set_allocator(
            lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True
    return True


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def supports(q, k, v) -> Optional[str]:
    """None if these kernels can run (q, k, v); otherwise the reason."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dim() != 4:
            return f"{name} must be 4-D [B, L, H, D], got shape {tuple(t.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not in bf16/fp16/fp32"
    if not (q.device == k.device == v.device):
        return f"devices differ: q {q.device}, k {k.device}, v {v.device}"
    if k.shape != v.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ"
    bq, lq, hq, dq = q.shape
    bk, lk, hk, dk = k.shape
    if bq != bk or hq != hk:
        return f"batch/heads differ: q {tuple(q.shape)} vs k {tuple(k.shape)}"
    if dq != dk:
        return f"head dims differ: q {dq} vs k/v {dk}"
    if dq not in SUPPORTED_HEAD_DIMS:
        return f"head dim {dq} not in {{64,128,256}}"
    if lq < 1 or lk < 1:
        return f"empty sequence (Lq={lq}, Lk={lk})"
    if bq * hq >= 2**31 or triton.cdiv(max(lq, lk), 16) >= 2**31:
        return "grid too large"
    if q.device.type != "cuda" and not _interpreted():
        return f"tensors on {q.device.type}, the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    return None


def _check(q, k, v):
    why = supports(q, k, v)
    if why is not None:
        raise ValueError(f"rcm triton attention: {why}")


def _check_like(name, t, ref):
    if t is None:
        return
    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(
            f"rcm triton attention: {name} must match its primal (shape {tuple(ref.shape)}, "
            f"{ref.dtype}, {ref.device}); got {tuple(t.shape)}, {t.dtype}, {t.device}")


def _s4(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


# ----------------------------------------------------------------------------------------------
# forward / fused forward + JVP
# ----------------------------------------------------------------------------------------------


def _fwd_launch(q, k, v, q_dot, k_dot, v_dot, scale, cfg):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    bm, bn, warps, stages, lazy, tma, early = cfg
    tma = tma and _tma_ok(k, v, k_dot, v_dot)
    jvp = q_dot is not None or k_dot is not None or v_dot is not None
    out = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype)
    out_dot = torch.empty_like(out) if jvp else out
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    qd = q_dot if q_dot is not None else q
    kd = k_dot if k_dot is not None else k
    vd = v_dot if v_dot is not None else v
    grid = (triton.cdiv(Lq, bm), B * H)
    LAST["fwd"] = _fwd_kernel[grid](
        q, k, v, qd, kd, vd, out, out_dot, lse,
        *_s4(q), *_s4(k), *_s4(v), *_s4(qd), *_s4(kd), *_s4(vd),
        out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, float(scale), float(scale) * LOG2E,
        D=D, BLOCK_M=bm, BLOCK_N=bn,
        HAS_QD=q_dot is not None, HAS_KD=k_dot is not None, HAS_VD=v_dot is not None,
        LAZY=lazy, PREC=_dot_precision(q.dtype), UPCAST=_interpreted(), TMA=tma,
        EARLY=early, num_warps=warps, num_stages=stages,
    )
    return out, (out_dot if jvp else None), lse


def forward_jvp(q, k, v, q_dot, k_dot, v_dot, scale: float):
    """Fused primal + tangent + lse in one Triton pass. Returns (out, out_dot, lse).

    A tangent given as None is zero and its matmuls are skipped. out, out_dot: fresh
    contiguous [B, Lq, H, D] in q.dtype; lse: [B, H, Lq] fp32, natural log.
    """
    _check(q, k, v)
    _check_like("q_dot", q_dot, q)
    _check_like("k_dot", k_dot, k)
    _check_like("v_dot", v_dot, v)
    if q_dot is None and k_dot is None and v_dot is None:
        out, lse = forward(q, k, v, scale)
        return out, torch.zeros_like(out), lse
    return _with_fallback(
        "jvp", q, lambda cfg: _fwd_launch(q, k, v, q_dot, k_dot, v_dot, scale, cfg))


# ---- primal forward: routing ------------------------------------------------------------------
# Measured on the H100 (torch 2.11, triton 3.6, docs/kernels.md), 2x24x4096x128 bf16, forward only:
#   SDPA cuDNN 607 TFLOP/s (0.679 ms) > our Triton forward 458 > SDPA flash 344.
# So 16-bit inputs with a unit last stride go to cuDNN (its logsumexp is the natural-log LSE,
# equal to ours within 2e-6); fp32 (no cuDNN/flash kernel), other strides, and any input cuDNN
# refuses run the Triton kernel. The optional flash-attn package (FlashAttention-2, the same
# kernels as SDPA flash, 344) would be slower than cuDNN, so it is only taken when asked for
# (RCM_ATTN_FWD=flash_attn); it is not installed on the device and was not measured here.
# RCM_ATTN_FWD / RCM_ATTN_BWD = triton | cudnn | flash | flash_attn override the measured choice.
FWD_ROUTE = os.environ.get("RCM_ATTN_FWD", "auto")
BWD_ROUTE = os.environ.get("RCM_ATTN_BWD", "auto")
_MEASURED_FWD = "cudnn"
# Backward, bf16 (bench, H100): SDPA cuDNN backward 519 / 544 TFLOP/s at 2x24x4096x128 /
# 1x12x32760x128, our Triton kernels 339 / 353, SDPA flash 304 / 317. The cuDNN backward is only
# reachable through a private ATen op; called with a 3-D LSE it crashed the process (segfault),
# which no fallback can catch, so the default stays on our Triton kernels and the cuDNN route is
# opt-in (RCM_ATTN_BWD=cudnn, token-major 16-bit inputs only). docs/kernels.md has the figures.
_MEASURED_BWD = "triton"
_REFUSED: set = set()  # (route, D, dtype) that raised once: not tried again


def _sdpa_ok(q, k, v, *more):
    if _interpreted() or q.device.type != "cuda" or q.dtype == torch.float32:
        return False
    return all(t.stride(-1) == 1 for t in (q, k, v, *more) if t is not None)


def _to_bhld(t):
    return t.transpose(1, 2)


def _fwd_cudnn(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _to_bhld(q), _to_bhld(k), _to_bhld(v), None, True, 0.0, False, False, scale=scale)
    out, lse = res[0], res[1]
    # out: [B, H, Lq, D] whose memory is [B, Lq, H, D]; lse: [B, H, Lq] (or [B, H, Lq, 1])
    return out.transpose(1, 2), lse.reshape(q.shape[0], q.shape[2], q.shape[1]).float()


def _fwd_flash(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        _to_bhld(q), _to_bhld(k), _to_bhld(v), 0.0, False, False, scale=scale)
    return res[0].transpose(1, 2), res[1].float()


def _fwd_flash_attn_pkg(q, k, v, scale):
    from flash_attn import flash_attn_func  # optional extra, [B, L, H, D] natively

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return out, lse.float()


_FWD_ROUTES = {"cudnn": _fwd_cudnn, "flash": _fwd_flash, "flash_attn": _fwd_flash_attn_pkg}


def forward_route(q) -> str:
    return FWD_ROUTE if FWD_ROUTE != "auto" else _MEASURED_FWD


def _forward_triton(q, k, v, scale):
    out, _, lse = _with_fallback(
        "fwd", q, lambda cfg: _fwd_launch(q, k, v, None, None, None, scale, cfg))
    return out, lse


def forward(q, k, v, scale: float):
    """Primal attention. Returns (out [B, Lq, H, D] in q.dtype, lse [B, H, Lq] fp32 natural log)."""
    _check(q, k, v)
    route = forward_route(q)
    key = (route, q.shape[-1], q.dtype)
    if route in _FWD_ROUTES and key not in _REFUSED and _sdpa_ok(q, k, v):
        try:
            return _FWD_ROUTES[route](q, k, v, scale)
        except (RuntimeError, ImportError):  # refused inputs / package absent: Triton instead
            _REFUSED.add(key)
    return _forward_triton(q, k, v, scale)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


def _bwd_triton(grad_out, q, k, v, out, lse, scale):
    return _with_fallback("bwd", q, lambda cfg: _bwd_launch(grad_out, q, k, v, out, lse, scale, cfg))


def _bwd_launch(grad_out, q, k, v, out, lse, scale, cfg):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    bm, bn, warps, stages = cfg[:4]
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    lse = lse.contiguous()
    dm = 64 if not _interpreted() else 32
    _bwd_delta_kernel[(triton.cdiv(Lq, dm), B * H)](
        out, grad_out, delta, *_s4(out), *_s4(grad_out), H, Lq, D=D, BLOCK_M=dm)
    dq = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Lk, H, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Lk, H, D), device=q.device, dtype=v.dtype)
    common = dict(D=D, PREC=_dot_precision(q.dtype), UPCAST=_interpreted(),
                  num_warps=warps, num_stages=stages)
    LAST["dkdv"] = _bwd_dkdv_kernel[(triton.cdiv(Lk, bn), B * H)](
        q, k, v, grad_out, lse, delta, dk, dv,
        *_s4(q), *_s4(k), *_s4(v), *_s4(grad_out), dk.stride(0), dk.stride(1), dk.stride(2),
        H, Lq, Lk, float(scale), float(scale) * LOG2E, BLOCK_M=bm, BLOCK_N=bn, **common)
    # the dq kernel walks keys: its query block plays the role of bn and vice versa
    LAST["dq"] = _bwd_dq_kernel[(triton.cdiv(Lq, bn), B * H)](
        q, k, v, grad_out, lse, delta, dq,
        *_s4(q), *_s4(k), *_s4(v), *_s4(grad_out), dq.stride(0), dq.stride(1), dq.stride(2),
        H, Lq, Lk, float(scale), float(scale) * LOG2E, BLOCK_M=bn, BLOCK_N=bm, **common)
    return dq, dk, dv


def _bwd_flash(grad_out, q, k, v, out, lse, scale):
    Lq, Lk = q.shape[1], k.shape[1]
    empty = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        _to_bhld(grad_out), _to_bhld(q), _to_bhld(k), _to_bhld(v), _to_bhld(out),
        lse.contiguous(), None, None, Lq, Lk, 0.0, False, empty, empty, scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _token_major(t):
    """[B, L, H, D] with (H, D) packed per token: the layout the cuDNN route was verified on."""
    return t.stride(-1) == 1 and t.stride(2) == t.shape[3] and t.stride(1) == t.shape[2] * t.shape[3]


def _bwd_cudnn(grad_out, q, k, v, out, lse, scale):
    """The private ATen cuDNN backward, with the arguments its autograd formula passes: the LSE as
    [B, H, Lq, 1] (what its forward returns; a 3-D LSE crashed the process on the device),
    philox seed/offset on the device, no bias and no cumulative lengths."""
    if not all(_token_major(t) for t in (grad_out, q, k, v, out)):
        raise RuntimeError("cuDNN backward route: only verified for token-major [B, L, H, D]")
    Lq, Lk = q.shape[1], k.shape[1]
    z = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _to_bhld(grad_out), _to_bhld(q), _to_bhld(k), _to_bhld(v), _to_bhld(out),
        lse.reshape(q.shape[0], q.shape[2], Lq, 1), z, z, None, None, None, Lq, Lk, 0.0, False,
        scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


_BWD_ROUTES = {"cudnn": _bwd_cudnn, "flash": lambda *a: _bwd_flash(*a)}


def backward_route(q) -> str:
    return BWD_ROUTE if BWD_ROUTE != "auto" else _MEASURED_BWD


def backward(grad_out, q, k, v, out, lse, scale: float):
    """Gradients of the primal output: (dq, dk, dv) in the inputs' dtypes and [B, L, H, D]."""
    _check(q, k, v)
    _check_like("grad_out", grad_out, out)
    if out.shape != q.shape:
        raise ValueError(f"rcm triton attention: out {tuple(out.shape)} must have q's shape")
    route = backward_route(q)
    key = ("bwd-" + route, q.shape[-1], q.dtype)
    if route in _BWD_ROUTES and key not in _REFUSED and _sdpa_ok(q, k, v, grad_out, out):
        try:
            res = _BWD_ROUTES[route](grad_out, q, k, v, out, lse.contiguous(), scale)
            LAST["bwd_route"] = route
            return res
        except RuntimeError:  # inputs the library refuses: Triton instead
            _REFUSED.add(key)
    LAST["bwd_route"] = "triton"
    return _bwd_triton(grad_out, q, k, v, out, lse, scale)
