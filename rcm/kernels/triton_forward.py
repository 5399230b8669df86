"""Triton kernel: attention forward, fused with its JVP (docs/method.md §6).

Per query row i, with tau the softmax scale and tangents written with a dot:

    S = tau Q K^T,   P = softmax(S),   O = P V,   lse = log sum_j exp(S_ij)
    Sdot = tau (Qdot K^T + Q Kdot^T)
    Odot = (P * Sdot) V - diag(rowsum(P * Sdot)) O + P Vdot

One program per (query block, batch*head) walks the key blocks j with an online softmax in the
exp2 domain (c = tau log2 e). Running state: m (row max of c S), l (row sum), acc (~ P V),
acc_t (~ (P * Sdot) V + P Vdot: ONE accumulator for both tangent terms) and r (~ rowsum(P * Sdot)):

    m' = max(m, rowmax(c S_j));  alpha = 2^(m - m');  p = 2^(c S_j - m')
    l = alpha l + rowsum(p);  h = p * Sdot_j;  r = alpha r + rowsum(h)
    acc = alpha acc + p V_j;  acc_t = alpha acc_t + h V_j + p Vdot_j
    epilogue:  O = acc / l;  Odot = acc_t / l - (r / l) O;  lse = (m + log2 l) ln 2

Every term carries the same stale max, so the state may be rescaled late. With LAZY the max only
moves when some row's block max exceeds it by more than 8 (log2 units): p <= 2^8, and the alpha
multiplies of the two [M, D] accumulators are skipped on almost every block.

With no tangent (HAS_QD = HAS_KD = HAS_VD = False) the same kernel is the primal forward.
Lengths and H are runtime ints excluded from specialization (a new length never recompiles); the
last, partial key block is peeled and masked; query rows are masked on load and store.
"""
import triton
import triton.language as tl

from .triton_common import load_kv, load_rows, mma


@triton.jit
def _tangent_logits(q, qd, k, kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N: tl.constexpr,
                    D: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr, HAS_QD: tl.constexpr,
                    HAS_KD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Unscaled Qdot K^T + Q Kdot^T of one key block, in one fp32 accumulator."""
    if HAS_QD:
        sd = mma(qd, tl.trans(k), None, PREC, UPCAST)
        if HAS_KD:
            kd = load_kv(kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N, D, MASK, TMA)
            sd = mma(q, tl.trans(kd), sd, PREC, UPCAST)
    else:
        kd = load_kv(kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N, D, MASK, TMA)
        sd = mma(q, tl.trans(kd), None, PREC, UPCAST)
    return sd


@triton.jit
def _key_block(
    acc, acc_t, m_i, l_i, r_i, q, qd, k_base, kd_base, v_base, vd_base, start_n, Lk,
    s_kl, s_kd, s_kdl, s_kdd, s_vl, s_vd, s_vdl, s_vdd, qk_scale, scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    HAS_QD: tl.constexpr, HAS_KD: tl.constexpr, HAS_VD: tl.constexpr,
    LAZY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    EARLY: tl.constexpr,
):
    """One step of the recurrence above over the key block starting at start_n."""
    JVP: tl.constexpr = HAS_QD or HAS_KD or HAS_VD
    HAS_SD: tl.constexpr = HAS_QD or HAS_KD
    k = load_kv(k_base, start_n, Lk, s_kl, s_kd, BLOCK_N, D, MASK, TMA)
    s = mma(q, tl.trans(k), None, PREC, UPCAST)  # [M, N] fp32, unscaled
    if EARLY and HAS_SD:  # issue the tangent-logit matmuls before the softmax math
        sd = _tangent_logits(q, qd, k, kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N, D, MASK, TMA,
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
    v = load_kv(v_base, start_n, Lk, s_vl, s_vd, BLOCK_N, D, MASK, TMA)
    p_lo = p.to(v.dtype)
    if HAS_SD:
        if not EARLY:
            sd = _tangent_logits(q, qd, k, kd_base, start_n, Lk, s_kdl, s_kdd, BLOCK_N, D, MASK,
                                 TMA, HAS_QD, HAS_KD, PREC, UPCAST)
        # masked key columns: k = kd = 0 there, so sd = 0 and p = 0: h = 0.
        h = p * (sd * scale)
        r_i += tl.sum(h, 1)
        acc_t = mma(h.to(v.dtype), v, acc_t, PREC, UPCAST)
    if HAS_VD:
        vd = load_kv(vd_base, start_n, Lk, s_vdl, s_vdd, BLOCK_N, D, MASK, TMA)
        acc_t = mma(p_lo, vd, acc_t, PREC, UPCAST)
    acc = mma(p_lo, v, acc, PREC, UPCAST)
    return acc, acc_t, m_i, l_i, r_i


@triton.jit(do_not_specialize=["H", "Lq", "Lk"])
def forward_jvp_kernel(
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
    EARLY: tl.constexpr, WS: tl.constexpr,
):
    """O, Odot (when a tangent is given) and lse of one query block of one (batch, head)."""
    JVP: tl.constexpr = HAS_QD or HAS_KD or HAS_VD
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M

    q = load_rows(Q + b64 * s_qb + h64 * s_qh, start_m, Lq, s_ql, s_qd, BLOCK_M, D, True)
    if HAS_QD:
        qd = load_rows(QD + b64 * s_qdb + h64 * s_qdh, start_m, Lq, s_qdl, s_qdd, BLOCK_M, D, True)
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
    for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        acc, acc_t, m_i, l_i, r_i = _key_block(
            acc, acc_t, m_i, l_i, r_i, q, qd, k_base, kd_base, v_base, vd_base, start_n, Lk,
            s_kl, s_kd, s_kdl, s_kdd, s_vl, s_vd, s_vdl, s_vdd, qk_scale, scale,
            D, BLOCK_N, False, HAS_QD, HAS_KD, HAS_VD, LAZY, PREC, UPCAST, TMA, EARLY)
    if n_full < Lk:
        acc, acc_t, m_i, l_i, r_i = _key_block(
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
