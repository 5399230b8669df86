"""The Triton backend of `rcm.kernels.ops`: launches, tile configurations, input checks.

The kernels live by role: `triton_forward.py` (forward fused with its JVP, the primal forward is
the same kernel with the tangent work compiled out), `triton_backward.py` (delta, dK/dV, dQ),
`triton_common.py` (tile loads, the matmul wrapper). Each file states its math at the top.

Tuning is an argument: every entry point takes `cfg` (a `Cfg`); None picks the measured table
below for the GPU (no autotuning, so a first call compiles exactly one kernel). When a table
config exceeds the chip's shared memory or registers (other GPUs, fp32) the launch walks down to
smaller tiles and remembers what fitted; an explicit `cfg` is launched as given or raises.

Layout everywhere is [B, L, H, D] with arbitrary strides (never copied); bf16 / fp16 / fp32 with
fp32 accumulation; D in {64, 128, 256}. Outputs are fresh contiguous tensors.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .triton_backward import delta_kernel, dkdv_kernel, dq_kernel
from .triton_common import LOG2E, interpreted
from .triton_forward import forward_jvp_kernel

from .ops import TRITON_HEAD_DIMS as SUPPORTED_HEAD_DIMS  # noqa: E402  (one list, importable without triton)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Cfg(NamedTuple):
    bm: int  # query rows per program (forward / dq); query rows per inner step (dkdv)
    bn: int  # key rows per inner step (forward / dq); key rows per program (dkdv)
    warps: int
    stages: int
    lazy: bool = True  # lazy rescaling of the running max (forward kernel only)
    tma: bool = False  # K/V tiles through tensor descriptors (forward kernel only)
    early: bool = False  # JVP: issue the tangent-logit matmuls before the softmax math
    ws: bool = False  # warp-specialize the key loop (triton's tl.range(warp_specialize=...))


# Tables keyed by (head dim, 16-bit dtype?) for sm_90 (H100/H200), from the device sweeps in
# docs/kernels.md (triton 3.6). Fused JVP, bf16, D=128: BM=128 / 8 warps (two consumer
# warpgroups), BN=64, 2 stages, pointer loads, tangent logits issued early: 578-596 TFLOP/s on the
# H100; BN=32: 454; BM=64 / 4 warps: 469; BN=128 (1 stage, 158 spills): 258; 3 stages: over the
# 227 KiB of shared memory. H200 sweep (docs/kernels.md): warp specialization, descriptors, eager
# rescaling and BM=256 / 16 warps all lose at D=128. D=64: BM=128 / BN=128 / 8 warps / 2 stages 500
# TFLOP/s on the H200 (8 spills), BM=64 / BN=64 / 4 warps / 3 stages through descriptors 467.
# D=256 and fp32 spill heavily: correct, slow.
JVP_SM90 = {
    (64, True): Cfg(128, 128, 8, 2, early=True),
    (128, True): Cfg(128, 64, 8, 2, early=True),
    (256, True): Cfg(64, 64, 8, 1),
    (64, False): Cfg(64, 32, 4, 2),
    (128, False): Cfg(32, 32, 4, 2),
    (256, False): Cfg(32, 16, 4, 1),
}
# Primal forward (the public op routes 16-bit primal work to SDPA on CUDA; this kernel serves
# fp32, backend='triton' and the grad-mode JVP path): BN=128, 3 stages, descriptors: 458 TFLOP/s
# at 2x24x4096x128 on the H100.
FWD_SM90 = {
    (64, True): Cfg(128, 64, 8, 3, tma=True),
    (128, True): Cfg(128, 128, 8, 3, tma=True),
    (256, True): Cfg(128, 64, 8, 2),
    (64, False): Cfg(64, 32, 4, 2),
    (128, False): Cfg(32, 32, 4, 2),
    (256, False): Cfg(32, 32, 4, 1),
}
# Backward: dkdv with 128 keys a program, 64 query rows a step, 8 warps, 3 stages: 338 TFLOP/s at
# 2x24x4096x128 on the H100 (2 stages 316; 4 warps 334; 128 rows/step: 149).
BWD_SM90 = {
    (64, True): Cfg(64, 128, 8, 3),
    (128, True): Cfg(64, 128, 8, 3),
    (256, True): Cfg(32, 64, 8, 1),
    (64, False): Cfg(32, 64, 4, 2),
    (128, False): Cfg(32, 64, 4, 1),
    (256, False): Cfg(16, 32, 4, 1),
}
# Pre-Hopper and unknown GPUs: conservative tiles (not measured: no such machine here).
FWD_OTHER = {(d, lo): Cfg(64, 32, 4, 2) if d < 256 else Cfg(32, 32, 4, 1)
             for d in SUPPORTED_HEAD_DIMS for lo in (True, False)}
BWD_OTHER = {(d, lo): Cfg(32, 64, 4, 2) if d < 256 else Cfg(16, 32, 4, 1)
             for d in SUPPORTED_HEAD_DIMS for lo in (True, False)}
# Interpreter (CPU CI): small tiles, so that small test shapes still cover several blocks.
INTERPRETER_CFG = Cfg(32, 16, 4, 1)


def default_config(kind: str, q: torch.Tensor) -> Cfg:
    """The table's config for kind 'jvp' | 'fwd' | 'bwd' and q's head dim, dtype and device."""
    if kind not in ("jvp", "fwd", "bwd"):
        raise ValueError(f"kind must be 'jvp', 'fwd' or 'bwd', got {kind!r}")
    if interpreted() or q.device.type != "cuda":
        return INTERPRETER_CFG
    key = (q.shape[-1], q.dtype != torch.float32)
    sm90 = torch.cuda.get_device_capability(q.device)[0] == 9
    table = {"jvp": (JVP_SM90, FWD_OTHER), "fwd": (FWD_SM90, FWD_OTHER),
             "bwd": (BWD_SM90, BWD_OTHER)}[kind]
    return table[0 if sm90 else 1][key]


def _smaller(c: Cfg) -> Optional[Cfg]:
    """Next config down when one exceeds shared memory or registers."""
    if c.stages > 1:
        return c._replace(stages=c.stages - 1)
    if c.bn > 16:
        return c._replace(bn=c.bn // 2)
    if c.bm > 16:
        return c._replace(bm=c.bm // 2, warps=max(4, c.warps // 2))
    return None


# (kind, D, dtype, device) -> the table config walked down to one that compiled on this chip:
# a cache, so that the walk (compiles that fail) happens once per process.
_FITTED: dict = {}


def _launch_fitted(kind: str, q: torch.Tensor, cfg: Optional[Cfg], launch):
    """launch(cfg); with cfg None, the table's config, walked down on OutOfResources."""
    if cfg is not None:
        return launch(cfg)
    key = (kind, q.shape[-1], q.dtype, q.device)
    cfg = _FITTED.get(key) or default_config(kind, q)
    while True:
        try:
            res = launch(cfg)
        except triton.runtime.errors.OutOfResources:
            cfg = _smaller(cfg)
            if cfg is None:
                raise
            continue
        _FITTED[key] = cfg
        return res


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: 3xTF32 keeps the error near fp32's (plain tf32 sits near the 5e-4 bound).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _tma_usable(*ts) -> bool:
    """Tensor descriptors need unit last stride and 16-byte aligned rows and bases."""
    if interpreted() or not hasattr(tl, "make_tensor_descriptor"):
        return False
    for t in ts:
        if t is None:
            continue
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((t.stride(i) * es) % 16 for i in range(3)):
            return False
    # device-side descriptors take scratch memory from Triton's global allocator (idempotent)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    return True


