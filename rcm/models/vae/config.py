"""Architecture of the Wan video VAEs (2.1 and 2.2) and their per-channel latent statistics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Per-channel statistics of Wan2.1 latents (official release).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Per-channel statistics of Wan2.2 latents (48 channels, official release).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of a Wan VAE. The default is the released Wan2.1 VAE (``Wan2.1_VAE.pth``);
    ``WanVAEConfig.wan22()`` is the released Wan2.2 VAE (``Wan2.2_VAE.pth``, used by TI2V-5B).

    Wan2.2 differs by ``residual`` stages (each down/up stage adds a parameter-free shortcut that folds
    or duplicates pixels into channels), ``patch_size=2`` (2x2 pixels folded into 12 channels before the
    encoder and unfolded after the decoder: 16x spatial compression in all), a wider decoder
    (``decoder_base_dim``) and 48 latent channels."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder stage transition
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    residual: bool = False
    patch_size: int = 1
    decoder_base_dim: int | None = None  # None: base_dim

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        object.__setattr__(self, "latents_mean", tuple(float(m) for m in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(s) for s in self.latents_std))
        object.__setattr__(self, "residual", bool(self.residual))
        if self.decoder_base_dim == self.base_dim:
            object.__setattr__(self, "decoder_base_dim", None)  # one spelling of "same as the encoder"
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1 or not self.dim_mult:
            raise ValueError(f"WanVAEConfig: base_dim, z_dim, num_res_blocks and dim_mult must be positive: {self}")
        if self.patch_size < 1 or (self.decoder_base_dim is not None and self.decoder_base_dim < 1):
            raise ValueError(f"WanVAEConfig: patch_size and decoder_base_dim must be positive: {self}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig: temporal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                f"entries, got {len(self.temporal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"WanVAEConfig: latents_mean and latents_std need z_dim = {self.z_dim} entries, "
                f"got {len(self.latents_mean)} and {len(self.latents_std)}"
            )
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("WanVAEConfig: latents_std must be positive")
        if self.residual:
            self._check_shortcut_groups()
        else:  # the 2.1 decoder halves channels in each upsampler and feeds that to the next stage
            dec = self.decoder_dims
            if any(d % 2 for d in dec[1:-1]):
                raise ValueError(f"WanVAEConfig: decoder stage widths {dec[1:-1]} must be even")

    def _check_shortcut_groups(self):
        """The residual shortcuts average groups of folded channels (down) or repeat channels (up):
        the widths must divide accordingly."""
        enc, dec, n = self.encoder_dims, self.decoder_dims, len(self.dim_mult)
        for i in range(n):
            ft = 2 if i < n - 1 and self.temporal_downsample[i] else 1
            fs = 2 if i < n - 1 else 1
            if (enc[i] * ft * fs * fs) % enc[i + 1]:
                raise ValueError(f"WanVAEConfig: encoder stage {i}: {enc[i]} channels x{ft * fs * fs} folded "
                                 f"do not divide into {enc[i + 1]} output channels")  # fmt: skip
        for i in range(n - 1):
            ft = 2 if tuple(reversed(self.temporal_downsample))[i] else 1
            if (dec[i + 1] * ft * 4) % dec[i]:
                raise ValueError(f"WanVAEConfig: decoder stage {i}: {dec[i + 1]} channels x{ft * 4} unfolded "
                                 f"are not a multiple of its {dec[i]} input channels")  # fmt: skip

    @property
    def encoder_dims(self) -> list[int]:
        """Channels after the input conv, then after each encoder stage."""
        return [self.base_dim * m for m in (1, *self.dim_mult)]

    @property
    def decoder_dims(self) -> list[int]:
        """Channels after the input conv (and mid block), then after each decoder stage."""
        d = self.decoder_base_dim or self.base_dim
        return [d * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]

    @property
    def image_channels(self) -> int:
        """Channels the encoder sees and the decoder produces: RGB with patch x patch pixels folded in."""
        return 3 * self.patch_size**2

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, num_frames: int) -> int:
        return 1 + (num_frames - 1) // self.temporal_factor

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(z_dim, T_lat, H/s, W/s)`` for a video of that size (not validated)."""
        s = self.spatial_factor
        return (self.z_dim, self.latent_frames(num_frames), height // s, width // s)

    @classmethod
    def tiny(cls) -> WanVAEConfig:
        """The released Wan2.1 structure (4 stages, 2 blocks, 8x spatial, 4x temporal, 16 latent channels)
        at base width 4 instead of 96 (~500x fewer parameters): for tests and CPU demos."""
        return cls(base_dim=4)

    @classmethod
    def wan22(cls) -> WanVAEConfig:
        """The released Wan2.2 VAE: 48 latent channels, 16x spatial and 4x temporal compression."""
        return cls(base_dim=160, decoder_base_dim=256, z_dim=48, residual=True, patch_size=2,
                   latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)  # fmt: skip

    @classmethod
    def tiny_wan22(cls) -> WanVAEConfig:
        """The released Wan2.2 structure (residual stages, 2x2 patches, 16x spatial, 48 latent channels,
        a decoder wider than the encoder) at base widths 4 and 6: for tests and CPU demos."""
        return cls(base_dim=4, decoder_base_dim=6, z_dim=48, residual=True, patch_size=2,
                   latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)  # fmt: skip

    @classmethod
    def from_diffusers(cls, config: Mapping) -> WanVAEConfig:
        """From an ``AutoencoderKLWan`` ``config.json`` dict (Wan2.1 or Wan2.2)."""
        patch = config.get("patch_size") or 1
        bad = []
        if config.get("attn_scales"):
            bad.append(f"attn_scales={config['attn_scales']!r}")
        for key in ("in_channels", "out_channels"):
            if key in config and config[key] != 3 * patch**2:
                bad.append(f"{key}={config[key]!r} with patch_size={patch} (needs {3 * patch**2})")
        if bad:
            raise ValueError(f"not a Wan VAE config this code supports ({', '.join(bad)})")
        kw = {"patch_size": patch, "residual": bool(config.get("is_residual", False))}
        for ours, theirs in [
            ("base_dim", "base_dim"),
            ("decoder_base_dim", "decoder_base_dim"),
            ("z_dim", "z_dim"),
            ("dim_mult", "dim_mult"),
            ("num_res_blocks", "num_res_blocks"),
            ("temporal_downsample", "temperal_downsample"),
            ("latents_mean", "latents_mean"),
            ("latents_std", "latents_std"),
        ]:
            if config.get(theirs) is not None:
                kw[ours] = config[theirs]
        cfg = cls(**kw)
        for key, ours in [("scale_factor_spatial", cfg.spatial_factor), ("scale_factor_temporal", cfg.temporal_factor)]:
            if config.get(key) is not None and config[key] != ours:
                raise ValueError(f"diffusers VAE config: {key}={config[key]} contradicts the architecture ({ours})")
        return cfg

    def to_diffusers(self) -> dict:
        """Keyword arguments of ``diffusers.AutoencoderKLWan`` (and its ``config.json``)."""
        return {
            "base_dim": self.base_dim,
            "decoder_base_dim": self.decoder_base_dim,
            "z_dim": self.z_dim,
            "dim_mult": list(self.dim_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_scales": [],
            "temperal_downsample": list(self.temporal_downsample),
            "dropout": 0.0,
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
            "is_residual": self.residual,
            "in_channels": self.image_channels,
            "out_channels": self.image_channels,
            "patch_size": self.patch_size if self.patch_size > 1 else None,
            "scale_factor_temporal": self.temporal_factor,
            "scale_factor_spatial": self.spatial_factor,
        }
