"""Wan2.1 text-to-video DiT, one plain ``nn.Module`` (RCM_METHOD.md §8).

The network predicts the rectified-flow velocity ``v ≈ ε - x0`` from a noisy latent, the timestep
``c_noise = 1000·ρ`` and umT5 text embeddings:

    x [B,C,T,H,W] --patchify--> [B, L, C·kt·kh·kw] --Linear--> tokens [B, L, dim]     L = T'·H'·W'
    φ(τ) = [cos(τ f_k), sin(τ f_k)],  f_k = 10000^(-k/half)          (float64, cos first)
    e  = W2 SiLU(W1 φ(τ))  [B, dim];   e0 = Wp SiLU(e)  [B, 6, dim]   (float32)
    ctx = Wb GELU_tanh(Wa u)  [B, L_text, dim]
    block i, (e_0..e_5) = modulation_i + e0:
        x += e2 · SelfAttn(LN1(x)(1 + e1) + e0)       q, k RMS-normed over dim, 3-D RoPE
        x += CrossAttn(LN3(x), ctx)                     q, k RMS-normed, no RoPE, no mask
        x += e5 · FFN(LN2(x)(1 + e4) + e3)
    (s, b) = head.modulation + e;  out = W_h(LN(x)(1 + b) + s)   [B, L, kt·kh·kw·C_out]
    unpatchify: b (t h w) (kt kh kw c) -> b c (t kt) (h kh) (w kw)

Module and parameter names equal the official Wan2.1 state-dict keys, so an official checkpoint
loads 1:1 (the patch embedding keeps the Conv3d weight shape ``[dim, C, kt, kh, kw]``; it is applied
as a reshape + linear, which is the same map as the stride = kernel convolution).

Precision (DESIGN.md "Precision policy"): matmuls run in the parameter dtype (bf16 on GPU, fp32 on
CPU). LayerNorm, RMSNorm statistics, modulation, RoPE, the time embedding MLP, the head and every
residual update run in float32 (float64 when the parameters are float64, for gradient checks); the
sinusoid is computed in float64. The residual stream is stored in the parameter dtype between
updates (as in the reference's JVP student network, RCM_METHOD.md §7). The output is float32
(float64 for a float64 model).

Forward-mode AD: there is no hand-written JVP; the module is written so that ``torch.func.jvp``
(w.r.t. x and timestep), ``torch.func.functional_call`` and ``torch.compile(fullgraph=True)`` work:
no in-place ops on activations, no ``.item()``, no control flow on tensor values. Attention goes
through ``rcm.kernels.attention`` (looked up at call time), the one op with a custom JVP rule;
each attention module's ``attention_fn`` may wrap it from outside (context parallelism does).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcm import kernels

__all__ = [
    "WAN_CONFIGS",
    "WanBlock",
    "WanConfig",
    "WanCrossAttention",
    "WanDiT",
    "WanHead",
    "WanLayerNorm",
    "WanPatchEmbedding",
    "WanRMSNorm",
    "WanSelfAttention",
    "patchify",
    "rope_apply",
    "rope_dims",
    "rope_table",
    "sinusoidal_embedding",
    "unpatchify",
    "wan_config",
]

# Head dims the attention op supports (DESIGN.md: 64-256); RoPE needs an even head dim.
MIN_HEAD_DIM, MAX_HEAD_DIM = 64, 256
ROPE_THETA = 10000.0


# ------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class WanConfig:
    """Hyperparameters of a Wan2.1 T2V DiT.

    ``bf16_timestep``: the reference rounds the timestep input ``1000·ρ`` (and its tangent) to bf16
    before the time embedding (RCM_METHOD.md §10.1, spacing 4 near 1000). Default ``False`` keeps it
    in float32 (our deliberate improvement); ``True`` reproduces the reference rounding.
    ``rope_max_len``: positions per axis of official Wan's RoPE table (``rope_params(1024, ·)``); a
    latent whose patch grid is longer on any axis is rejected (official Wan would fail).
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    bf16_timestep: bool = False
    rope_max_len: int = 1024

    def __post_init__(self):
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_len",
                     "text_dim", "freq_dim", "rope_max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        patch = tuple(self.patch_size)
        if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in patch):
            raise ValueError(f"WanConfig.patch_size must be 3 positive ints (kt, kh, kw), got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", patch)
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even (cos/sin halves), got {self.freq_dim}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"WanConfig.eps must be a positive float, got {self.eps!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        d = self.head_dim
        if d % 2 or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            raise ValueError(
                f"WanConfig.head_dim = dim / num_heads = {d} must be even and in "
                f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (attention op and RoPE)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_numel(self) -> int:
        return math.prod(self.patch_size)


WAN_CONFIGS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Same architecture in miniature, for tests (head_dim 64: the smallest the attention op takes).
    "wan-tiny": WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
                          text_len=8, text_dim=32, freq_dim=32),
}