# ----------------------------------------------------------------------------------------------
# checks


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
    if q.device.type != "cuda" and not interpreted():
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
# launches (return the compiled kernels too: registers, spills and shared memory for the sweep)


def launch_forward(q, k, v, q_dot, k_dot, v_dot, scale: float, cfg: Cfg):
    """One forward(+JVP) launch with exactly `cfg`: ((out, out_dot | None, lse), compiled kernel)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    tma = cfg.tma and _tma_usable(k, v, k_dot, v_dot)
    jvp = q_dot is not None or k_dot is not None or v_dot is not None
    out = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype)
    out_dot = torch.empty_like(out) if jvp else out
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    qd = q_dot if q_dot is not None else q
    kd = k_dot if k_dot is not None else k
    vd = v_dot if v_dot is not None else v
    grid = (triton.cdiv(Lq, cfg.bm), B * H)
    kernel = forward_jvp_kernel[grid](
        q, k, v, qd, kd, vd, out, out_dot, lse,
        *_s4(q), *_s4(k), *_s4(v), *_s4(qd), *_s4(kd), *_s4(vd),
        out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, float(scale), float(scale) * LOG2E,
        D=D, BLOCK_M=cfg.bm, BLOCK_N=cfg.bn,
        HAS_QD=q_dot is not None, HAS_KD=k_dot is not None, HAS_VD=v_dot is not None,
        LAZY=cfg.lazy, PREC=_dot_precision(q.dtype), UPCAST=interpreted(), TMA=tma,
        EARLY=cfg.early, WS=cfg.ws, num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return (out, (out_dot if jvp else None), lse), kernel


def launch_backward(grad_out, q, k, v, out, lse, scale: float, cfg: Cfg):
    """The three backward launches with exactly `cfg`: ((dq, dk, dv), (dkdv kernel, dq kernel))."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    lse = lse.contiguous()
    dm = 32 if interpreted() else 64
    delta_kernel[(triton.cdiv(Lq, dm), B * H)](
        out, grad_out, delta, *_s4(out), *_s4(grad_out), H, Lq, D=D, BLOCK_M=dm)
    dq = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Lk, H, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Lk, H, D), device=q.device, dtype=v.dtype)
    common = dict(D=D, PREC=_dot_precision(q.dtype), UPCAST=interpreted(),
                  num_warps=cfg.warps, num_stages=cfg.stages)
    dkdv = dkdv_kernel[(triton.cdiv(Lk, cfg.bn), B * H)](
        q, k, v, grad_out, lse, delta, dk, dv,
        *_s4(q), *_s4(k), *_s4(v), *_s4(grad_out), dk.stride(0), dk.stride(1), dk.stride(2),
        H, Lq, Lk, float(scale), float(scale) * LOG2E, BLOCK_M=cfg.bm, BLOCK_N=cfg.bn, **common)
    # the dq kernel walks keys: its query block plays the role of bn and vice versa
    dqk = dq_kernel[(triton.cdiv(Lq, cfg.bn), B * H)](
        q, k, v, grad_out, lse, delta, dq,
        *_s4(q), *_s4(k), *_s4(v), *_s4(grad_out), dq.stride(0), dq.stride(1), dq.stride(2),
        H, Lq, Lk, float(scale), float(scale) * LOG2E, BLOCK_M=cfg.bn, BLOCK_N=cfg.bm, **common)
    return (dq, dk, dv), (dkdv, dqk)


