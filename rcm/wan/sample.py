"""`rcm sample wan...`: Wan text-to-video and image-to-video with a teacher or a student.

    rcm sample wan2.1-t2v-1.3b --dit-path rCM_Wan2.1_T2V_1.3B_480p.pt \\
        --vae-path Wan2.1_VAE.pth --text-encoder-path models_t5_umt5-xxl-enc-bf16.pth \\
        --prompt "A cat surfing a wave" --steps 4 --num-samples 2 --save-path out.mp4
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
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console

from rcm import ConfigError, check_memory, use_threads
from rcm.media import write_video
from rcm.models.text_encoder import WAN_NEGATIVE_PROMPT
from rcm.sample import (DEFAULT_STUDENT_STEPS, SampleResult, SampleSettings, card_student_mid_times, existing_path,
                        numbered)
from rcm.timing import progress_bar, sync
from rcm.wan import presets
from rcm.wan.config import WanSampleConfig, WanSampleModel
from rcm.wan.pipeline import decode_videos, image_mode, read_image, resolve_device, sample_wan_latent, video_size

TWO_EXPERT_MODELS = ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b")


def _wan_kind(kind: str, dit_path: Path) -> str:
    """``kind`` unless "auto": then the DiT's ``kind`` metadata, else its layout (an rCM .pt: a student)."""
    from rcm.models import detect_dit_layout, dit_weight_files, open_state_dict
    from rcm.models.wan_loading import expert_folders

    if kind != "auto":
        return kind
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


def _check_image_args(image, image_encoder_path, config, vae_config) -> Literal["channels", "frame"] | None:
    """The image-to-video arguments against the DiT and the VAE (headers only); the mode used, None for T2V.
    ``vae_config`` may be None only without --image for a DiT without image channels."""
    if image is None and not config.cond_dim:
        return None
    mode = image_mode(config, vae_config)
    if image is not None and mode is None:
        raise ConfigError("image", "this DiT is text-to-video (no image channels: in_dim == out_dim, and a Wan2.1 "
                                   "VAE): --image needs an I2V DiT (Wan2.1 I2V-14B, Wan2.2 I2V-A14B) or Wan2.2 "
                                   "TI2V-5B with its Wan2.2 VAE")
    if image is None and mode == "channels":
        raise ConfigError("image", f"is required: this DiT is image-to-video ({config.cond_dim} image channels "
                                   f"concatenated to its input)")
    if image is not None and config.image_dim is not None and image_encoder_path is None:
        raise ConfigError("image_encoder_path", "is required: this DiT (Wan2.1 I2V) cross-attends to CLIP image "
                                                "tokens (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)")
    if image_encoder_path is not None and (image is None or config.image_dim is None):
        raise ConfigError("image_encoder_path", "only Wan2.1 I2V DiTs (with image cross-attention) sampled with "
                                                "--image take a CLIP image encoder")
    return mode if image is not None else None


