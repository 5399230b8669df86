"""Every Wan command's config, as plain dataclasses that import no torch: `rcm distill wan…` (with the per-size
presets and the defaults table its help shows), `rcm sample wan…` and `rcm synth`. A command's help builds these
without torch; the code of each command lives in task.py, sample.py and synth.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import tyro

from rcm import ConfigError, PathArgumentError
from rcm.losses.config import RCMConfig
from rcm.models.wan_text import TEXT_LEN, WAN_NEGATIVE_PROMPT
from rcm.parallel.config import ParallelConfig
from rcm.sample import MAX_STUDENT_STEPS, SampleSettings
from rcm.train.config import DistillConfig, LoopConfig, OptimizerConfig
from rcm.wan import presets

WanModel = Literal["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan"]


_D = presets.DISTILL["wan2.1-t2v-1.3b"]  # the field defaults: the 1.3B recipe


@dataclass
class WanDistillConfig(DistillConfig):
    """rCM distillation of a Wan2.1 T2V teacher on a latent dataset (`rcm synth`). Defaults: the reference's
    recipe for this size (docs/method.md §5.1). bf16 compute with fp32 master weights on CUDA, fp32 on the
    CPU; under torchrun FSDP2 (+ CP, activation checkpointing: --parallel.*). Re-running resumes."""

    model: tyro.conf.Fixed[WanModel] = "wan2.1-t2v-1.3b"
    """the architecture (wan: read from the teacher file, with the 1.3B recipe)."""
    teacher: Path | None = None
    """the teacher DiT: official / diffusers / rCM layout, or a two-expert folder (Wan2.2 A14B) (required)."""
    data: Path | None = None
    """the dataset: an `rcm synth` folder (`--images`: image to video), or a folder of the reference's
    webdataset tars (required)."""
    max_latent_frames: int = _D["max_latent_frames"]
    """latent frames trained on (the reference's state_t: 20 for 1.3B, 21 for 14B); shorter data is used whole."""
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(iterations=_D["iterations"],
                                                                checkpoint_every=_D["checkpoint_every"]))
    loss: RCMConfig = field(default_factory=lambda: _D["loss"])
    student_optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=_D["student_lr"]))
    critic_optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=_D["critic_lr"]))
    sigma_max: float = _D["sigma_max"]
    """σ_max of the student's few-step sampler (periodic samples; 80 for 1.3B, 200 for 14B)."""
    sample_every: int = _D["sample_every"]
    """write EMA-student samples every this many iterations (and at the end); 0: only at the end."""
    sample_steps: tuple[int, ...] = (1, 2, 4)
    """student steps of the periodic samples."""
    num_sample_prompts: int = 2
    """the dataset's first prompts, sampled each time."""
    vae_path: Path | None = None
    """the Wan VAE: decode the periodic samples to MP4 (without it only their latents are written)."""
    negative_embedding: Path | None = None
    """the CFG negative-prompt embedding (default: the dataset's; the reference's neg_embed .pt works)."""
    precision: Literal["auto", "bfloat16", "float32"] = "auto"
    """network compute dtype: auto = bf16 on CUDA (fp32 master weights), fp32 on the CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available; under torchrun, each rank's GPU."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of the exported EMA student (the released rCM students are bf16)."""
    compile: bool = False
    """torch.compile each DiT block (inductor; the JVP pass stays eager): 1.33x faster 1.3B student iterations
    on an H100 (docs/benchmarks.md). One process only for now."""
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(activation_checkpointing=True))
    """used when launched by torchrun (activation checkpointing applies to one process too)."""

    NOT_FINGERPRINTED: ClassVar[tuple[str, ...]] = (
        *DistillConfig.NOT_FINGERPRINTED, "device", "sample_steps", "num_sample_prompts", "vae_path", "export_dtype",
        "compile")

    def __post_init__(self):
        super().__post_init__()
        if self.max_latent_frames < 1:
            raise ConfigError("max_latent_frames", f"must be >= 1, got {self.max_latent_frames}")
        if not self.sigma_max > 0:
            raise ConfigError("sigma_max", f"must be > 0, got {self.sigma_max}")
        if self.num_sample_prompts < 0:
            raise ConfigError("num_sample_prompts", f"must be >= 0, got {self.num_sample_prompts}")
        if not self.sample_steps or any(not 1 <= n <= MAX_STUDENT_STEPS for n in self.sample_steps):
            raise ConfigError("sample_steps", f"must be student step counts in 1..{MAX_STUDENT_STEPS}, "
                                              f"got {self.sample_steps}")
        for name in ("teacher", "data", "vae_path", "negative_embedding"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise PathArgumentError(name, f"no such file or folder: {path}")


def distill_preset(model: str) -> WanDistillConfig:
    """The reference's recipe for a size (docs/method.md §5.1), from ``presets.DISTILL``."""
    if model not in presets.DISTILL:
        raise ConfigError("model", f"must be one of {', '.join(presets.DISTILL)}; got {model!r}")
    d = presets.DISTILL[model]
    return WanDistillConfig(model=model, loss=d["loss"], max_latent_frames=d["max_latent_frames"],
                            loop=LoopConfig(iterations=d["iterations"], checkpoint_every=d["checkpoint_every"]),
                            student_optim=OptimizerConfig(lr=d["student_lr"]),
                            critic_optim=OptimizerConfig(lr=d["critic_lr"]), sigma_max=d["sigma_max"],
                            sample_every=d["sample_every"])


WAN_DISTILL_PRESETS: dict[str, WanDistillConfig] = {m: distill_preset(m) for m in presets.WAN_MODELS}


def _time_dist(d) -> str:
    if hasattr(d, "p_mean"):
        return f"LogNormal({d.p_mean:g}, {d.p_std:g})"
    return f"UniformShift({d.shift:g})"


def wan_defaults_table() -> str:
    """The per-size defaults of `rcm distill wan2.1-*`, rendered from ``WAN_DISTILL_PRESETS`` (so the help
    text and docs cannot drift from what runs)."""
    sizes = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
    p = [WAN_DISTILL_PRESETS[s] for s in sizes]
    rows = [
        ("student LR / fake-score LR", lambda c: f"{c.student_optim.lr:g} / {c.critic_optim.lr:g}"),
        ("Adam betas, weight decay, eps", lambda c: f"({c.student_optim.betas[0]:g}, {c.student_optim.betas[1]:g}), "
                                                    f"{c.student_optim.weight_decay:g}, {c.student_optim.eps:g}"),
        ("LR warmup (linear from 1e-6)", lambda c: f"{c.student_optim.warmup} steps"),
        ("batch per data-parallel rank", lambda c: str(c.batch_size)),
        ("loss scale sCM / DMD", lambda c: f"{c.loss.scm.loss_scale:g} / {c.loss.dmd.loss_scale:g}"),
        ("p_G / p_D", lambda c: f"{_time_dist(c.loss.scm.time_dist)} / {_time_dist(c.loss.dmd.time_dist)}"),
        ("teacher CFG (sCM / DMD)", lambda c: f"{c.loss.scm.guidance:g} / {c.loss.dmd.guidance:g}"),
        ("tangent warmup", lambda c: str(c.loss.scm.tangent_warmup)),
        ("student update freq", lambda c: str(c.loss.student_update_freq)),
        ("max simulation steps (fake)", lambda c: str(c.loss.dmd.max_simulation_steps)),
        ("latent frames (state_t)", lambda c: str(c.max_latent_frames)),
        ("sigma_max (sampling)", lambda c: f"{c.sigma_max:g}"),
        ("EMA", lambda c: f"power, sigma_rel {c.ema_sigma_rel:g}"),
        ("max_iter, checkpoint every", lambda c: f"{c.loop.iterations:,}, {c.loop.checkpoint_every}"),
        ("activation checkpointing", lambda c: "on" if c.parallel.activation_checkpointing else "off"),
        ("FSDP shard / CP (reference)", lambda c: presets.REFERENCE_SHARDING[c.model]),
        ("grad clip", lambda c: "off"),
        ("optimizer", lambda c: "AdamW, fp32 master weights"),
    ]
    lines = [f"| | {sizes[0]} | {sizes[1]} |", "|---|---|---|"]
    lines += [f"| {name} | {f(p[0])} | {f(p[1])} |" for name, f in rows]
    return "\n".join(lines)


WanSampleModel = Literal["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b",
                         "wan2.2-i2v-a14b", "wan"]


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
    negative_prompt: str | None = None
    """a guided teacher's CFG negative prompt (default Wan's); an error with a student or at guidance <= 1."""
    resolution: Literal["480p", "720p"] | None = None
    """video size: 480p (832x480 at 16:9; the default) or 720p (1280x720); an error with --height/--width."""
    aspect_ratio: Literal["16:9", "9:16", "1:1"] | None = None
    """aspect ratio (default 16:9; 1:1 is 624x624 / 960x960); an error with --height/--width."""
    height: int | None = None
    """explicit video height (in place of --resolution/--aspect-ratio; a multiple of 16)."""
    width: int | None = None
    """explicit video width (in place of --resolution/--aspect-ratio; a multiple of 16)."""
    num_frames: int = presets.NUM_FRAMES
    """video frames, 1 + 4k."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available; bf16 on CUDA, fp32 on the CPU ."""
    vae_chunk_size: int = 1
    """latent frames per VAE decode chunk (1: Wan's schedule, least memory)."""
    compile: bool = False
    """torch.compile each DiT block (inductor): 4-step 480p sampling 2.08 s instead of 2.92 s on an H100,
    after a one-off compile (docs/benchmarks.md)."""


@dataclass
class SynthConfig:
    """Write a Wan latent dataset (latents + umT5 embeddings + prompts, in shards) for `rcm distill`."""

    out_dir: Path
    """the dataset folder (created; re-running the same command finishes an interrupted run)."""
    prompts: Path | None = None
    """prompt list: .txt (one per line) or .jsonl ("prompt" key); with --teacher: teacher samples; with
    --videos: the prompts of the videos in name order (when there is no .txt beside a video)."""
    videos: Path | None = None
    """a folder of .mp4/.gif videos to encode with the VAE (--vae-path)."""
    latents: Path | None = None
    """existing latents to re-shard: a folder of the reference's webdataset tars or an rcm synth dataset."""
    teacher: Path | None = None
    """the teacher DiT (any layout `rcm sample` reads, or a two-expert folder) that samples the --prompts."""
    images: Path | None = None
    """image to video: a folder of first frames, the i-th by name for the i-th prompt (needs --vae-path; an I2V
    or TI2V teacher); each is scaled to cover the video size and centre-cropped."""
    image_encoder_path: Path | None = None
    """the CLIP image encoder, for a Wan2.1 I2V teacher with --images or --first-frame."""
    first_frame: bool = False
    """with --videos: image to video, each video's first frame its given image, as --teacher takes it."""
    text_encoder_path: Path | None = None
    """umT5 (official .pth, transformers folder or pipeline root)."""
    tokenizer_path: Path | None = None
    """umT5 tokenizer folder; default found next to the text encoder."""
    vae_path: Path | None = None
    """the Wan VAE, for --videos and --images (and the latent size of a Wan2.2-VAE teacher)."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """the CFG negative prompt (Wan's default), sampled against and stored for training."""
    num_frames: int = presets.NUM_FRAMES
    """video frames, 1 + 4k (81: 21 latent frames)."""
    height: int = presets.WAN_SIZES["480p"]["16:9"][0]
    """video height, a multiple of 16."""
    width: int = presets.WAN_SIZES["480p"]["16:9"][1]
    """video width, a multiple of 16."""
    sampler: Literal["euler", "unipc"] = presets.SYNTH_SAMPLER
    """teacher sampler (the released data: Euler)."""
    steps: int = presets.SYNTH_STEPS
    """teacher sampling steps."""
    shift: float = presets.SYNTH_SHIFT
    """schedule shift."""
    guidance: float = presets.GUIDANCE
    """CFG weight against the negative prompt (> 1 guides)."""
    sigma_max: float = presets.TEACHER_SIGMA_MAX
    """starting noise level."""
    samples_per_prompt: int = 1
    """teacher samples per prompt (different noise)."""
    seed: int = 0
    """sample i uses noise seeded seed + i."""
    shard_size: int = 16
    """samples per shard file."""
    batch_size: int = 1
    """samples per teacher forward."""
    text_len: int = TEXT_LEN
    """umT5 tokens kept when there is no --teacher to take it from (Wan: 512)."""
    latent_dtype: Literal["float32", "bfloat16"] = "float32"
    """storage dtype of the latents."""
    embed_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """storage dtype of the text embeddings (umT5 runs in bf16 in Wan)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available (bf16 there, fp32 on the CPU); under torchrun, this rank's GPU."""
    threads: int = 0
    """torch.set_num_threads; 0 keeps torch's default."""
