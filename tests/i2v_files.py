"""Tiny random image-to-video Wan releases on disk, shared by the I2V sampling, synth and distill tests:
a Wan2.1 I2V-14B-style DiT (y channels + CLIP tokens) with its tiny CLIP encoder, a Wan2.2 TI2V-5B-style
DiT (48 channels, the tiny Wan2.2 VAE), a Wan2.2 I2V-A14B-style two-expert folder, a tiny umT5, and an
image."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rcm.models import WanExperts, save_dit, save_wan_experts
from rcm.models.image_encoder import tiny_image_encoder
from rcm.models.text_encoder import tiny_text_encoder
from rcm.models.vae import WanVAE, WanVAEConfig, save_vae
from rcm.models.wan import WanConfig, WanDiT

_BASE = dict(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_len=8, text_dim=32, freq_dim=32)
I2V = WanConfig(**_BASE, in_dim=36, out_dim=16, image_dim=32, image_len=5)  # 4 mask + 16 latent; CLIP 2x2+1 tokens
TI2V = WanConfig(**_BASE, in_dim=48, out_dim=48)  # the Wan2.2 VAE's 48 channels, frame replacement
EXPERT = WanConfig(**_BASE, in_dim=36, out_dim=16)  # Wan2.2 I2V-A14B: y channels, no CLIP
BOUNDARY = 0.9


def random_dit(config: WanConfig, seed: int) -> WanDiT:
    torch.manual_seed(seed)
    dit = WanDiT(config)
    torch.nn.init.normal_(dit.head.head.weight, std=0.05)  # a non-zero velocity
    return dit


def write_image(path: Path, height: int = 40, width: int = 60, seed: int = 0) -> Path:
    """A smooth random RGB image of another size than the videos (so it is fitted)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(128 + 60 * rng.standard_normal((height // 4, width // 4, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).resize((width, height), Image.BILINEAR).save(path)
    return path


def make_i2v_files(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_dit(random_dit(I2V, 0), root / "i2v", layout="diffusers")  # no 'kind': a teacher
    save_dit(random_dit(I2V, 1), root / "i2v_student.safetensors", metadata={"kind": "student"})
    save_dit(random_dit(TI2V, 2), root / "ti2v.safetensors", metadata={"kind": "teacher"})
    save_dit(random_dit(WanConfig(**_BASE), 5), root / "t2v.safetensors")  # text to video (16 channels)
    # experts that differ, so routing matters
    experts = WanExperts(random_dit(EXPERT, 3), random_dit(EXPERT, 4), BOUNDARY)
    save_wan_experts(experts, root / "experts")
    save_wan_experts(experts, root / "experts_student", layout="diffusers", metadata={"kind": "student"})
    save_vae(WanVAE(WanVAEConfig.tiny()), root / "vae", layout="diffusers")
    save_vae(WanVAE(WanVAEConfig.tiny_wan22()), root / "vae22", layout="diffusers")
    tiny_image_encoder(32).model.save_pretrained(root / "clip")
    encoder = tiny_text_encoder(32, text_len=8)
    encoder.model.save_pretrained(root / "umt5")
    encoder.tokenizer.save_pretrained(root / "umt5")
    write_image(root / "first.png")
    return root
