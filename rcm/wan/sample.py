"""`rcm sample wan...`: Wan text-to-video and image-to-video with a teacher or a student.

    rcm sample wan2.1-t2v-1.3b --dit-path rCM_Wan2.1_T2V_1.3B_480p.pt \\
        --vae-path Wan2.1_VAE.pth --text-encoder-path models_t5_umt5-xxl-enc-bf16.pth \\
        --prompt "A cat surfing a wave" --num-steps 4 --num-samples 2 --save-path out.mp4
    rcm sample wan2.2-ti2v-5b --dit-path Wan2.2-TI2V-5B/ --vae-path Wan2.2-TI2V-5B/Wan2.2_VAE.pth \\
        --text-encoder-path ... --prompt "..." --image first.png        # image to video (docs/i2v.md)

Image-to-video (``--image``): the image is scaled to cover the video size (aspect ratio kept) and
centre-cropped (``rcm.wan.pipeline.fit_frames``), then turned into the DiT's ``FrameCondition`` by
``rcm.models.wan_image.wan_image_condition``: ``y`` (mask + VAE latent of "image, then black frames")
and, for Wan2.1 I2V-14B, the CLIP tokens (``--image-encoder-path``); for Wan2.2 TI2V-5B, the image's
latent replaces latent frame 0 (time 0). A two-expert release folder (Wan2.2 A14B, or an rCM two-expert
student) is loaded as ``WanExperts``: each sampling step runs the expert of its time.

The pipeline, in the order that keeps GPU memory lowest: the umT5 encoder is loaded, encodes the prompt
(and the negative prompt, for a guided teacher) and is freed; the DiT is loaded (strict, any layout:
``rcm.models.load_dit``) and samples every latent; it is freed and the VAE decodes them chunk
by chunk (bounded memory). Each sample ``i`` uses seed ``seed + i`` (so one sample can be redone alone)
and is written as ``<save-path stem>_i.mp4`` when there are several. bf16 on CUDA, fp32 on CPU. ``wan``
takes the DiT's architecture from its files (metadata, config.json or shapes): custom sizes, and the
tiny random models of the tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from rich.console import Console

from rcm import ConfigError, check_memory, use_threads
from rcm.media import write_video
from rcm.models.text_encoder import WAN_NEGATIVE_PROMPT
from rcm.sample import SampleResult, SampleSettings, existing_path, numbered
from rcm.timing import progress_bar, sync
from rcm.wan import presets
from rcm.wan.pipeline import decode_videos, image_mode, read_image, resolve_device, sample_wan_latent, video_size

WanSampleModel = Literal["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b",
                         "wan2.2-i2v-a14b", "wan"]
TWO_EXPERT_MODELS = ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b")


@dataclass
class WanSampleConfig(SampleSettings):
    """Sample a Wan teacher or distilled student: text to video, or image to video with --image."""

    model: tyro.conf.Fixed[WanSampleModel] = "wan2.1-t2v-1.3b"
    """a named Wan architecture (wan2.2-*-a14b: per expert); wan: the architecture read from the DiT files."""
    dit_path: Path | None = None
    """DiT: official .safetensors/.pth/sharded folder, diffusers transformer/ folder, or rCM .pt; two experts:
    the folder holding high_noise_model/ + low_noise_model/ (or diffusers transformer/ + transformer_2/)."""
    image: Path | None = None
    """the first frame (PNG, JPEG, ...), scaled to cover the video size and centre-cropped. Required by
    image-to-video DiTs (Wan2.1 I2V-14B, Wan2.2 I2V-A14B); optional for Wan2.2 TI2V-5B; not for T2V DiTs."""
    image_encoder_path: Path | None = None
    """the CLIP image encoder of Wan2.1 I2V-14B (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or a
    transformers image_encoder/ folder); only for DiTs with image cross-attention."""
    vae_path: Path | None = None
    """VAE: Wan2.1_VAE.pth or a diffusers vae/ folder."""
    text_encoder_path: Path | None = None
    """umT5: models_t5_umt5-xxl-enc-bf16.pth, a transformers folder, or a diffusers pipeline root."""
    tokenizer_path: Path | None = None
    """umT5 tokenizer folder; default found next to the text encoder."""
    prompt: str = ""
    """the text to generate a video of."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """teacher CFG negative prompt (Wan's default)."""
    resolution: Literal["480p", "720p"] = "480p"
    """video size: 480p (832x480 at 16:9) or 720p (1280x720)."""
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    """aspect ratio (1:1 is 624x624 / 960x960)."""
    height: int | None = None
    """explicit video height (overrides resolution/aspect-ratio; a multiple of 16)."""
    width: int | None = None
    """explicit video width (overrides resolution/aspect-ratio; a multiple of 16)."""
    num_frames: int = presets.NUM_FRAMES
    """video frames, 1 + 4k."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available; bf16 on CUDA, fp32 on the CPU ."""
    vae_chunk_size: int = 1
    """latent frames per VAE decode chunk (1: Wan's schedule, least memory)."""
    compile: bool = False
    """torch.compile each DiT block (inductor): 4-step 480p sampling 2.08 s instead of 2.92 s on an H100,
    after a one-off compile (docs/benchmarks.md)."""


def _wan_kind(cfg: WanSampleConfig, dit_path: Path) -> str:
    from rcm.models import detect_dit_layout, dit_weight_files, open_state_dict
    from rcm.models.wan_loading import expert_folders

    if cfg.kind != "auto":
        return cfg.kind
    folders = expert_folders(dit_path)  # two experts: the high-noise one speaks for both
    try:
        raw = open_state_dict(dit_weight_files(dit_path if folders is None else folders[0]).files)  # headers only
    except ValueError as e:
        raise ConfigError("dit_path", str(e)) from e
    kind = raw.metadata.get("kind")
    if kind in ("student", "teacher"):
        return kind
    return "student" if detect_dit_layout(raw) == "rcm" else "teacher"


def _check_vae(config, vae_config, height: int, width: int) -> None:
    """The VAE against the DiT and the video size (its latent channels, its spatial factor)."""
    if config.out_dim != vae_config.z_dim:
        raise ConfigError("vae_path", f"the VAE has {vae_config.z_dim} latent channels, the DiT generates {config.out_dim}")
    sf = vae_config.spatial_factor
    if height % (sf * config.patch_size[1]) or width % (sf * config.patch_size[2]):
        raise ConfigError("vae_path", f"its {sf}x spatial factor does not divide {height}x{width} into whole patches")


def _check_image_args(cfg: WanSampleConfig, config, vae_config) -> Literal["channels", "frame"] | None:
    """The image-to-video arguments against the DiT and the VAE (headers only); the mode used, None for T2V.
    ``vae_config`` may be None only without --image for a DiT without image channels."""
    if cfg.image is None and not config.cond_dim:
        return None
    mode = image_mode(config, vae_config)
    if cfg.image is not None and mode is None:
        raise ConfigError("image", "this DiT is text-to-video (no image channels: in_dim == out_dim, and a Wan2.1 "
                                   "VAE): --image needs an I2V DiT (Wan2.1 I2V-14B, Wan2.2 I2V-A14B) or Wan2.2 "
                                   "TI2V-5B with its Wan2.2 VAE")
    if cfg.image is None and mode == "channels":
        raise ConfigError("image", f"is required: this DiT is image-to-video ({config.cond_dim} image channels "
                                   f"concatenated to its input)")
    if cfg.image is not None and config.image_dim is not None and cfg.image_encoder_path is None:
        raise ConfigError("image_encoder_path", "is required: this DiT (Wan2.1 I2V) cross-attends to CLIP image "
                                                "tokens (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)")
    if cfg.image_encoder_path is not None and (cfg.image is None or config.image_dim is None):
        raise ConfigError("image_encoder_path", "only Wan2.1 I2V DiTs (with image cross-attention) sampled with "
                                                "--image take a CLIP image encoder")
    return mode if cfg.image is not None else None


def sample_wan(cfg: WanSampleConfig, console=None) -> SampleResult:
    """`rcm sample wan...`: videos of a Wan teacher or student (see the module docstring); every bad
    argument is a ``ConfigError`` naming its field (a missing path: ``PathArgumentError``)."""
    from rcm.models import load_wan_model, read_dit_config
    from rcm.models.text_encoder import load_text_encoder
    from rcm.models.vae import load_vae, read_vae_config
    from rcm.models.wan import WAN_CONFIGS
    from rcm.models.wan_loading import expert_folders

    console = console or Console()
    dit_path = existing_path("dit_path", cfg.dit_path)
    vae_path = existing_path("vae_path", cfg.vae_path)
    te_path = existing_path("text_encoder_path", cfg.text_encoder_path)
    tok_path = existing_path("tokenizer_path", cfg.tokenizer_path, required=False)
    image_path = existing_path("image", cfg.image, required=False)
    clip_path = existing_path("image_encoder_path", cfg.image_encoder_path, required=False)
    if not cfg.prompt.strip():
        raise ConfigError("prompt", "is required (the text to generate a video of)")
    save_path = cfg.save_path_or("out.mp4", presets.VIDEO_SUFFIXES, f"rcm sample {cfg.model}")
    if (cfg.height is None) != (cfg.width is None):
        raise ConfigError("height" if cfg.height is None else "width", "give both --height and --width, or neither")
    height, width = (cfg.height, cfg.width) if cfg.height is not None else video_size(cfg.resolution, cfg.aspect_ratio)
    if cfg.num_frames < 1 or (cfg.num_frames - 1) % 4:
        raise ConfigError("num_frames", f"must be 1 + 4k (1, 5, ..., 81), got {cfg.num_frames}")
    if cfg.vae_chunk_size < 1:
        raise ConfigError("vae_chunk_size", f"must be >= 1, got {cfg.vae_chunk_size}")
    if cfg.model in TWO_EXPERT_MODELS and expert_folders(dit_path) is None:
        raise ConfigError("dit_path", f"{cfg.model} is two experts: give the folder holding high_noise_model/ + "
                                      f"low_noise_model/ (or diffusers transformer/ + transformer_2/), got {dit_path}")
    kind = _wan_kind(cfg, dit_path)
    cfg.check(kind)
    use_threads("threads", cfg.threads)
    device = resolve_device(cfg.device)
    # sizes against memory before minutes of loading: a decoded video (fp32 RGB) on the device, every
    # sample's latent (16 channels, 4x8x8 smaller) kept on the CPU until the DiT is freed
    video = 4 * 3 * cfg.num_frames * height * width
    check_memory("height", video, f"a decoded video of {cfg.num_frames} frames {height}x{width}", str(device))
    check_memory("num_samples", (cfg.num_samples or 1) * video // 48, f"{cfg.num_samples or 1:,} latents")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        config = WAN_CONFIGS[cfg.model] if cfg.model != "wan" else read_dit_config(dit_path)
    except ValueError as e:
        raise ConfigError("dit_path", str(e)) from e
    for name, size, patch in (("height", height, config.patch_size[1]), ("width", width, config.patch_size[2])):
        if size < 8 * patch or size % (8 * patch):  # the Wan VAE's 8x, then the DiT's patch
            raise ConfigError(name, f"must be a positive multiple of {8 * patch} (VAE 8x times patch {patch}), got {size}")
    try:  # headers only: a wrong DiT file fails here, before minutes of loading umT5-XXL
        load_wan_model(dit_path, config=config, device="meta")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError("dit_path", str(e)) from e
    vae_config = None
    if vae_path.is_file():  # headers only, likewise: a truncated or corrupt VAE file
        from rcm.models import open_state_dict

        try:
            open_state_dict(vae_path)
        except ValueError as e:
            raise ConfigError("vae_path", str(e)) from e
    if cfg.image is not None or config.cond_dim:  # the VAE's family decides the image mode: read it now
        try:
            vae_config = read_vae_config(vae_path)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError("vae_path", str(e)) from e
        _check_vae(config, vae_config, height, width)
    mode = _check_image_args(cfg, config, vae_config)
    image = read_image(image_path, height, width) if mode is not None else None  # an unreadable image fails now
    if clip_path is not None:  # headers only, likewise
        from rcm.models.image_encoder import load_image_encoder

        try:
            load_image_encoder(clip_path, device="meta")
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError("image_encoder_path", str(e)) from e
    num_samples = cfg.num_samples or 1
    guidance = presets.GUIDANCE if cfg.guidance is None else cfg.guidance
    shift = presets.SHIFT if cfg.shift is None else cfg.shift
    steps = presets.TEACHER_STEPS if cfg.steps is None else cfg.steps
    fps = presets.FPS if cfg.fps is None else cfg.fps
    guided = kind == "teacher" and guidance > 1

    # 1. Text: encode, then free the encoder before anything else is on the device.
    t0 = time.perf_counter()
    with console.status("loading the text encoder and encoding the prompt"):
        try:
            encoder = load_text_encoder(te_path, tokenizer_path=tok_path, dtype=dtype, device=device,
                                        text_len=config.text_len)  # fmt: skip
        except ValueError as e:
            raise ConfigError("text_encoder_path", str(e)) from e
        if encoder.dim != config.text_dim:
            raise ConfigError("text_encoder_path", f"its width {encoder.dim} != the DiT's text_dim {config.text_dim}")
        context = encoder.encode([cfg.prompt], dtype=dtype)
        negative = encoder.encode([cfg.negative_prompt], dtype=dtype) if guided else None
        encoder.offload()
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text_seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 2. Weights. The VAE is small (0.25 GB in bf16); it is loaded first to fail early on a bad file. The
    #    image (I2V) is encoded with it (and CLIP, then freed) before the DiT is on the device.
    with console.status("loading the VAE" + (" and encoding the image" if image is not None else "")):
        try:
            vae = load_vae(vae_path, dtype=dtype, device=device)
        except ValueError as e:
            raise ConfigError("vae_path", str(e)) from e
        _check_vae(config, vae.config, height, width)
        t0 = time.perf_counter()
        condition = None if image is None else _image_condition(config, vae, image, cfg.num_frames, clip_path,
                                                                  device, dtype)
        image_seconds = time.perf_counter() - t0
    with console.status("loading the DiT"):
        dit = load_wan_model(dit_path, config=config, dtype=dtype, device=device).eval().requires_grad_(False)
        if cfg.compile:
            from rcm.parallel import compile_blocks

            compile_blocks(dit)
    latent_shape = (1, *vae.config.latent_shape(cfg.num_frames, height, width))
    tokens = math.prod(latent_shape[2:]) // config.patch_numel
    experts = f"two experts (boundary {dit.boundary:g}), " if hasattr(dit, "boundary") else ""
    task_name = {None: "", "channels": ", image to video (image channels)", "frame": ", image to video (first frame given)"}[mode]
    console.print(f"Wan {kind}: {cfg.model}, {experts}{sum(p.numel() for p in dit.parameters()) / 1e6:,.0f}M parameters "
                  f"({dtype}, {device}), {cfg.num_frames} frames {height}x{width} -> latent "
                  f"{list(latent_shape[1:])}, {tokens} tokens{task_name}")  # fmt: skip

    # 3. Sampling: every latent first, so the DiT can be freed before decoding.
    per_sample = cfg.num_steps if kind == "student" else steps
    step_times: list[float] = []
    latents = []
    with progress_bar(console) as progress:
        for i in range(num_samples):
            generator = torch.Generator().manual_seed(cfg.seed + i)
            noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device)
            task = progress.add_task(f"sample {i} ({kind})", total=per_sample)
            sync(device)
            last = [time.perf_counter()]

            def tick(step, _total, task=task, last=last):
                sync(device)
                now = time.perf_counter()
                step_times.append(now - last[0])
                last[0] = now
                progress.update(task, completed=step)

            latents.append(sample_wan_latent(
                dit, context, noise, kind=kind, generator=generator, num_steps=cfg.num_steps,
                sigma_max=cfg.sigma_max, sampler=cfg.sampler, steps=steps, guidance=guidance, shift=shift,
                negative_context=negative, condition=condition, progress=tick).cpu())  # fmt: skip
    del dit
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 4. Decode and write.
    paths, decode_seconds = [], []
    with progress_bar(console) as progress:
        task = progress.add_task("VAE decode", total=num_samples)
        for i, latent in enumerate(latents):
            sync(device)
            t0 = time.perf_counter()
            frames = decode_videos(vae, latent, chunk_size=cfg.vae_chunk_size)[0]
            sync(device)
            decode_seconds.append(time.perf_counter() - t0)
            paths.append(write_video(numbered(save_path, i, num_samples), frames, fps=fps))
            progress.update(task, advance=1)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = SampleResult(
        paths, kind, dit_seconds_per_step=sum(step_times) / max(1, len(step_times)),
        vae_decode_seconds=sum(decode_seconds) / num_samples, peak_memory_gb=peak, text_encode_seconds=text_seconds,
        extra={"tokens": tokens, "latent_shape": list(latent_shape), "height": height, "width": width,
               "image_mode": mode, "image_encode_seconds": round(image_seconds, 3) if mode else None,
               "step_seconds": [round(s, 4) for s in step_times],
               "decode_seconds": [round(s, 3) for s in decode_seconds]})  # fmt: skip
    line = (f"DiT {result.dit_seconds_per_step:.3f} s/step, VAE decode {result.vae_decode_seconds:.2f} s/video, "
            f"text encoding {text_seconds:.1f} s")
    if peak is not None:
        line += f", peak GPU memory after text encoding {peak:.2f} GiB"
    console.print(line)
    console.print("wrote " + ", ".join(map(str, paths)))
    return result




def open_image_encoder(path, device):
    """The CLIP image encoder at ``path`` (None: none); a bad file is an error naming --image-encoder-path."""
    if path is None:
        return None
    from rcm.models.image_encoder import load_image_encoder

    try:
        return load_image_encoder(path, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError("image_encoder_path", str(e)) from e


def _image_condition(config, vae, image, num_frames: int, clip_path, device, dtype):
    """The image's ``FrameCondition`` on ``device`` (the CLIP encoder, Wan2.1 I2V only, loaded and freed
    here); a mismatch between the encoder and the DiT names --image-encoder-path."""
    from rcm.models.wan_image import wan_image_condition

    encoder = open_image_encoder(clip_path, device)
    try:
        condition = wan_image_condition(config, vae, image.to(device=device, dtype=dtype), num_frames,
                                        image_encoder=encoder)
    except ValueError as e:
        raise ConfigError("image_encoder_path" if "image_encoder" in str(e) else "image", str(e)) from e
    finally:
        if encoder is not None:
            encoder.offload()
            del encoder
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return condition
