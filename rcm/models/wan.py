"""The Wan DiT, one plain ``nn.Module`` for every variant (docs/method.md §8, docs/wan_models.md).

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

Variants (presets in ``WAN_CONFIGS``), all this one network:
* T2V (Wan2.1 1.3B/14B, each Wan2.2 A14B T2V expert): as above.
* I2V by channel concatenation (Wan2.1 I2V-14B, Wan2.2 I2V-A14B experts): ``in_dim = 36`` = the noisy
  latent (16) ++ ``y`` = mask (4) ++ first-frame-conditioned latent (16); pass ``y`` separately or
  already concatenated into ``x``.
* CLIP image tokens (Wan2.1 I2V only, ``image_dim`` set): ``img = LN(W GELU(W LN(clip)))`` and every
  cross-attention adds ``attn(q, k_img(img), v_img(img))`` to its text attention.
* Per-token timesteps (Wan2.2 TI2V-5B): ``timestep [B, L]`` gives ``e [B, L, dim]``, ``e0 [B, L, 6, dim]``
  (the conditioning frame's tokens get t = 0); the losses' per-frame map ``[B, 1, T, 1, 1]`` is
  reduced to it by the patch size (``per_token_timestep``).
The two-expert Wan2.2 A14B teacher is ``rcm.models.wan_experts.WanExperts`` around two of these.

Module and parameter names equal the official Wan state-dict keys, so an official checkpoint
loads 1:1 (the patch embedding keeps the Conv3d weight shape ``[dim, C, kt, kh, kw]``; it is applied
as a reshape + linear, which is the same map as the stride = kernel convolution).

Precision (docs/design.md "Precision policy"): matmuls run in the parameter dtype (bf16 on GPU, fp32 on
CPU). LayerNorm, RMSNorm statistics, modulation, RoPE, the time embedding MLP, the head and every
residual update run in float32 (float64 when the parameters are float64, for gradient checks); the
sinusoid is computed in float64. The residual stream is stored in the parameter dtype between
updates (as in the reference's JVP student network, docs/method.md §7). The output is float32
(float64 for a float64 model).

Forward-mode AD: there is no hand-written JVP; the module is written so that ``torch.func.jvp``
(w.r.t. x, y and timestep), ``torch.func.functional_call`` and ``torch.compile(fullgraph=True)`` work:
no in-place ops on activations, no ``.item()``, no control flow on tensor values. Attention goes
through ``rcm.kernels.attention`` (looked up at call time), the one op with a custom JVP rule;
each attention module's ``attention_fn`` may wrap it from outside (context parallelism does).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcm.models import wan_layers
from rcm.models.wan_layers import *  # noqa: F403 (the layers are re-exported: ``rcm.models.wan`` is the network's one import)
from rcm.models.wan_layers import (
    WanBlock,
    WanHead,
    WanImageEmbedding,
    WanPatchEmbedding,
    WanRMSNorm,
    high_precision,
    linear_high_precision,
    rope_table,
    sinusoidal_embedding,
    unpatchify,
)

__all__ = ["WAN_CONFIGS", "WAN_EXPERT_BOUNDARIES", "WanConfig", "WanDiT", "wan_config", *wan_layers.__all__]

# Head dims the attention op supports (docs/design.md: 64-256); RoPE needs an even head dim.
MIN_HEAD_DIM, MAX_HEAD_DIM = 64, 256


# ------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class WanConfig:
    """Hyperparameters of a Wan DiT (any variant: see the module doc).

    ``in_dim`` > ``out_dim``: image-to-video by channel concatenation (``y`` carries the extra
    ``in_dim - out_dim`` conditioning channels). ``image_dim``: width of the CLIP image tokens
    (1280; Wan2.1 I2V), ``None`` for no image cross-attention; ``image_len`` their count (257).

    ``bf16_timestep``: the reference rounds the timestep input ``1000·ρ`` (and its tangent) to bf16
    before the time embedding (docs/method.md §10.1, spacing 4 near 1000). Default ``False`` keeps it
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
    image_dim: int | None = None
    image_len: int = 257

    def __post_init__(self):
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_len",
                     "text_dim", "freq_dim", "rope_max_len", "image_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        if self.image_dim is not None and (isinstance(self.image_dim, bool) or not isinstance(self.image_dim, int)
                                           or self.image_dim <= 0):
            raise ValueError(f"WanConfig.image_dim must be None or a positive int, got {self.image_dim!r}")
        if self.in_dim < self.out_dim:
            raise ValueError(f"WanConfig.in_dim ({self.in_dim}) must be >= out_dim ({self.out_dim}): the extra "
                             f"input channels are the image conditioning")
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

    @property
    def cond_dim(self) -> int:
        """Channels of the image conditioning ``y`` concatenated to the noisy latent (0 for T2V)."""
        return self.in_dim - self.out_dim


