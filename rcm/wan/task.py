"""`rcm distill wan2.1-t2v-1.3b | wan2.1-t2v-14b | wan`: Wan as a task of the training engine.

The teacher DiT file, the latents and umT5 embeddings of an `rcm synth` dataset (or the reference's
webdataset tars) as x0 and context, the stored negative-prompt embedding as the CFG negative; EMA-student
samples of fixed prompts during the run; the EMA student exported as one safetensors file for `rcm sample`.
Image to video (docs/i2v.md): an `rcm synth --images` dataset gives each batch its ``FrameCondition``
(frame replacement from the latents' first frame, or the stored ``y`` / CLIP tokens). A two-expert teacher
folder (Wan2.2 A14B) gives a two-expert student and fake score (one per expert, docs/method.md §12.3),
exported as a folder of two DiTs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from rcm import ConfigError
from rcm.checkpoint import atomic_write_bytes
from rcm.train import distill, is_rank0, method_config, start_run
from rcm.wan import presets
from rcm.wan.config import WanDistillConfig
from rcm.models.trigflow import FrameCondition
from rcm.wan.data import LatentBatches, LatentDataset, pad_embeddings, trim_embedding
from rcm import PathArgumentError
from rcm.wan.pipeline import decode_videos, resolve_device, sample_wan_latent


def read_negative_embedding(path: Path) -> Tensor:
    """A negative-prompt embedding file -> ``[length, D]`` (trimmed): our ``negative.safetensors``
    ("embed") or the reference's ``neg_embed_path`` (a ``torch.save``d ``[512, D]`` or ``[1, 512, D]``)."""
    path = Path(path)
    if not path.is_file():
        raise PathArgumentError("negative_embedding", f"no file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            embed = load_file(str(path))["embed"]
        else:
            embed = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, or not what we expect
        raise ConfigError("negative_embedding", f"cannot read {path} ({type(e).__name__}: {e})") from e
    if isinstance(embed, Tensor) and embed.ndim == 3 and embed.shape[0] == 1:
        embed = embed[0]
    if not isinstance(embed, Tensor) or embed.ndim != 2:
        raise ConfigError("negative_embedding", f"{path} must hold a [text_len, dim] tensor")
    return trim_embedding(embed)


class WanTask:
    """Wan2.1 T2V: latents and text embeddings of a dataset (``rcm.wan.data.LatentDataset``), the negative
    prompt's embedding as the CFG negative (the dataset's, or ``negative_embedding``).

    The architecture comes from the teacher file (``config`` overrides). ``dtype``/``device``: where
    ``build_teacher`` puts the teacher. ``rank``/``world``: this process's data-parallel slot (CP ranks
    of a group pass the same one). ``max_frames``: latent frames kept (the 1.3B run: 20 of 21)."""

    def __init__(self, teacher_path: Path, data_path: Path, batch_size: int, seed: int, *, device: torch.device,
                 dtype: torch.dtype = torch.float32, max_frames: int | None = None, config=None,
                 negative_embedding: Path | None = None, need_negative: bool = True, rank: int = 0, world: int = 1,
                 cfg: WanDistillConfig | None = None):
        from rcm.models import read_dit_config
        from rcm.models.wan_loading import expert_folders

        self.teacher_path, self.device, self.dtype, self.cfg = Path(teacher_path), device, dtype, cfg
        self.model_name = cfg.model if cfg is not None else "wan"
        if not self.teacher_path.exists():
            raise PathArgumentError("teacher", f"no such file or folder: {teacher_path}")
        try:
            self.config = config if config is not None else read_dit_config(self.teacher_path)
        except ValueError as e:
            raise ConfigError("teacher", str(e)) from e
        self.experts = expert_folders(self.teacher_path) is not None
        self.dataset = LatentDataset(data_path)
        c, t, h, w = self.dataset.latent_shape
        cfg = self.config
        if c != cfg.out_dim or self.dataset.text_dim != cfg.text_dim:
            raise ConfigError("data", f"latents with {c} channels and text width {self.dataset.text_dim}, the teacher "
                             f"generates {cfg.out_dim} channels and takes text_dim {cfg.text_dim}")
        self.i2v = self.dataset.i2v
        _check_i2v_data(cfg, self.dataset)
        frames = t if max_frames is None else min(t, max_frames)
        if h % cfg.patch_size[1] or w % cfg.patch_size[2] or frames % cfg.patch_size[0]:
            raise ConfigError("data", f"latent {frames}x{h}x{w} is not divisible by the patch {cfg.patch_size}")
        self.latent_shape = (c, frames, h, w)
        negative = read_negative_embedding(negative_embedding) if negative_embedding is not None else self.dataset.negative
        if negative is None and need_negative:
            raise ConfigError("data", f"{data_path} stores no negative-prompt embedding (CFG needs one): pass "
                             f"--negative-embedding, or build the dataset with `rcm synth`")
        if negative is not None and negative.shape[1] != cfg.text_dim:
            raise ValueError(f"the negative-prompt embedding has width {negative.shape[1]}, the teacher's text_dim "
                             f"is {cfg.text_dim}")
        self.negative = None if negative is None else pad_embeddings([negative], cfg.text_len).to(device)
        self.batches = LatentBatches(self.dataset, batch_size, cfg.text_len, seed=seed, max_frames=max_frames,
                                     rank=rank, world=world)

    def build_teacher(self, device: torch.device | str | None = None) -> nn.Module:
        """The teacher on ``device`` (default the task's): one DiT, or ``WanExperts``; "meta": its
        structure only (headers checked)."""
        from rcm.models import load_wan_model

        try:
            return load_wan_model(self.teacher_path, config=self.config, dtype=self.dtype,
                                  device=self.device if device is None else device)
        except ValueError as e:
            raise ConfigError("teacher", str(e)) from e

    def next_batch(self) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, FrameCondition]:
        x0, context, *inputs = next(self.batches)
        x0, context = x0.to(self.device), context.to(self.device)
        if self.i2v is None:
            return x0, context
        return x0, context, self.condition(x0, inputs[0])

    def condition(self, x0: Tensor, inputs: dict[str, Tensor]) -> FrameCondition:
        """The batch's image conditioning: frame replacement by x0's own first latent frame (the image's:
        the causal VAE encodes frame 0 alone), or the stored ``y`` (+ CLIP tokens) as network inputs."""
        from rcm.models.wan_image import first_latent_frame_condition

        if self.i2v == "frame":
            return first_latent_frame_condition(x0)
        return FrameCondition(inputs={k: v.to(self.device) for k, v in inputs.items()})

    def negative_context(self, context: Tensor) -> Tensor:
        if self.negative is None:
            raise ValueError("no negative-prompt embedding: CFG (guidance > 1) needs one")
        return self.negative.expand(context.shape[0], -1, -1)

    def fixed_prompts(self, n: int) -> tuple[Tensor, list[str], FrameCondition | None]:
        """The first ``n`` samples' contexts ``[n, text_len, D]`` (on the device), prompts and image
        conditioning (None for T2V): what the periodic samples show, the same at every point of a run."""
        count = min(n, len(self.dataset))
        samples = [self.dataset[i] for i in range(count)]
        contexts = pad_embeddings([s[1] for s in samples], self.config.text_len).to(self.device)
        condition = None
        if self.i2v is not None:
            frames = self.latent_shape[1]
            x0 = torch.stack([s[0] for s in samples]).float()[:, :, :frames].to(self.device)
            rows = [self.dataset.conditioning(i) for i in range(count)]
            inputs = {k: torch.stack([r[k] for r in rows]).float()[:, :, :frames] if k == "y" else
                      torch.stack([r[k] for r in rows]).float() for k in ("y", "image_context") if k in rows[0]}
            condition = self.condition(x0, inputs)
        return contexts, [s[2] for s in samples], condition

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])


    # ---- the engine's hooks: console line, gathering, periodic samples, export, report

    def describe(self) -> str:
        kind = {None: "", "frame": ", first frame given", "channels": ", image to video"}[self.i2v]
        return (f"{self.model_name}{' (two experts)' if self.experts else ''} on {len(self.dataset)} samples of "
                f"latent {list(self.latent_shape)}{kind}")

    def new_network(self) -> nn.Module:
        from rcm.models import WanExperts
        from rcm.models.wan import WanDiT

        if self.experts:
            return WanExperts(WanDiT(self.config), WanDiT(self.config), self.build_teacher(device="meta").boundary)
        return WanDiT(self.config)

    def network_metadata(self, network: nn.Module) -> dict[str, str]:
        """The architecture (and two experts' boundary) that checkpoints carry, so `rcm export` writes files
        that load without guessing the number of heads from the shapes."""
        import dataclasses

        from rcm.models import WanExperts
        from rcm.models.wan_loading import EXPERT_BOUNDARY_KEY

        meta = {"wan_config": json.dumps(dataclasses.asdict(network.config))}
        if isinstance(network, WanExperts):
            meta[EXPERT_BOUNDARY_KEY] = repr(network.boundary)
        return meta

    def write_samples(self, ema: nn.Module, iteration: int, run_dir: Path, console) -> dict:
        """EMA-student samples of the fixed prompts at each of the sample steps: latents (always) and MP4s
        (with a VAE) under run_dir/samples/. Collective under FSDP (every rank samples, rank 0 writes)."""
        from safetensors.torch import save

        from rcm.media import write_video

        cfg = self.cfg
        if cfg is None or not cfg.num_sample_prompts:
            return {}
        contexts, prompts, condition = self.fixed_prompts(cfg.num_sample_prompts)
        device = contexts.device
        start = time.perf_counter()
        latents = {}
        for steps in cfg.sample_steps:
            noise = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(i))
                                 for i in range(len(prompts))]).to(device)
            generator = torch.Generator(device=device).manual_seed(0)
            latents[steps] = sample_wan_latent(ema, contexts, noise, kind="student", generator=generator,
                                               steps=steps, sigma_max=cfg.sigma_max, condition=condition).cpu()
        record = {"iteration": iteration, "prompts": prompts, "seconds": 0.0, "files": []}
        images = {}  # each video's middle frame, for the run's log sinks
        if is_rank0():
            folder = run_dir / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"iter_{iteration:08d}.safetensors"
            atomic_write_bytes(path, save({f"{n}step": x.contiguous() for n, x in latents.items()},
                                          metadata={"prompts": json.dumps(prompts), "iteration": str(iteration)}))
            record["files"].append(path.name)
            vae = self.load_vae()
            if vae is not None:
                for n, x in latents.items():
                    for i, video in enumerate(decode_videos(vae, x)):
                        mp4 = write_video(folder / f"iter_{iteration:08d}_{n}step_{i}.mp4", video, fps=presets.FPS)
                        record["files"].append(mp4.name)
                        images[f"{n}step_{i}"] = video[len(video) // 2]
            record["seconds"] = round(time.perf_counter() - start, 3)
            with open(folder / "samples.jsonl", "a") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            console.print(f"samples at iteration {iteration} → {folder} ({len(record['files'])} files, "
                          f"{record['seconds']:.1f} s)")
        return {**record, "images": images}

    def load_vae(self):
        """The VAE of the periodic samples, loaded once (rank 0), or None without --vae-path."""
        if getattr(self, "_vae_model", None) is None and self.cfg is not None and self.cfg.vae_path is not None:
            from rcm.models.vae import load_vae

            try:
                self._vae_model = load_vae(self.cfg.vae_path, dtype=self.dtype, device=self.device)
            except ValueError as e:
                raise ConfigError("vae_path", str(e)) from e
        return getattr(self, "_vae_model", None)

    def export(self, ema: nn.Module, path: Path, metadata: dict) -> Path:
        """One safetensors file; a two-expert student as a folder ``<stem>/`` (official layout:
        ``high_noise_model/`` + ``low_noise_model/``, the boundary recorded) that `rcm sample` loads."""
        import shutil

        from rcm.models import WanExperts, save_dit, save_wan_experts

        dtype = getattr(torch, self.cfg.export_dtype) if self.cfg is not None else torch.bfloat16
        export = ema.to(device="cpu", dtype=dtype)  # the run is over: no copy needed
        metadata = {**metadata, "teacher": str(self.teacher_path)}
        if isinstance(export, WanExperts):
            folder, tmp = path.with_suffix(""), path.with_name(f".{path.stem}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_wan_experts(export, tmp, metadata=metadata)
            shutil.rmtree(folder, ignore_errors=True)  # a crash between these leaves the complete .tmp folder
            os.replace(tmp, folder)
            return folder
        save_dit(export, path, metadata=metadata)  # atomic (never half a file)
        return path

    def card(self, summary: dict) -> dict:
        """The model card's facts (``rcm.checkpoint.card``): the teacher and the few-step sampler settings
        the periodic samples use (the reference's mid-times); no metrics (the Wan run has no report)."""
        from rcm.samplers.schedules import DEFAULT_MID_TIMES

        cfg = self.cfg
        sigma_max = presets.STUDENT_SIGMA_MAX if cfg is None else cfg.sigma_max
        steps = (1, 2, 4) if cfg is None else cfg.sample_steps
        teacher = None if cfg is None or cfg.teacher is None else str(cfg.teacher)
        return {"family": "wan", "teacher": teacher, "metrics": {},
                "sampling": {"steps": max(steps), "sigma_max": sigma_max, "evaluated_steps": list(steps),
                             "mid_times": {n: DEFAULT_MID_TIMES[: n - 1] for n in range(1, len(DEFAULT_MID_TIMES) + 2)}}}

    def report(self, teacher: nn.Module, ema: nn.Module, run_dir: Path, console) -> dict:
        return {}  # the periodic samples (and the final ones) are the report


def _check_i2v_data(config, dataset: LatentDataset) -> None:
    """The dataset's image conditioning against the teacher's (docs/i2v.md)."""
    mode, keys = dataset.i2v, set(dataset.shards[0].conditioning_keys) if dataset.i2v else set()
    if config.cond_dim and mode != "channels":
        raise ConfigError("data", f"the teacher is image-to-video ({config.cond_dim} image channels): the dataset must "
                                  f"hold each sample's image conditioning (`rcm synth --images`), it is "
                                  f"{'text-to-video' if mode is None else mode + ' (frame replacement)'}")
    if mode == "channels" and not config.cond_dim:
        raise ConfigError("data", "an image-to-video dataset for image channels (y), the teacher takes none")
    if mode == "channels" and (config.image_dim is not None) != ("image_context" in keys):
        raise ConfigError("data", "the teacher takes CLIP image tokens, the dataset has none" if config.image_dim
                          else "the dataset has CLIP image tokens, the teacher takes none")


def distill_wan(cfg: WanDistillConfig) -> dict:
    """Run (or resume) a Wan distillation, with periodic samples, then export the EMA student as one
    safetensors file that `rcm sample wan --dit-path <file>` loads. Returns a summary dict."""
    from rcm.models import load_dit
    from rcm.models.wan import WAN_CONFIGS

    for name in ("teacher", "data"):
        if getattr(cfg, name) is None:
            raise ConfigError(name, f"is required for rcm distill {cfg.model}")
    if cfg.compile and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("compile", "is not yet supported under torchrun (untested with FSDP2); drop it")
    run = start_run(cfg, resolve_device(cfg.device))  # under torchrun: each rank's own device
    # Compute dtype: bf16 on CUDA with fp32 master weights (init_state); FSDP2's policy does it when sharded.
    if run.mesh is not None or cfg.precision == "float32" or (cfg.precision == "auto" and run.device.type != "cuda"):
        dtype = torch.float32
    else:
        dtype = torch.bfloat16
    named = WAN_CONFIGS[cfg.model] if cfg.model != "wan" else None
    if named is not None:
        try:  # headers only: a teacher of another size fails here, listing the mismatches
            load_dit(cfg.teacher, config=named, device="meta")
        except ValueError as e:
            raise ConfigError("teacher", f"not a {cfg.model} checkpoint: {e}") from e
    loss = method_config(cfg.method, cfg.loss)
    guided = (loss.scm.loss_scale > 0 and loss.scm.guidance > 1) or (loss.dmd_enabled and loss.dmd.guidance > 1)
    task = WanTask(cfg.teacher, cfg.data, cfg.batch_size, cfg.loop.seed, device=run.device, dtype=dtype,
                   max_frames=cfg.max_latent_frames, config=named, negative_embedding=cfg.negative_embedding,
                   need_negative=guided, rank=run.dp_rank, world=run.dp_size, cfg=cfg)
    if is_rank0():
        task.load_vae()  # now: a bad --vae-path fails before training, not at the first samples
    return distill(task, cfg, run)