class WanPipeline:
    """A Wan teacher or student (``rcm.pipeline.load``): ``generate(prompt)`` -> videos. ``__init__`` checks
    every file (headers only: a wrong file fails before minutes of loading). By default each ``generate``
    loads the text encoder, VAE and DiT in the order that keeps device memory lowest and frees them (see the
    module docstring): right for one call, as `rcm sample` makes. ``keep_loaded``: the first ``generate``
    loads them (and compiles the DiT) and later calls reuse them, all three held on the device at once."""

    family = "wan"

    def __init__(self, dit_path, *, model: str = "wan", device: str = "cpu", kind: str = "auto", vae_path=None,
                 text_encoder_path=None, tokenizer_path=None, image_encoder_path=None, compile: bool = False,
                 keep_loaded: bool = False):
        from rcm.models import load_wan_model, open_state_dict, read_dit_config
        from rcm.models.wan import WAN_CONFIGS
        from rcm.models.wan_loading import expert_folders
        from rcm.sample import read_model_card

        if model not in WanSampleModel.__args__:
            raise ConfigError("model", f"must be one of {', '.join(WanSampleModel.__args__)}, got {model!r}")
        if kind not in ("auto", "student", "teacher"):
            raise ConfigError("kind", f"must be auto, student or teacher, got {kind!r}")
        self.model, self.compile, self.keep_loaded = model, compile, keep_loaded
        self._held: dict = {}  # with keep_loaded: "text", "vae", "dit" once loaded
        self.dit_path = existing_path("dit_path", dit_path)
        self.vae_path = existing_path("vae_path", vae_path)
        self.text_encoder_path = existing_path("text_encoder_path", text_encoder_path)
        self.tokenizer_path = existing_path("tokenizer_path", tokenizer_path, required=False)
        self.image_encoder_path = existing_path("image_encoder_path", image_encoder_path, required=False)
        if model in TWO_EXPERT_MODELS and expert_folders(self.dit_path) is None:
            raise ConfigError("dit_path", f"{model} is two experts: give the folder holding high_noise_model/ + "
                                          f"low_noise_model/ (or diffusers transformer/ + transformer_2/), got {self.dit_path}")
        self.kind = _wan_kind(kind, self.dit_path)
        self.card = read_model_card(self.dit_path, "dit_path")
        self.device = resolve_device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.config = WAN_CONFIGS[model] if model != "wan" else read_dit_config(self.dit_path)
        except ValueError as e:
            raise ConfigError("dit_path", str(e)) from e
        try:  # headers only: a wrong DiT file fails here, before minutes of loading umT5-XXL
            load_wan_model(self.dit_path, config=self.config, device="meta")
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError("dit_path", str(e)) from e
        if self.vae_path.is_file():  # headers only, likewise: a truncated or corrupt VAE file
            try:
                open_state_dict(self.vae_path)
            except ValueError as e:
                raise ConfigError("vae_path", str(e)) from e
        if self.image_encoder_path is not None:  # headers only, likewise
            from rcm.models.image_encoder import load_image_encoder

            try:
                load_image_encoder(self.image_encoder_path, device="meta")
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError("image_encoder_path", str(e)) from e
        self.last_run: dict = {}

    def sampling(self, steps: int | None = None, sigma_max: float | None = None) -> tuple[int, float]:
        """(steps, sigma_max) this pipeline samples with: the arguments, else the model card's, else the Wan
        presets' for its kind."""
        from rcm.sample import sampling_defaults

        student = self.kind == "student"
        return sampling_defaults(
            self.kind, self.card, steps=steps, sigma_max=sigma_max,
            default_steps=DEFAULT_STUDENT_STEPS if student else presets.TEACHER_STEPS,
            default_sigma_max=presets.STUDENT_SIGMA_MAX if student else presets.TEACHER_SIGMA_MAX)  # fmt: skip

    def generate(self, prompt: str, *, steps: int | None = None, seed: int = 0, num_samples: int = 1,
                 sigma_max: float | None = None, mid_times=None, sampler: str | None = None,
                 guidance: float | None = None, shift: float | None = None,
                 negative_prompt: str | None = None, image=None, height: int | None = None,
                 width: int | None = None, resolution: str | None = None, aspect_ratio: str | None = None,
                 num_frames: int = presets.NUM_FRAMES, vae_chunk_size: int = 1, console=None) -> torch.Tensor:
        """Videos ``[num_samples, num_frames, height, width, 3]`` uint8 on the CPU of ``prompt``; sample ``i``
        uses seed ``seed + i``. ``steps``: this sampler's (student 1..4, default 4; teacher default 50);
        ``sigma_max`` and a student's ``mid_times`` default to the model card's, else Wan's. A teacher's
        ``sampler`` (default unipc), ``guidance`` (5), ``shift`` (5) and ``negative_prompt`` (Wan's); ``image``: a first-frame file for
        image to video. Size: ``height`` and ``width``, else ``resolution`` and ``aspect_ratio``. Timings
        and sizes of the call are in ``self.last_run``."""
        from rich.console import Console

        console = console or Console(quiet=True)
        config, device = self.config, self.device
        image_path = existing_path("image", image, required=False)
        if not str(prompt).strip():
            raise ConfigError("prompt", "is required (the text to generate a video of)")
        if (height is None) != (width is None):
            raise ConfigError("height" if height is None else "width", "give both --height and --width, or neither")
        if height is not None and (resolution, aspect_ratio) != (None, None):
            raise ConfigError("resolution" if resolution is not None else "aspect_ratio",
                              "sets the video size, as --height/--width do: give one or the other")
        if height is None:
            height, width = video_size(resolution or "480p", aspect_ratio or "16:9")
        if num_frames < 1 or (num_frames - 1) % 4:
            raise ConfigError("num_frames", f"must be 1 + 4k (1, 5, ..., 81), got {num_frames}")
        if vae_chunk_size < 1:
            raise ConfigError("vae_chunk_size", f"must be >= 1, got {vae_chunk_size}")
        settings = SampleSettings(seed=seed, num_samples=num_samples, steps=steps, sigma_max=sigma_max,
                                  sampler=sampler, guidance=guidance, shift=shift)  # fmt: skip
        settings.check(self.kind)
        steps, sigma_max = self.sampling(steps, sigma_max)
        if self.kind == "student" and mid_times is None:
            mid_times = card_student_mid_times(self.card, steps)
        elif self.kind == "teacher" and mid_times is not None:
            raise ConfigError("mid_times", "applies to a student; this checkpoint is a teacher")
        # sizes against memory before minutes of loading: a decoded video (fp32 RGB) on the device, every
        # sample's latent (16 channels, 4x8x8 smaller) kept on the CPU until the DiT is freed
        video = 4 * 3 * num_frames * height * width
        check_memory("height", video, f"a decoded video of {num_frames} frames {height}x{width}", str(device))
        check_memory("num_samples", num_samples * video // 48, f"{num_samples:,} latents")
        for name, size, patch in (("height", height, config.patch_size[1]), ("width", width, config.patch_size[2])):
            if size < 8 * patch or size % (8 * patch):  # the Wan VAE's 8x, then the DiT's patch
                raise ConfigError(name, f"must be a positive multiple of {8 * patch} (VAE 8x times patch {patch}), got {size}")
        vae_config = None
        if image_path is not None or config.cond_dim:  # the VAE's family decides the image mode: read it now
            from rcm.models.vae import read_vae_config

            try:
                vae_config = read_vae_config(self.vae_path)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError("vae_path", str(e)) from e
            _check_vae(config, vae_config, height, width)
        mode = _check_image_args(image_path, self.image_encoder_path, config, vae_config)
        image = read_image(image_path, height, width) if mode is not None else None  # an unreadable image fails now
        guidance = presets.GUIDANCE if guidance is None else guidance
        if negative_prompt is not None and (self.kind == "student" or guidance <= 1):
            raise ConfigError("negative_prompt", "applies to a guided teacher (CFG, guidance > 1); this is a "
                                                 + ("student" if self.kind == "student" else f"teacher at guidance {guidance:g}"))
        negative_prompt = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        shift = presets.SHIFT if shift is None else shift
        run = dict(kind=self.kind, generator=None, steps=steps, sigma_max=sigma_max, mid_times=mid_times,
                   sampler=settings.sampler or "unipc", guidance=guidance, shift=shift)  # fmt: skip
        return self._run(prompt, negative_prompt, image, mode, num_samples, seed, num_frames, height, width,
                         vae_chunk_size, run, console)

    def _run(self, prompt, negative_prompt, image, mode, num_samples, seed, num_frames, height, width,
             vae_chunk_size, run, console) -> torch.Tensor:
        from rcm.models import load_wan_model
        from rcm.models.text_encoder import load_text_encoder
        from rcm.models.vae import load_vae

        config, device, dtype, kind = self.config, self.device, self.dtype, self.kind
        guided = kind == "teacher" and run["guidance"] > 1

        # 1. Text: encode, then free the encoder before anything else is on the device.
        t0 = time.perf_counter()
        with console.status("loading the text encoder and encoding the prompt"):
            encoder = self._held.get("text")
            if encoder is None:
                try:
                    encoder = load_text_encoder(self.text_encoder_path, tokenizer_path=self.tokenizer_path, dtype=dtype,
                                                device=device, text_len=config.text_len)  # fmt: skip
                except ValueError as e:
                    raise ConfigError("text_encoder_path", str(e)) from e
                if encoder.dim != config.text_dim:
                    raise ConfigError("text_encoder_path", f"its width {encoder.dim} != the DiT's text_dim {config.text_dim}")
            context = encoder.encode([prompt], dtype=dtype)
            negative = encoder.encode([negative_prompt], dtype=dtype) if guided else None
            if self.keep_loaded:
                self._held["text"] = encoder
            else:
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
            vae = self._held.get("vae")
            if vae is None:
                try:
                    vae = load_vae(self.vae_path, dtype=dtype, device=device)
                except ValueError as e:
                    raise ConfigError("vae_path", str(e)) from e
            _check_vae(config, vae.config, height, width)
            t0 = time.perf_counter()
            condition = None if image is None else _image_condition(config, vae, image, num_frames,
                                                                      self.image_encoder_path, device, dtype)
            image_seconds = time.perf_counter() - t0
        dit = self._held.get("dit")
        if dit is None:
            with console.status("loading the DiT"):
                dit = load_wan_model(self.dit_path, config=config, dtype=dtype, device=device).eval().requires_grad_(False)
                if self.compile:
                    from rcm.parallel import compile_blocks

                    compile_blocks(dit)
        if self.keep_loaded:
            self._held |= {"vae": vae, "dit": dit}
        latent_shape = (1, *vae.config.latent_shape(num_frames, height, width))
        tokens = math.prod(latent_shape[2:]) // config.patch_numel
        experts = f"two experts (boundary {dit.boundary:g}), " if hasattr(dit, "boundary") else ""
        task_name = {None: "", "channels": ", image to video (image channels)", "frame": ", image to video (first frame given)"}[mode]
        console.print(f"Wan {kind}: {self.model}, {experts}{sum(p.numel() for p in dit.parameters()) / 1e6:,.0f}M "
                      f"parameters ({dtype}, {device}), {num_frames} frames {height}x{width} -> latent "
                      f"{list(latent_shape[1:])}, {tokens} tokens{task_name}")  # fmt: skip

        # 3. Sampling: every latent first, so the DiT can be freed before decoding.
        step_times: list[float] = []
        latents = []
        with progress_bar(console) as progress:
            for i in range(num_samples):
                generator = torch.Generator().manual_seed(seed + i)
                noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device)
                task = progress.add_task(f"sample {i} ({kind})", total=run["steps"])
                sync(device)
                last = [time.perf_counter()]

                def tick(step, _total, task=task, last=last):
                    sync(device)
                    now = time.perf_counter()
                    step_times.append(now - last[0])
                    last[0] = now
                    progress.update(task, completed=step)

                latents.append(sample_wan_latent(
                    dit, context, noise, **{**run, "generator": generator}, negative_context=negative,
                    condition=condition, progress=tick).cpu())  # fmt: skip
        del dit
        if device.type == "cuda" and not self.keep_loaded:
            torch.cuda.empty_cache()

        # 4. Decode.
        videos, decode_seconds = [], []
        with progress_bar(console) as progress:
            task = progress.add_task("VAE decode", total=num_samples)
            for latent in latents:
                sync(device)
                t0 = time.perf_counter()
                videos.append(decode_videos(vae, latent, chunk_size=vae_chunk_size)[0])
                sync(device)
                decode_seconds.append(time.perf_counter() - t0)
                progress.update(task, advance=1)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        self.last_run = {
            "steps": run["steps"], "sigma_max": run["sigma_max"], "text_encode_seconds": text_seconds,
            "peak_memory_gb": peak, "tokens": tokens, "latent_shape": list(latent_shape), "height": height,
            "width": width, "image_mode": mode, "image_encode_seconds": round(image_seconds, 3) if mode else None,
            "step_seconds": [round(s, 4) for s in step_times], "dit_seconds_per_step": sum(step_times) / max(1, len(step_times)),
            "decode_seconds": [round(s, 3) for s in decode_seconds],
            "vae_decode_seconds": sum(decode_seconds) / num_samples}  # fmt: skip
        return torch.stack(videos)