_WAN_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

WAN_CONFIGS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(**_WAN_14B),
    # noise (16) ++ mask (4) ++ first-frame latent (16), and CLIP ViT-H/14 tokens [257, 1280]
    "wan2.1-i2v-14b": WanConfig(**_WAN_14B, in_dim=36, image_dim=1280),
    # 48-channel Wan2.2 VAE latents; per-token timesteps for its image-to-video mode
    "wan2.2-ti2v-5b": WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    # each of the two experts (high noise, low noise) of Wan2.2 A14B; I2V without CLIP
    "wan2.2-t2v-a14b": WanConfig(**_WAN_14B),
    "wan2.2-i2v-a14b": WanConfig(**_WAN_14B, in_dim=36),
    # Same architectures in miniature, for tests (head_dim 64: the smallest the attention op takes).
    "wan-tiny": WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
                          text_len=8, text_dim=32, freq_dim=32),
    "wan-tiny-i2v": WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=12, out_dim=4,
                              text_len=8, text_dim=32, freq_dim=32, image_dim=48, image_len=5),
    "wan-tiny-ti2v": WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=8, out_dim=8,
                               text_len=8, text_dim=32, freq_dim=32),
    "wan-tiny-i2v-experts": WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=12, out_dim=4,
                                      text_len=8, text_dim=32, freq_dim=32),
}

# Wan2.2 A14B: the high-noise expert runs for RF time σ >= boundary (official configs' ``boundary``).
WAN_EXPERT_BOUNDARIES: dict[str, float] = {"wan2.2-t2v-a14b": 0.875, "wan2.2-i2v-a14b": 0.900}