def wan_config(name: str, **overrides) -> WanConfig:
    """A named config from ``WAN_CONFIGS``, optionally with fields replaced (validated again)."""
    if name not in WAN_CONFIGS:
        raise ValueError(f"unknown Wan config {name!r}; valid names: {', '.join(sorted(WAN_CONFIGS))}")
    cfg = WAN_CONFIGS[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# ------------------------------------------------------------------------------------------------
# Functional pieces


def _hp(dtype: torch.dtype) -> torch.dtype:
    """High-precision dtype for norms/modulation/RoPE/time embedding: fp32, or fp64 for fp64 models."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear_hp(layer: nn.Linear, x: Tensor) -> Tensor:
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
        hp = _hp(x.dtype)
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
        xf = x.to(_hp(x.dtype))
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
    """T2V cross-attention: queries from the video tokens, keys/values from the text; no mask."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(context)).unflatten(-1, heads)
        v = self.v(context).unflatten(-1, heads)
        return self.o(self.attend(q, k, v).flatten(2))


class WanBlock(nn.Module):
    """One DiT block. Takes plain tensors only, so activation checkpointing can wrap it."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, num_heads, eps)
        self.norm2 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x: Tensor, e: Tensor, context: Tensor, rope: Tensor) -> Tensor:
        """``x [B, L, dim]`` (param dtype), ``e [B, 6, dim]`` (fp32), ``context [B, L_text, dim]``
        (param dtype), ``rope [L, head_dim/2, 2]`` (fp32). Returns the new ``x``."""
        dt, hp = x.dtype, e.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.to(hp) + e).chunk(6, dim=1)
        y = self.self_attn((self.norm1(x) * (1 + scale_sa) + shift_sa).to(dt), rope)
        x = (x.to(hp) + y.to(hp) * gate_sa).to(dt)
        y = self.cross_attn(self.norm3(x).to(dt), context)
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
        """``x [B, L, dim]``, ``e [B, dim]`` (the un-projected time embedding, fp32)."""
        shift, scale = (self.modulation.to(e.dtype) + e[:, None, :]).chunk(2, dim=1)
        return _linear_hp(self.head, self.norm(x) * (1 + scale) + shift)


# ------------------------------------------------------------------------------------------------
# Network


class WanDiT(nn.Module):
    """Wan2.1 T2V DiT: ``forward(x, timestep, context) -> velocity``.

    State-dict keys equal official Wan2.1's (``Wan-AI/Wan2.1-T2V-*``), RoPE is not in it.
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.dim
        self.patch_embedding = WanPatchEmbedding(cfg.in_dim, dim, cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            [WanBlock(dim, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers)])
        self.head = WanHead(dim, cfg.out_dim * cfg.patch_numel, cfg.eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Trainable-from-scratch init, official Wan2.1's ``init_weights``:

        * every Linear: Xavier-uniform weight, zero bias; the patch embedding: Xavier-uniform on its
          ``[dim, C·kt·kh·kw]`` view, zero bias;
        * text and time embedding Linears: N(0, 0.02²);
        * ``modulation`` tables (blocks and head): N(0, 1/dim), as official Wan's ``randn / dim**0.5``;
        * norms: weight 1, bias 0;
        * head Linear weight **zero** (bias zero too), so an untrained net predicts exactly v = 0 and
          the first steps train the head before anything else moves (as DiT's zero-init output).

        Initializes every parameter, so it also completes a model built on the meta device and
        materialized with ``to_empty``. ``generator`` makes the draw reproducible.
        """
        g = generator
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=g)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (WanRMSNorm, nn.LayerNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.config.dim, -1), generator=g)
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02, generator=g)
        for m in [*self.blocks, self.head]:
            nn.init.normal_(m.modulation, std=self.config.dim ** -0.5, generator=g)
        nn.init.zeros_(self.head.head.weight)
        nn.init.zeros_(self.head.head.bias)

    def _check_inputs(self, x: Tensor, timestep: Tensor, context: Tensor) -> tuple[int, int, int]:
        cfg = self.config
        if not isinstance(x, Tensor) or x.ndim != 5 or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor [B, C, T, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        b, c, t, h, w = x.shape
        if c != cfg.in_dim:
            raise ValueError(f"x has {c} channels (dim 1), the model expects in_dim={cfg.in_dim}")
        for name, size, k in zip("THW", (t, h, w), cfg.patch_size):
            if size % k:
                raise ValueError(f"x: {name}={size} is not divisible by the patch size {k} "
                                 f"(patch_size={cfg.patch_size}, x shape {tuple(x.shape)})")
        grid = (t // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
        if max(grid) > cfg.rope_max_len:
            raise ValueError(f"x: patch grid {grid} exceeds the RoPE table length {cfg.rope_max_len}")
        if not isinstance(timestep, Tensor) or timestep.ndim != 1 or timestep.shape[0] != b:
            raise ValueError(f"timestep must be a tensor [B]=[{b}] (one c_noise = 1000·rho per sample), got "
                             f"{tuple(timestep.shape) if isinstance(timestep, Tensor) else type(timestep).__name__}")
        if not isinstance(context, Tensor) or context.ndim != 3 or not context.is_floating_point():
            raise ValueError(f"context must be a floating tensor [B, text_len, text_dim], got "
                             f"{tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__}")
        if tuple(context.shape) != (b, cfg.text_len, cfg.text_dim):
            raise ValueError(f"context shape {tuple(context.shape)} != (B, text_len, text_dim) = "
                             f"({b}, {cfg.text_len}, {cfg.text_dim}); batch must match x and text embeddings "
                             f"must be zero-padded to text_len, as official Wan does")
        return grid

    def time_embed(self, timestep: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``e [B, dim]`` and ``e0 [B, 6, dim]`` in ``dtype`` (fp32/fp64) from ``c_noise [B]``."""
        t = timestep.to(torch.bfloat16) if self.config.bf16_timestep else timestep.to(dtype)
        phi = sinusoidal_embedding(t, self.config.freq_dim).to(dtype)
        e = _linear_hp(self.time_embedding[2], F.silu(_linear_hp(self.time_embedding[0], phi)))
        e0 = _linear_hp(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e0

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        """Velocity ``v ≈ ε - x0``.

        x: ``[B, in_dim, T, H, W]`` latent (any float dtype; cast to the parameter dtype);
        timestep: ``[B]`` c_noise = 1000·ρ (any dtype; kept in fp32 unless ``bf16_timestep``);
        context: ``[B, text_len, text_dim]`` text embeddings (zero-padded, no mask).
        Returns ``[B, out_dim, T, H, W]`` in fp32 (fp64 for a fp64 model).
        """
        grid = self._check_inputs(x, timestep, context)
        dt = self.patch_embedding.weight.dtype
        hp = _hp(dt)
        tokens = self.patch_embedding(x.to(dt))
        e, e0 = self.time_embed(timestep, hp)
        ctx = self.text_embedding(context.to(dt))
        rope = rope_table(grid, self.config.head_dim, device=x.device, dtype=hp)
        for block in self.blocks:
            tokens = block(tokens, e0, ctx, rope)
        return unpatchify(self.head(tokens, e), grid, self.config.patch_size)