def sample_wan(cfg: WanSampleConfig, console=None) -> SampleResult:
    """`rcm sample wan...`: videos of a Wan teacher or student (see the module docstring) through
    ``WanPipeline``; every bad argument is a ``ConfigError`` naming its field (a missing path:
    ``PathArgumentError``)."""
    console = console or Console()
    save_path = cfg.save_path_or("out.mp4", presets.VIDEO_SUFFIXES, f"rcm sample {cfg.model}")
    use_threads("threads", cfg.threads)
    resolve_device(cfg.device)  # cuda asked for without CUDA: an error naming --device, before any file is read
    pipe = WanPipeline(cfg.dit_path, model=cfg.model, device=cfg.device, kind=cfg.kind, vae_path=cfg.vae_path,
                       text_encoder_path=cfg.text_encoder_path, tokenizer_path=cfg.tokenizer_path,
                       image_encoder_path=cfg.image_encoder_path, compile=cfg.compile)  # fmt: skip
    cfg.check(pipe.kind)
    num_samples = cfg.num_samples or 1
    videos = pipe.generate(
        cfg.prompt, steps=cfg.steps, seed=cfg.seed, num_samples=num_samples, sigma_max=cfg.sigma_max,
        sampler=cfg.sampler if pipe.kind == "teacher" else None, guidance=cfg.guidance, shift=cfg.shift,
        negative_prompt=cfg.negative_prompt, image=cfg.image, height=cfg.height, width=cfg.width,
        resolution=cfg.resolution, aspect_ratio=cfg.aspect_ratio, num_frames=cfg.num_frames,
        vae_chunk_size=cfg.vae_chunk_size, console=console)  # fmt: skip
    fps = presets.FPS if cfg.fps is None else cfg.fps
    paths = [write_video(numbered(save_path, i, num_samples), frames.numpy(), fps=fps) for i, frames in enumerate(videos)]
    r = pipe.last_run
    result = SampleResult(
        paths, pipe.kind, dit_seconds_per_step=r["dit_seconds_per_step"], vae_decode_seconds=r["vae_decode_seconds"],
        peak_memory_gb=r["peak_memory_gb"], text_encode_seconds=r["text_encode_seconds"],
        extra={k: r[k] for k in ("tokens", "latent_shape", "height", "width", "image_mode", "image_encode_seconds",
                                 "step_seconds", "decode_seconds")})  # fmt: skip
    line = (f"DiT {result.dit_seconds_per_step:.3f} s/step, VAE decode {result.vae_decode_seconds:.2f} s/video, "
            f"text encoding {result.text_encode_seconds:.1f} s")
    if result.peak_memory_gb is not None:
        line += f", peak GPU memory after text encoding {result.peak_memory_gb:.2f} GiB"
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
