"""Attention ops. Placeholder (plain math) until the op registration lands; same signature."""
import torch


def attention(q, k, v, *, scale=None, backend=None):
    """softmax(scale * q k^T) v over layout [B, L, H, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)