# ----------------------------------------------------------------------------------------------
# the backend contract of rcm.kernels.ops


def forward_jvp(q, k, v, q_dot, k_dot, v_dot, scale: float, cfg: Optional[Cfg] = None):
    """Fused primal + tangent + lse in one pass. Returns (out, out_dot, lse).

    A tangent given as None is zero and its matmuls are skipped. out, out_dot: fresh contiguous
    [B, Lq, H, D] in q.dtype; lse: [B, H, Lq] fp32, natural log.
    """
    _check(q, k, v)
    _check_like("q_dot", q_dot, q)
    _check_like("k_dot", k_dot, k)
    _check_like("v_dot", v_dot, v)
    if q_dot is None and k_dot is None and v_dot is None:
        out, lse = forward(q, k, v, scale)
        return out, torch.zeros_like(out), lse
    return _launch_fitted(
        "jvp", q, cfg, lambda c: launch_forward(q, k, v, q_dot, k_dot, v_dot, scale, c)[0])


def forward(q, k, v, scale: float, cfg: Optional[Cfg] = None):
    """Primal attention. Returns (out [B, Lq, H, D] in q.dtype, lse [B, H, Lq] fp32 natural log)."""
    _check(q, k, v)
    out, _, lse = _launch_fitted(
        "fwd", q, cfg, lambda c: launch_forward(q, k, v, None, None, None, scale, c)[0])
    return out, lse


def backward(grad_out, q, k, v, out, lse, scale: float, cfg: Optional[Cfg] = None):
    """Gradients of the primal output: (dq, dk, dv) in the inputs' dtypes and [B, L, H, D]."""
    _check(q, k, v)
    _check_like("grad_out", grad_out, out)
    if out.shape != q.shape:
        raise ValueError(f"rcm triton attention: out {tuple(out.shape)} must have q's shape")
    return _launch_fitted(
        "bwd", q, cfg, lambda c: launch_backward(grad_out, q, k, v, out, lse, scale, c)[0])
