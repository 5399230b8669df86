"""The layers of the Wan DiT (``rcm.models.wan``): patchify, sinusoid, 3-D RoPE, norms, attentions,
the block, the head and the CLIP image projection. Plain modules; precision rules as in ``wan``'s doc.

Time conditioning comes per sample (``e [B, 6, dim]``, Wan2.1 and Wan2.2 A14B) or per token
(``e [B, L, 6, dim]``, Wan2.2 TI2V: the conditioning frame's tokens carry t = 0); every layer takes
either. The cross-attention optionally attends to CLIP image tokens too (Wan2.1 I2V): its output is
``o(attn(q, k, v) + attn(q, k_img, v_img))``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcm import kernels

__all__ = [
    "ROPE_THETA",
    "WanBlock",
    "WanCrossAttention",
    "WanHead",
    "WanImageEmbedding",
    "WanLayerNorm",
    "WanPatchEmbedding",
    "WanRMSNorm",
    "WanSelfAttention",
    "high_precision",
    "linear_high_precision",
    "patchify",
    "rope_apply",
    "rope_dims",
    "rope_table",
    "sinusoidal_embedding",
    "unpatchify",
]

ROPE_THETA = 10000.0

# ------------------------------------------------------------------------------------------------
# Functional pieces


def high_precision(dtype: torch.dtype) -> torch.dtype:
    """High-precision dtype for norms/modulation/RoPE/time embedding: fp32, or fp64 for fp64 models."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_high_precision(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` computed in ``x.dtype`` (fp32/fp64) whatever the parameter dtype."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def patchify(x: Tensor, patch_size: tuple[int, int, int]) -> Tensor:
    """``b c (t kt) (h kh) (w kw) -> b (t h w) (c kt kh kw)``: the Conv3d patch order."""
    b, c, t, h, w = x.shape
    kt, kh, kw = patch_size
    x = x.reshape(b, c, t // kt, kt, h // kh, kh, w // kw, kw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // kt) * (h // kh) * (w // kw), c * kt * kh * kw)


def unpatchify(tokens: Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> Tensor:
    """``b (t h w) (kt kh kw c) -> b c (t kt) (h kh) (w kw)``: official Wan's output order."""
    b = tokens.shape[0]
    gt, gh, gw = grid
    kt, kh, kw = patch_size
    x = tokens.reshape(b, gt, gh, gw, kt, kh, kw, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, -1, gt * kt, gh * kh, gw * kw)


def sinusoidal_embedding(timestep: Tensor, dim: int) -> Tensor:
    """``[cos(τ f_k), sin(τ f_k)]``, ``f_k = 10000^(-k/(dim/2))``, in float64, shape ``[B, dim]``."""
    half = dim // 2
    t = timestep.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    arg = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Split of the head dim over the (t, h, w) axes: ``d_h = d_w = 2·⌊d/6⌋``, ``d_t = d - 2·d_h``."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_table(grid: tuple[int, int, int], head_dim: int, *, device=None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """3-D RoPE ``(cos θ, sin θ)`` per token and rotation pair, shape ``[T'·H'·W', head_dim/2, 2]``.

    Pair ``i`` of token ``(f, h, w)`` (integer patch-grid indices, tokens ordered t, h, w) is rotated
    by ``θ_i = [f ω^t (d_t/2), h ω^h (d_h/2), w ω^w (d_w/2)]_i`` with ``ω^*_j = 10000^(-2j/d_*)``,
    exactly official Wan's ``rope_params`` + split. Angles are formed in float64 and the table cast
    to ``dtype``. It is recomputed from the grid (cheap: O(L·d)) so it is never in the state dict,
    needs no re-init after ``to_empty``, and survives ``model.to(bf16)``; slice it along dim 0 to
    shard the sequence.
    """
    angles = []
    for n, d in zip(grid, rope_dims(head_dim)):
        pos = torch.arange(n, dtype=torch.float64, device=device)
        omega = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, d, 2, dtype=torch.float64, device=device).div(d))
        angles.append(pos[:, None] * omega[None, :])
    gt, gh, gw = grid
    theta = torch.cat([
        angles[0][:, None, None, :].expand(gt, gh, gw, -1),
        angles[1][None, :, None, :].expand(gt, gh, gw, -1),
        angles[2][None, None, :, :].expand(gt, gh, gw, -1),
    ], dim=-1).reshape(gt * gh * gw, head_dim // 2)
    return torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1).to(dtype)


def rope_apply(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs ``(x_2i, x_2i+1)`` of ``x [B, L, H, D]`` by ``rope [L, D/2, 2]``.

    Computed in ``rope.dtype`` (fp32) and cast back to ``x.dtype``.
    """
    x0, x1 = x.to(rope.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Layers


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (fp64 for fp64 inputs); returns that high-precision dtype."""

    def forward(self, x: Tensor) -> Tensor:
        hp = high_precision(x.dtype)
        weight = None if self.weight is None else self.weight.to(hp)
        bias = None if self.bias is None else self.bias.to(hp)
        x = x.to(hp)
        if not torch.compiler.is_compiling():
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        # Compiled, the same math spelled out: Dynamo cannot trace layer_norm under torch.func.jvp (an internal
        # assert in its forward-AD rule, torch 2.13), and inductor fuses these ops into one kernel anyway.
        dims = tuple(range(-len(self.normalized_shape), 0))
        centered = x - x.mean(dims, keepdim=True)
        y = centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + self.eps)
        if weight is not None:
            y = y * weight
        return y if bias is None else y + bias


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim: statistics in fp32, cast back to ``x.dtype``, then ``· weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(high_precision(x.dtype))
        xf = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class WanPatchEmbedding(nn.Module):
    """Wan's ``Conv3d(in_dim, dim, kernel=stride=patch)`` as patchify + linear, same parameters."""

    def __init__(self, in_dim: int, dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.weight = nn.Parameter(torch.empty(dim, in_dim, *self.patch_size))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, T, H, W] -> [B, L, dim]``, tokens ordered (t, h, w)."""
        return F.linear(patchify(x, self.patch_size), self.weight.flatten(1), self.bias)


class _WanAttention(nn.Module):
    """The parameters both attentions share (official names q, k, v, o, norm_q, norm_k), and the
    attention function they call.

    ``attention_fn(q, k, v) -> out`` (layout ``[B, L, H, D]``) is ``rcm.kernels.attention`` unless
    replaced: ``None`` means that op, looked up at call time (so a patched op is seen). Code outside
    the model may install a wrapper around it (e.g. one that redistributes the sequence), which
    changes no parameter and no state-dict key.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        self.attention_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        fn = self.attention_fn
        return kernels.attention(q, k, v) if fn is None else fn(q, k, v)


class WanSelfAttention(_WanAttention):
    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        """``x [B, L, dim]`` in the parameter dtype, ``rope [L, head_dim/2, 2]``."""
        heads = (self.num_heads, -1)
        q = rope_apply(self.norm_q(self.q(x)).unflatten(-1, heads), rope)
        k = rope_apply(self.norm_k(self.k(x)).unflatten(-1, heads), rope)
        v = self.v(x).unflatten(-1, heads)
        return self.o(self.attend(q, k, v).flatten(2))


class WanCrossAttention(_WanAttention):
    """Cross-attention: queries from the video tokens, keys/values from the text; no mask.

    With ``image_kv`` (Wan2.1 I2V) it also attends to the projected CLIP image tokens through its own
    keys/values (official names ``k_img``, ``v_img``, ``norm_k_img``; the queries are shared) and
    adds that output to the text one before ``o``."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, image_kv: bool = False):
        super().__init__(dim, num_heads, eps)
        if image_kv:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps)
        self.image_kv = image_kv

    def forward(self, x: Tensor, context: Tensor, image_context: Tensor | None = None) -> Tensor:
        """``x [B, L, dim]``, ``context [B, L_text, dim]``, ``image_context [B, L_img, dim]`` (projected;
        required exactly when the layer has image keys/values)."""
        if (image_context is not None) != self.image_kv:
            raise ValueError("WanCrossAttention: image_context must be given exactly when the layer has "
                             f"image keys/values (image_kv={self.image_kv})")
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(context)).unflatten(-1, heads)
        v = self.v(context).unflatten(-1, heads)
        out = self.attend(q, k, v)
        if image_context is not None:
            k_img = self.norm_k_img(self.k_img(image_context)).unflatten(-1, heads)
            v_img = self.v_img(image_context).unflatten(-1, heads)
            out = out + self.attend(q, k_img, v_img)
        return self.o(out.flatten(2))


def _per_token(e: Tensor) -> Tensor:
    """A per-sample time tensor ``[B, n, dim]`` as ``[B, 1, n, dim]``; a per-token ``[B, L, n, dim]`` as is."""
    return e[:, None] if e.ndim == 3 else e


class WanBlock(nn.Module):
    """One DiT block. Takes plain tensors only, so activation checkpointing can wrap it."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6, image_kv: bool = False):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, num_heads, eps, image_kv=image_kv)
        self.norm2 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x: Tensor, e: Tensor, context: Tensor, rope: Tensor,
                image_context: Tensor | None = None) -> Tensor:
        """``x [B, L, dim]`` (param dtype), ``e [B, 6, dim]`` or per token ``[B, L, 6, dim]`` (fp32),
        ``context [B, L_text, dim]`` and ``image_context [B, L_img, dim]`` (param dtype, projected),
        ``rope [L, head_dim/2, 2]`` (fp32). Returns the new ``x``."""
        dt, hp = x.dtype, e.dtype
        mod = self.modulation.to(hp) + _per_token(e)  # [B, 1 or L, 6, dim]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(2)
        y = self.self_attn((self.norm1(x) * (1 + scale_sa) + shift_sa).to(dt), rope)
        x = (x.to(hp) + y.to(hp) * gate_sa).to(dt)
        y = self.cross_attn(self.norm3(x).to(dt), context, image_context)
        x = (x.to(hp) + y.to(hp)).to(dt)
        y = self.ffn((self.norm2(x) * (1 + scale_ff) + shift_ff).to(dt))
        return (x.to(hp) + y.to(hp) * gate_ff).to(dt)


class WanHead(nn.Module):
    """Output layer: ``W_h(LN(x)(1 + scale) + shift)`` in fp32, ``(shift, scale) = modulation + e``."""

    def __init__(self, dim: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """``x [B, L, dim]``, ``e [B, dim]`` or per token ``[B, L, dim]`` (the un-projected time
        embedding, fp32)."""
        e = e[:, None] if e.ndim == 2 else e
        shift, scale = (self.modulation.to(e.dtype) + e[:, :, None]).unbind(2)
        return linear_high_precision(self.head, self.norm(x) * (1 + scale) + shift)


class WanImageEmbedding(nn.Module):
    """CLIP image tokens ``[B, L_img, image_dim]`` -> extra cross-attention context ``[B, L_img, dim]``:
    ``LN(W2 GELU(W1 LN(u)))`` with affine LayerNorms (eps 1e-5), official ``img_emb.proj.{0,1,3,4}``.
    Norms in fp32, the Linears in the parameter dtype."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            WanLayerNorm(image_dim, eps=1e-5), nn.Linear(image_dim, image_dim), nn.GELU(),
            nn.Linear(image_dim, dim), WanLayerNorm(dim, eps=1e-5))

    def forward(self, image: Tensor) -> Tensor:
        norm_in, fc1, act, fc2, norm_out = self.proj
        dt = fc1.weight.dtype
        return norm_out(fc2(act(fc1(norm_in(image.to(dt)).to(dt))))).to(dt)
