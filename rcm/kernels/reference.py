"""Pure-PyTorch attention backend: chunked online softmax, fp32 accumulation, O(L) extra memory.

Runs anywhere (CPU, any CUDA GPU) and is the correctness reference for the Triton kernels. Layout is
[B, L, H, D] throughout; internally we work on [B, H, L, D] *views* (no copies of the inputs).

Math (i: query rows, j: keys, tau: scale):
    S = tau Q K^T,  P = softmax_j(S),  O = P V,  lse_i = log sum_j exp(S_ij)
    S' = tau (Q' K^T + Q K'^T)
    O' = (P * S') V - diag(rowsum(P * S')) O + P V'
    backward:  D_i = rowsum(dO * O),  dS = P * (dO V^T - D),  dQ = tau dS K,  dK = tau dS^T Q,  dV = P^T dO
Queries are processed in chunks of `_QUERY_CHUNK` rows and keys in chunks of `_KEY_CHUNK` columns, so the
largest temporary is [B, H, _QUERY_CHUNK, _KEY_CHUNK] whatever the sequence lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

_QUERY_CHUNK = 512
_KEY_CHUNK = 512


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads_first(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # [B, L, H, D] -> [B, H, L, D] view, upcast to the accumulation dtype.
    return None if x is None else x.transpose(1, 2).to(dtype)


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, _, lse = forward_jvp(q, k, v, None, None, None, scale)
    return out, lse


def forward_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_dot: Tensor | None,
    k_dot: Tensor | None,
    v_dot: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Primal output, tangent output (None if all tangents are None) and lse [B, H, Lq] (fp32)."""
    acc = _acc_dtype(q)
    B, Lq, H, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    Lk = k.shape[1]
    with_tangent = q_dot is not None or k_dot is not None or v_dot is not None
    kh, vh = _heads_first(k, acc), _heads_first(v, acc)
    kdh, vdh = _heads_first(k_dot, acc), _heads_first(v_dot, acc)
    out = torch.empty(B, H, Lq, Dv, dtype=acc, device=q.device)
    out_dot = torch.empty_like(out) if with_tangent else None
    lse = torch.empty(B, H, Lq, dtype=acc, device=q.device)

    for q0 in range(0, Lq, _QUERY_CHUNK):
        q1 = min(q0 + _QUERY_CHUNK, Lq)
        qc = _heads_first(q[:, q0:q1], acc)
        qdc = _heads_first(None if q_dot is None else q_dot[:, q0:q1], acc)
        m = torch.full((B, H, q1 - q0, 1), -torch.inf, dtype=acc, device=q.device)
        denom = torch.zeros_like(m)
        o_acc = torch.zeros(B, H, q1 - q0, Dv, dtype=acc, device=q.device)
        if with_tangent:
            a_acc = torch.zeros_like(o_acc)  # sum_j p_ij (S'_ij v_j + v'_j)
            r_acc = torch.zeros_like(m)  # sum_j p_ij S'_ij
        for k0 in range(0, Lk, _KEY_CHUNK):
            k1 = min(k0 + _KEY_CHUNK, Lk)
            kc, vc = kh[:, :, k0:k1], vh[:, :, k0:k1]
            s = (qc @ kc.transpose(-1, -2)) * scale
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            alpha = torch.exp(m - m_new)
            p = torch.exp(s - m_new)
            denom = denom * alpha + p.sum(-1, keepdim=True)
            o_acc = o_acc * alpha + p @ vc
            if with_tangent:
                s_dot = torch.zeros_like(s)
                if qdc is not None:
                    s_dot = s_dot + qdc @ kc.transpose(-1, -2)
                if kdh is not None:
                    s_dot = s_dot + qc @ kdh[:, :, k0:k1].transpose(-1, -2)
                h = p * (s_dot * scale)
                a_acc = a_acc * alpha + h @ vc
                r_acc = r_acc * alpha + h.sum(-1, keepdim=True)
                if vdh is not None:
                    a_acc = a_acc + p @ vdh[:, :, k0:k1]
            m = m_new
        o = o_acc / denom
        out[:, :, q0:q1] = o
        lse[:, :, q0:q1] = (m + denom.log()).squeeze(-1)
        if with_tangent:
            out_dot[:, :, q0:q1] = a_acc / denom - (r_acc / denom) * o

    out = out.transpose(1, 2).to(q.dtype)
    out_dot = None if out_dot is None else out_dot.transpose(1, 2).to(q.dtype)
    return out, out_dot, lse.float() if acc == torch.float32 else lse


def backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    acc = _acc_dtype(q)
    Lq, Lk = q.shape[1], k.shape[1]
    qh, kh, vh = (_heads_first(x, acc) for x in (q, k, v))
    doh, oh = _heads_first(grad_out, acc), _heads_first(out, acc)
    lse = lse.to(acc).unsqueeze(-1)
    delta = (doh * oh).sum(-1, keepdim=True)  # D_i = rowsum(dO * O)
    dq = torch.zeros_like(qh)
    dk = torch.zeros_like(kh)
    dv = torch.zeros_like(vh)
    for q0 in range(0, Lq, _QUERY_CHUNK):
        q1 = min(q0 + _QUERY_CHUNK, Lq)
        qc, doc = qh[:, :, q0:q1], doh[:, :, q0:q1]
        for k0 in range(0, Lk, _KEY_CHUNK):
            k1 = min(k0 + _KEY_CHUNK, Lk)
            kc, vc = kh[:, :, k0:k1], vh[:, :, k0:k1]
            p = torch.exp((qc @ kc.transpose(-1, -2)) * scale - lse[:, :, q0:q1])
            dv[:, :, k0:k1] += p.transpose(-1, -2) @ doc
            ds = p * (doc @ vc.transpose(-1, -2) - delta[:, :, q0:q1])
            dq[:, :, q0:q1] += (ds @ kc) * scale
            dk[:, :, k0:k1] += (ds.transpose(-1, -2) @ qc) * scale
    return tuple(g.transpose(1, 2).to(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))


def supports(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    return None  # any device, any validated shape/dtype
