"""`rcm synth --images DIR` (image-to-video teacher samples) and `rcm synth --videos DIR --first-frame`
(videos whose first frame is their given image), docs/i2v.md.

Each prompt gets an image (the i-th image of ``--images`` by name for the i-th prompt, every one of its
``--samples-per-prompt`` samples); the image is fitted to the video size (``rcm.wan.pipeline.fit_frames``)
and turned into the teacher's ``FrameCondition`` (``rcm.models.wan_image.wan_image_condition``), the
teacher samples with it, and the shard stores, with the latent, what training needs to rebuild it
(``rcm.wan.data``): the image itself (uint8), and for DiTs that take it as channels ``y`` and, Wan2.1
I2V, the CLIP tokens. Under frame replacement (TI2V) the sample's first latent frame is the image's.
With ``--videos --first-frame`` each video's first frame is its image, conditioned the way ``--teacher``
takes it (the teacher is read for that only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from rcm import ConfigError, PathArgumentError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: Path, count: int) -> list[Path]:
    """The images of ``folder`` by name, one per prompt (``count`` of them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PathArgumentError("images", f"no folder at {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) != count:
        raise ConfigError("images", f"{folder} holds {len(images)} images ({'/'.join(IMAGE_SUFFIXES)}) for {count} "
                                    f"prompts: one per prompt, the i-th by name for the i-th prompt")
    return images


def images_sha256(paths: list[Path]) -> str:
    """One hash of the images' names and bytes, in order (a changed image is another dataset)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def teacher_files(path: Path) -> list[Path]:
    """The weight files of a teacher: one DiT's, or both experts' of a two-expert folder."""
    from rcm.models import dit_weight_files
    from rcm.models.wan_loading import expert_folders

    folders = expert_folders(path)
    return [f for p in (folders or (path,)) for f in dit_weight_files(p).files]


def synth_image_mode(cfg, config, source: str) -> str | None:
    """The image mode of the dataset `rcm synth` makes ("frame", "channels"; None: text to video)."""
    if source == "videos" and cfg.first_frame:
        if config is None:
            raise ConfigError("teacher", "is required with --first-frame (how the teacher takes the image)")
        return check_image_teacher(config, cfg.vae_path, cfg.image_encoder_path, Path(cfg.videos), "first_frame")
    if cfg.first_frame:
        raise ConfigError("first_frame", "applies to --videos")
    if source != "prompts":
        return None
    return check_image_teacher(config, cfg.vae_path, cfg.image_encoder_path, cfg.images)


def check_image_teacher(config, vae_path: Path | None, image_encoder_path: Path | None, images: Path | None,
                        field: str = "images"):
    """The I2V arguments of `rcm synth` against the teacher and the VAE (headers only): the image mode
    ("frame", "channels") when ``images`` are given, else None (text to video); errors name ``field``."""
    from rcm.models.vae import read_vae_config
    from rcm.wan.pipeline import image_mode

    if images is None:
        if config.cond_dim:
            raise ConfigError(field, f"is required: the teacher is image-to-video ({config.cond_dim} image channels)")
        if image_encoder_path is not None:
            raise ConfigError("image_encoder_path", "applies only with --images")
        return None
    if vae_path is None:
        raise ConfigError("vae_path", "is required to encode the images")
    try:
        vae_config = read_vae_config(vae_path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError("vae_path", str(e)) from e
    mode = image_mode(config, vae_config)
    if mode is None:
        raise ConfigError(field, "the teacher is text-to-video (no image channels, and a Wan2.1 VAE): image to "
                                 "video needs an I2V teacher (Wan2.1 I2V-14B, Wan2.2 I2V-A14B) or Wan2.2 TI2V-5B")
    if (config.image_dim is not None) != (image_encoder_path is not None):
        raise ConfigError("image_encoder_path", "is required: the teacher (Wan2.1 I2V) takes CLIP image tokens"
                          if config.image_dim is not None else "only a teacher with CLIP image cross-attention takes it")
    if vae_config.z_dim != config.out_dim:
        raise ConfigError("vae_path", f"{vae_config.z_dim} latent channels, the teacher generates {config.out_dim}")
    return mode


class ImageConditioner:
    """Images -> (the teacher's ``FrameCondition``, the tensors a shard stores for them)."""

    def __init__(self, config, vae, image_encoder, num_frames: int, latent_dtype: torch.dtype,
                 embed_dtype: torch.dtype):
        self.config, self.vae, self.image_encoder, self.num_frames = config, vae, image_encoder, num_frames
        self.latent_dtype, self.embed_dtype = latent_dtype, embed_dtype

    def __call__(self, images: Tensor) -> tuple:
        """``images [B, 3, H, W]`` in [-1, 1] at the video size (on the device)."""
        from rcm.media import to_uint8
        from rcm.models.wan_image import wan_image_condition

        condition = wan_image_condition(self.config, self.vae, images, self.num_frames, image_encoder=self.image_encoder)
        stored = {"images": to_uint8(images).cpu()}
        inputs = condition.inputs or {}
        if "y" in inputs:
            stored["y"] = inputs["y"].to(self.latent_dtype).cpu()
        if "image_context" in inputs:
            stored["image_context"] = inputs["image_context"].to(self.embed_dtype).cpu()
        return condition, stored


def load_conditioner(cfg, config, *, dtype, device) -> ImageConditioner:
    """The VAE (and CLIP encoder) of `rcm synth` ``cfg``, as the conditioner of ``config``'s DiT."""
    from rcm.models.vae import load_vae

    vae_path, image_encoder_path = cfg.vae_path, cfg.image_encoder_path
    try:
        vae = load_vae(vae_path, dtype=dtype, device=device)
    except ValueError as e:
        raise ConfigError("vae_path", str(e)) from e
    from rcm.wan.sample import open_image_encoder

    encoder = open_image_encoder(image_encoder_path, device)
    return ImageConditioner(config, vae, encoder, cfg.num_frames, getattr(torch, cfg.latent_dtype),
                            getattr(torch, cfg.embed_dtype))