def wan_config(name: str, **overrides) -> WanConfig:
    """A named config from ``WAN_CONFIGS``, optionally with fields replaced (validated again)."""
    if name not in WAN_CONFIGS:
        raise ValueError(f"unknown Wan config {name!r}; valid names: {', '.join(sorted(WAN_CONFIGS))}")
    cfg = WAN_CONFIGS[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg



# ------------------------------------------------------------------------------------------------
# Network


def per_token_timestep(timestep: Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> Tensor:
    """A per-frame timestep map ``[B, 1, T, 1, 1]`` as one value per patch token ``[B, L]`` in (t, h, w)
    order (each token takes its patch's first frame: Wan2.2's rule, the given frame's tokens at t = 0);
    ``[B]`` and ``[B, L]`` pass through unchanged."""
    if timestep.ndim != 5:
        return timestep
    per_frame = timestep[:, 0, ::patch_size[0], 0, 0]  # [B, T']
    return per_frame.repeat_interleave(grid[1] * grid[2], dim=1)  # [B, T'·H'·W']


class WanDiT(nn.Module):
    """Wan DiT: ``forward(x, timestep, context, *, y=None, image_context=None) -> velocity``.

    State-dict keys equal official Wan's (``Wan-AI/Wan2.1-*``, ``Wan-AI/Wan2.2-*``), RoPE is not in it.
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
        if cfg.image_dim is not None:
            self.img_emb = WanImageEmbedding(cfg.image_dim, dim)
        self.blocks = nn.ModuleList([
            WanBlock(dim, cfg.ffn_dim, cfg.num_heads, cfg.eps, image_kv=cfg.image_dim is not None)
            for _ in range(cfg.num_layers)])
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
            elif isinstance(m, (WanRMSNorm, nn.LayerNorm)):  # (the image projection's LayerNorms too)
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

    def _check_inputs(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None,
                      image_context: Tensor | None) -> tuple[int, int, int]:
        cfg = self.config
        if not isinstance(x, Tensor) or x.ndim != 5 or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor [B, C, T, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        b, c, t, h, w = x.shape
        if y is not None:
            if not isinstance(y, Tensor) or y.ndim != 5 or (y.shape[0], *y.shape[2:]) != (b, t, h, w):
                raise ValueError(f"y (the image conditioning channels) must be [B, C_y, T, H, W] matching x "
                                 f"{tuple(x.shape)} but for channels, got "
                                 f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
            if (c, y.shape[1]) != (cfg.out_dim, cfg.cond_dim):
                raise ValueError(f"x has {c} and y {y.shape[1]} channels, the model expects "
                                 f"{cfg.out_dim} + {cfg.cond_dim} (in_dim={cfg.in_dim})")
        elif c != cfg.in_dim:
            raise ValueError(f"x has {c} channels (dim 1), the model expects in_dim={cfg.in_dim}"
                             + (f" (or x with {cfg.out_dim} and y with {cfg.cond_dim})" if cfg.cond_dim else ""))
        for name, size, k in zip("THW", (t, h, w), cfg.patch_size):
            if size % k:
                raise ValueError(f"x: {name}={size} is not divisible by the patch size {k} "
                                 f"(patch_size={cfg.patch_size}, x shape {tuple(x.shape)})")
        grid = (t // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
        if max(grid) > cfg.rope_max_len:
            raise ValueError(f"x: patch grid {grid} exceeds the RoPE table length {cfg.rope_max_len}")
        tokens = math.prod(grid)
        frame_map = isinstance(timestep, Tensor) and tuple(timestep.shape) == (b, 1, t, 1, 1)
        if not isinstance(timestep, Tensor) or not (frame_map or tuple(timestep.shape) in ((b,), (b, tokens))):
            raise ValueError(f"timestep must be a tensor [B]=[{b}] (one c_noise = 1000·rho per sample), "
                             f"[B, L]=[{b}, {tokens}] (one per patch token) or [B, 1, T, 1, 1]=[{b}, 1, {t}, 1, 1] "
                             f"(one per frame), got "
                             f"{tuple(timestep.shape) if isinstance(timestep, Tensor) else type(timestep).__name__}")
        if not isinstance(context, Tensor) or context.ndim != 3 or not context.is_floating_point():
            raise ValueError(f"context must be a floating tensor [B, text_len, text_dim], got "
                             f"{tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__}")
        if tuple(context.shape) != (b, cfg.text_len, cfg.text_dim):
            raise ValueError(f"context shape {tuple(context.shape)} != (B, text_len, text_dim) = "
                             f"({b}, {cfg.text_len}, {cfg.text_dim}); batch must match x and text embeddings "
                             f"must be zero-padded to text_len, as official Wan does")
        if cfg.image_dim is None:
            if image_context is not None:
                raise ValueError("image_context given but the model has no image cross-attention (image_dim=None)")
        elif not isinstance(image_context, Tensor) or tuple(image_context.shape) != (b, cfg.image_len, cfg.image_dim):
            raise ValueError(f"image_context (CLIP image tokens) must be a tensor [B, image_len, image_dim] = "
                             f"[{b}, {cfg.image_len}, {cfg.image_dim}], got "
                             f"{tuple(image_context.shape) if isinstance(image_context, Tensor) else image_context}")
        return grid

    def time_embed(self, timestep: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``e [B, dim]`` and ``e0 [B, 6, dim]`` in ``dtype`` (fp32/fp64) from ``c_noise [B]``; per token,
        ``e [B, L, dim]`` and ``e0 [B, L, 6, dim]`` from ``c_noise [B, L]``."""
        t = timestep.to(torch.bfloat16) if self.config.bf16_timestep else timestep.to(dtype)
        phi = sinusoidal_embedding(t.flatten(), self.config.freq_dim).to(dtype).unflatten(0, t.shape)
        e = linear_high_precision(self.time_embedding[2], F.silu(linear_high_precision(self.time_embedding[0], phi)))
        e0 = linear_high_precision(self.time_projection[1], F.silu(e)).unflatten(-1, (6, self.config.dim))
        return e, e0

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, *, y: Tensor | None = None,
                image_context: Tensor | None = None) -> Tensor:
        """Velocity ``v ≈ ε - x0``.

        x: ``[B, in_dim, T, H, W]`` latent, or ``[B, out_dim, T, H, W]`` with ``y`` (any float dtype;
        cast to the parameter dtype);
        timestep: ``[B]`` c_noise = 1000·ρ, ``[B, L]`` one per patch token in (t, h, w) order, or a
        per-frame map ``[B, 1, T, 1, 1]`` (frame replacement, docs/method.md §12.1; each token takes its
        patch's first frame) (any dtype; kept in fp32 unless ``bf16_timestep``);
        context: ``[B, text_len, text_dim]`` text embeddings (zero-padded, no mask);
        y: ``[B, in_dim - out_dim, T, H, W]`` image conditioning (mask ++ conditioned latent),
        concatenated after ``x`` along channels, as official Wan does;
        image_context: ``[B, image_len, image_dim]`` CLIP image tokens, exactly when ``image_dim`` is set.
        Returns ``[B, out_dim, T, H, W]`` in fp32 (fp64 for a fp64 model).
        """
        grid = self._check_inputs(x, timestep, context, y, image_context)
        dt = self.patch_embedding.weight.dtype
        hp = high_precision(dt)
        x = x.to(dt) if y is None else torch.cat([x.to(dt), y.to(dt)], dim=1)
        tokens = self.patch_embedding(x)
        e, e0 = self.time_embed(per_token_timestep(timestep, grid, self.config.patch_size), hp)
        ctx = self.text_embedding(context.to(dt))
        img = None if image_context is None else self.img_emb(image_context)
        rope = rope_table(grid, self.config.head_dim, device=x.device, dtype=hp)
        for block in self.blocks:
            tokens = block(tokens, e0, ctx, rope, img)
        return unpatchify(self.head(tokens, e), grid, self.config.patch_size)
