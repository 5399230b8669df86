"""Triton kernels: attention backward for the primal output (FlashAttention-2 style).

With tau the softmax scale, P = softmax(tau Q K^T) recomputed from the saved lse
(P_ij = exp(tau q_i . k_j - lse_i)) and dO the output cotangent:

    delta_i = rowsum(dO * O)_i                     (= rowsum(P * dP)_i)
    dP = dO V^T,   dS = P * (dP - delta)
    dV = P^T dO,   dK = tau dS^T Q,   dQ = tau dS K

Three launches: delta (one pass over O and dO); dK, dV with one program per key block looping
over the query blocks (the transposed products, rows = keys); dQ with one program per query block
looping over the key blocks. Rows past Lq get lse = +inf in the dK/dV loop (so P = 0 there), keys
past Lk get logits -inf in the dQ loop; all exponentials are taken as exp2 of log2e-scaled values.
"""
import triton
import triton.language as tl

from .triton_common import load_rows, mma


@triton.jit(do_not_specialize=["H", "Lq"])
def delta_kernel(O, DO, DELTA, s_ob, s_ol, s_oh, s_od, s_gb, s_gl, s_gh, s_gd, H, Lq,
                 D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) for one query block of one (batch, head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    o = load_rows(O + b64 * s_ob + h64 * s_oh, start_m, Lq, s_ol, s_od, BLOCK_M, D, True)
    do = load_rows(DO + b64 * s_gb + h64 * s_gh, start_m, Lq, s_gl, s_gd, BLOCK_M, D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit(do_not_specialize=["H", "Lq", "Lk"])
def dkdv_kernel(
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
    """dV = P^T dO and dK = tau dS^T Q for one key block (P^T, dS^T computed as [N, M] tiles)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    k = load_rows(K + b64 * s_kb + h64 * s_kh, start_n, Lk, s_kl, s_kd, BLOCK_N, D, True)
    v = load_rows(V + b64 * s_vb + h64 * s_vh, start_n, Lk, s_vl, s_vd, BLOCK_N, D, True)
    q_base = Q + b64 * s_qb + h64 * s_qh
    g_base = DO + b64 * s_gb + h64 * s_gh
    row_base = pid_bh.to(tl.int64) * Lq
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q = load_rows(q_base, start_m, Lq, s_ql, s_qd, BLOCK_M, D, True)
        do = load_rows(g_base, start_m, Lq, s_gl, s_gd, BLOCK_M, D, True)
        lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        s_t = mma(k, tl.trans(q), None, PREC, UPCAST)  # [N, M]
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        dv = mma(p_t.to(do.dtype), do, dv, PREC, UPCAST)
        dp_t = mma(v, tl.trans(do), None, PREC, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(ds_t.to(q.dtype), q, dk, PREC, UPCAST)
    dk = dk * scale
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    off = b64 * s_kgb + h64 * s_kgh + offs_n[:, None] * s_kgl + offs_d[None, :]
    n_ok = (offs_n < Lk)[:, None]
    tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["H", "Lq", "Lk"])
def dq_kernel(
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
    """dQ = tau dS K for one query block."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q = load_rows(Q + b64 * s_qb + h64 * s_qh, start_m, Lq, s_ql, s_qd, BLOCK_M, D, True)
    do = load_rows(DO + b64 * s_gb + h64 * s_gh, start_m, Lq, s_gl, s_gd, BLOCK_M, D, True)
    row_base = pid_bh.to(tl.int64) * Lq
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b64 * s_kb + h64 * s_kh
    v_base = V + b64 * s_vb + h64 * s_vh
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        k = load_rows(k_base, start_n, Lk, s_kl, s_kd, BLOCK_N, D, True)
        v = load_rows(v_base, start_n, Lk, s_vl, s_vd, BLOCK_N, D, True)
        s = mma(q, tl.trans(k), None, PREC, UPCAST)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(offs_n[None, :] < Lk, s * qk_scale, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = mma(do, tl.trans(v), None, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, dq, PREC, UPCAST)
    dq = dq * scale
    offs_d = tl.arange(0, D)
    off = b64 * s_qgb + h64 * s_qgh + offs_m[:, None] * s_qgl + offs_d[None, :]
    tl.store(DQ + off, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])
