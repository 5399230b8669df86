"""``rcm synth``: build the distillation data for Wan2.1 (docs/method.md §5.5).

    rcm synth --prompts prompts.txt --teacher Wan2.1-T2V-1.3B/ --text-encoder-path models_t5_umt5-xxl-enc-bf16.pth \\
        --out-dir data/wan-1.3b                        # teacher samples: Euler 100 steps, shift 3, CFG 5, σ_max 5000
    torchrun --nproc-per-node 8 -m rcm synth ...       # the same, shards spread over 8 GPUs
    rcm synth --videos clips/ --vae-path Wan2.1_VAE.pth --text-encoder-path ... --out-dir data/clips
    rcm synth --latents reference_tars/ --text-encoder-path ... --out-dir data/ref   # re-shard existing latents
    rcm synth --prompts p.txt --images firsts/ --teacher I2V_DIT --vae-path VAE ... # image to video (docs/i2v.md)

Sources (exactly one): a prompt list (``.txt``, one prompt a line, or ``.jsonl`` with a "prompt" key),
sampled by the teacher with the flow sampler and CFG against Wan's negative prompt; a folder of videos
(``.mp4``/``.gif``, centre-cropped and resized, encoded with the VAE; the prompt of ``clip.mp4`` is
``clip.txt`` beside it, or line i of ``--prompts`` for the i-th video by name); or existing latents (the
reference's webdataset tars, or another ``rcm synth`` dataset). The layout written is in ``rcm.wan.data``
(``LatentDataset`` reads it, and reads the reference's tars directly too).

The prompts are encoded with umT5 once (the encoder is freed before the teacher is loaded), the negative
prompt too, stored once, so training needs no umT5. Sample ``i`` uses noise seeded ``seed + i``, so the
data does not depend on how the work is split. Shards are the unit of work: each is written atomically
(temporary file, then rename), so a crash loses at most the shards in progress and a re-run skips the
finished ones; under ``torchrun`` rank r writes shards r, r + world, ...; rank 0 writes ``index.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from rcm import MAX_SAMPLING_STEPS, ConfigError, PathArgumentError, check_count, check_memory, check_seed, check_threads
from rcm.checkpoint import atomic_write_bytes
from rcm.timing import progress_bar
from rcm.wan.config import SynthConfig
from rcm.wan.data import INDEX_NAME, LATENT_FORMAT, NEGATIVE_NAME, LatentDataset, encode_shard, trim_embedding
from rcm.wan.pipeline import resolve_device
from rcm.wan.synth_inputs import file_sha256, list_videos, read_prompts, read_video  # noqa: F401 (read_video: public here too)


def _check(cfg: SynthConfig) -> str:
    """Validates the arguments; returns the source kind ("prompts", "videos" or "latents")."""
    sources = [n for n in ("videos", "latents") if getattr(cfg, n) is not None]
    if len(sources) > 1:
        raise ValueError("give one source: --prompts with --teacher, --videos, or --latents")
    source = sources[0] if sources else "prompts"
    if source == "prompts" and cfg.prompts is None:
        raise ValueError("no source: give --prompts (with --teacher), --videos (with --vae-path) or --latents")
    if source == "latents" and cfg.prompts is not None:
        raise ConfigError("prompts", "does not apply to --latents (the prompts come with the latents)")
    if source != "prompts" and cfg.images is not None:
        raise ConfigError("images", "applies to --prompts with an image-to-video --teacher")
    for name in ("prompts", "teacher", "text_encoder_path", "tokenizer_path", "vae_path", "image_encoder_path"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).exists():
            raise PathArgumentError(name, f"no such file or folder: {path}")
    for name in ("videos", "latents"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).is_dir():
            raise PathArgumentError(name, f"no folder at {path}")
    if source == "prompts" and cfg.teacher is None:
        raise ConfigError("teacher", "is required to sample the --prompts")
    if source == "videos" and cfg.vae_path is None:
        raise ConfigError("vae_path", "is required to encode --videos")
    if source != "latents" and cfg.text_encoder_path is None:
        raise ConfigError("text_encoder_path", "is required to encode the prompts")
    if source != "latents":
        if cfg.num_frames < 1 or (cfg.num_frames - 1) % 4:
            raise ConfigError("num_frames", f"must be 1 + 4k (1, 5, ..., 81), got {cfg.num_frames}")
        for name in ("height", "width"):
            size = getattr(cfg, name)
            if size < 16 or size % 16:
                raise ConfigError(name, f"must be a positive multiple of 16 (VAE 8x times patch 2), got {size}")
    check_count("steps", cfg.steps, 1, MAX_SAMPLING_STEPS)
    for name in ("samples_per_prompt", "shard_size", "batch_size", "text_len"):
        check_count(name, getattr(cfg, name), 1, 2**31 - 1)
    check_seed("seed", cfg.seed)
    check_threads("threads", cfg.threads)
    if source != "latents":  # the first big tensor: a batch of fp32 latents (16 channels, 4x8x8 smaller)
        latent = 16 * (1 + (cfg.num_frames - 1) // 4) * (cfg.height // 8) * (cfg.width // 8) * 4
        check_memory("batch_size" if cfg.batch_size > 1 else "height", cfg.batch_size * latent,
                     f"{cfg.batch_size} latent(s) of {cfg.num_frames} frames {cfg.height}x{cfg.width}")
    for name in ("shift", "sigma_max"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise ConfigError(name, f"must be a finite number > 0, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.guidance) and cfg.guidance >= 0):
        raise ConfigError("guidance", f"must be a finite number >= 0, got {cfg.guidance}")
    return source


def _text_encoder_width(path: Path) -> int | None:
    """umT5's width from its files' headers (config.json or the embedding's shape), None if not found:
    a mismatch with the teacher then fails before minutes of loading umT5-XXL."""
    path = Path(path)
    if path.is_dir():
        for c in (path / "text_encoder" / "config.json", path / "config.json"):
            if c.is_file():
                return json.loads(c.read_text()).get("d_model")
        return None
    from rcm.models import open_state_dict

    try:
        emb = open_state_dict(path).get("token_embedding.weight")
    except ValueError as e:
        raise ConfigError("text_encoder_path", str(e)) from e
    return None if emb is None else emb.shape[1]


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _shard_state(path: Path, settings_hash: str) -> bool:
    """True if ``path`` is a complete shard of these settings, False if absent or unreadable (rewritten);
    a complete shard of other settings is an error."""
    from rcm.models import open_state_dict

    if not path.is_file():
        return False
    try:
        meta = open_state_dict(path).metadata
    except ValueError:
        return False
    if meta.get("settings_hash") != settings_hash:
        raise ConfigError("out_dir", f"{path} was written with other settings (or inputs); use another --out-dir")
    return True


def synth(cfg: SynthConfig) -> dict:
    """Write (or finish writing) the dataset; returns a summary (shards written by this rank, paths).
    The dataset folder is claimed first (rank 0 under torchrun): one writer, no one else's files."""
    from rcm.checkpoint.run_folder import claimed_folder

    _check(cfg)  # a bad invocation writes nothing
    _dist()
    with claimed_folder(cfg.out_dir, "synth", legacy=(INDEX_NAME, _shard_name(0))):
        return _synth(cfg)


def _synth(cfg: SynthConfig) -> dict:
    from rich.console import Console

    source = _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = _dist()
    console = Console(quiet=rank != 0)
    out = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    # -- what to make: items in sample order, and the settings that define them --
    config = None
    if cfg.teacher is not None:
        from rcm.models import read_dit_config

        try:
            config = read_dit_config(cfg.teacher)
        except ValueError as e:
            raise ConfigError("teacher", str(e)) from e
    text_len = config.text_len if config is not None else cfg.text_len
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                if k not in ("out_dir", "device", "threads", "batch_size", "teacher", "text_encoder_path",
                             "tokenizer_path", "vae_path", "prompts", "videos", "latents", "images",
                             "image_encoder_path", "first_frame")}  # (the i2v mode is recorded when set)
    settings.update(source=source, text_len=text_len)
    i2v = None  # the image mode of an image-to-video dataset
    if source == "prompts":
        from rcm.wan.synth_i2v import images_sha256, list_images, synth_image_mode, teacher_files

        prompts = read_prompts(Path(cfg.prompts))
        i2v = synth_image_mode(cfg, config, source)
        images = list_images(cfg.images, len(prompts)) if i2v else [None] * len(prompts)
        items = [(p, cfg.seed + i, im) for i, (p, im) in enumerate(
            x for x in zip(prompts, images) for _ in range(cfg.samples_per_prompt))]
        settings["teacher_sha256"] = file_sha256(teacher_files(Path(cfg.teacher)))
        settings["prompts_sha256"] = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
        if i2v:
            settings.update(i2v=i2v, images_sha256=images_sha256(images))
        if not i2v and config.in_dim != 16:
            raise ConfigError("teacher", f"has in_dim {config.in_dim}; Wan2.1 latents have 16 channels")
    elif source == "videos":
        from rcm.wan.synth_i2v import synth_image_mode

        items = list_videos(cfg)
        settings["videos"] = [(v.name, p) for v, p in items]
        settings.update({"i2v": i2v} if (i2v := synth_image_mode(cfg, config, source)) else {})
    else:
        src = LatentDataset(cfg.latents)
        items = list(range(len(src)))
        settings["latents"] = {"path": str(Path(cfg.latents).resolve()), "size": len(src), "shape": src.latent_shape}
        for k in ("num_frames", "height", "width", "sampler", "steps", "shift", "guidance", "sigma_max",
                  "samples_per_prompt", "seed"):
            settings.pop(k)
        if config is not None and src.text_dim != config.text_dim:
            raise ConfigError("latents", f"text width {src.text_dim} != the teacher's text_dim {config.text_dim}")
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    if config is not None and cfg.text_encoder_path is not None:
        width = _text_encoder_width(cfg.text_encoder_path)
        if width is not None and width != config.text_dim:
            raise ConfigError("text_encoder_path", f"its width {width} != the teacher's text_dim {config.text_dim}")

    index_path = out / INDEX_NAME
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        if old.get("settings_hash") != settings_hash:
            raise ConfigError("out_dir", f"{out} holds a dataset made with other settings or inputs; use another --out-dir")
    num_shards = math.ceil(len(items) / cfg.shard_size)
    shards = [items[s * cfg.shard_size : (s + 1) * cfg.shard_size] for s in range(num_shards)]
    out.mkdir(parents=True, exist_ok=True)
    mine = [s for s in range(num_shards) if s % world == rank]
    pending = [s for s in mine if not _shard_state(out / _shard_name(s), settings_hash)]
    negative_path = out / NEGATIVE_NAME
    need_negative = rank == 0 and not negative_path.is_file()
    console.print(f"[bold]synth[/] {source} → {out}: {len(items)} samples in {num_shards} shards; "
                  f"{len(mine) - len(pending)} of this rank's {len(mine)} already done")
    summary = {"out_dir": str(out), "written": [], "rank": rank}

    # -- 1. text: every pending prompt and the negative prompt, once; then the encoder is freed --
    embeds: dict[int, list[Tensor]] = {}
    negative = None
    if source == "latents" and need_negative and src.negative is not None:
        negative = src.negative
    elif source != "latents" or (need_negative and cfg.text_encoder_path is not None):
        if pending or need_negative:
            from rcm.models.text_encoder import load_text_encoder

            with console.status("loading the text encoder and encoding the prompts"):
                try:
                    encoder = load_text_encoder(cfg.text_encoder_path, tokenizer_path=cfg.tokenizer_path,
                                                dtype=dtype, device=device, text_len=text_len)
                except ValueError as e:
                    raise ConfigError("text_encoder_path", str(e)) from e
                if config is not None and encoder.dim != config.text_dim:
                    raise ConfigError("text_encoder_path", f"its width {encoder.dim} != the teacher's text_dim {config.text_dim}")
                store = getattr(torch, cfg.embed_dtype)
                encode = lambda ps: [trim_embedding(e).to(store).cpu() for e in encoder.encode(ps)]  # noqa: E731
                negative = encode([cfg.negative_prompt])[0]
                if source != "latents":
                    for s in pending:
                        texts = [it[0] if source == "prompts" else it[1] for it in shards[s]]  # (prompt, ...) / (video, prompt)
                        embeds[s] = [e for i in range(0, len(texts), 8) for e in encode(texts[i : i + 8])]
                encoder.offload()
                del encoder
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if need_negative and negative is None:
        raise ConfigError("text_encoder_path", f"is needed to encode the negative prompt ({cfg.latents} stores none)")

    # -- 2. latents, shard by shard --
    store = getattr(torch, cfg.latent_dtype)
    model = conditioner = None
    if pending and source == "prompts":
        from rcm.models import load_wan_model

        with console.status("loading the teacher"):
            model = load_wan_model(cfg.teacher, config=config, dtype=dtype, device=device).eval().requires_grad_(False)
    elif pending and source == "videos":
        from rcm.models.vae import load_vae

        with console.status("loading the VAE"):
            try:
                model = load_vae(cfg.vae_path, dtype=dtype, device=device)
            except ValueError as e:
                raise ConfigError("vae_path", str(e)) from e
            if config is not None and model.config.z_dim != config.out_dim:
                raise ConfigError("vae_path", f"{model.config.z_dim} latent channels, the teacher generates {config.out_dim}")
    if pending and i2v:
        from rcm.wan.synth_i2v import load_conditioner

        conditioner = load_conditioner(cfg, config, dtype=dtype, device=device)
    neg_context = None
    if source == "prompts" and cfg.guidance > 1 and pending:
        from rcm.wan.data import pad_embeddings

        neg_context = pad_embeddings([negative], text_len).to(device=device, dtype=dtype)
    latent_shape = None
    start = time.perf_counter()
    with progress_bar(console) as bar:
        job = bar.add_task(f"{source} (rank {rank})" if world > 1 else source,
                           total=sum(len(shards[s]) for s in pending))
        for s in pending:
            lat, emb, texts, stored = [], [], [], []
            if source == "prompts":
                from rcm.wan.data import pad_embeddings
                from rcm.wan.pipeline import read_image, sample_wan_latent

                factor = 8 if conditioner is None else conditioner.vae.config.spatial_factor
                shape = (config.out_dim, 1 + (cfg.num_frames - 1) // 4, cfg.height // factor, cfg.width // factor)
                for i in range(0, len(shards[s]), cfg.batch_size):
                    part = shards[s][i : i + cfg.batch_size]
                    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                                         for _, seed, _ in part]).to(device)
                    condition = None
                    if conditioner is not None:
                        images = torch.cat([read_image(im, cfg.height, cfg.width, field="images") for _, _, im in part])
                        condition, rows = conditioner(images.to(device))
                        stored.append(rows)
                    context = pad_embeddings(embeds[s][i : i + len(part)], text_len).to(device=device, dtype=dtype)
                    neg = None if neg_context is None else neg_context.expand(len(part), -1, -1)
                    x = sample_wan_latent(model, context, noise, kind="teacher",
                                          generator=torch.Generator().manual_seed(part[0][1]), sampler=cfg.sampler,
                                          steps=cfg.steps, guidance=cfg.guidance, shift=cfg.shift,
                                          sigma_max=cfg.sigma_max, negative_context=neg, condition=condition)
                    lat += list(x.cpu())
                    bar.advance(job, len(part))
                texts, emb = [p for p, _, _ in shards[s]], embeds[s]
            elif source == "videos":
                for path, prompt in shards[s]:
                    video = read_video(path, cfg.num_frames, cfg.height, cfg.width)
                    lat.append(model.encode(video[None].to(device))[0].cpu())
                    if conditioner is not None:  # its first frame is the given image
                        stored.append(conditioner(video[None, :, 0].to(device))[1])
                    texts.append(prompt)
                    bar.advance(job)
                emb = embeds[s]
            else:
                for i in shards[s]:
                    latent, embed, prompt = src[i]
                    lat.append(latent.float())
                    emb.append(embed)
                    texts.append(prompt)
                    bar.advance(job)
                if config is not None and text_len < max(e.shape[0] for e in emb):
                    raise ConfigError("latents", f"an embedding is longer than the teacher's text_len {text_len}")
            latents = torch.stack(lat).to(store)
            latent_shape = list(latents.shape[1:])
            extra = {k: torch.cat([r[k] for r in stored]) for k in stored[0]} if stored else None
            data = encode_shard(latents, emb, texts, {"settings_hash": settings_hash, "shard": s}, extra)
            atomic_write_bytes(out / _shard_name(s), data)
            summary["written"].append(str(out / _shard_name(s)))
    seconds = time.perf_counter() - start
    if world > 1:  # one plain line per rank (the others' consoles are quiet): who wrote what
        print(f"rank {rank}/{world}: wrote {', '.join(Path(p).name for p in summary['written']) or 'nothing'}", flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        missing = [_shard_name(s) for s in range(num_shards) if not (out / _shard_name(s)).is_file()]
        if missing:
            raise RuntimeError(f"shards {', '.join(missing[:5])} are missing after every rank finished")
        if negative is not None and not negative_path.is_file():
            from safetensors.torch import save

            atomic_write_bytes(negative_path, save({"embed": negative.contiguous()},
                                                   metadata={"prompt": cfg.negative_prompt}))
        from rcm.wan.data import _open_shard

        first = _open_shard(out / _shard_name(0))  # headers only: the shape and width
        index = {"format": LATENT_FORMAT, "num_samples": len(items), "shard_size": cfg.shard_size,
                 "shards": [_shard_name(s) for s in range(num_shards)], "latent_shape": list(first.latent_shape),
                 "text_dim": first.text_dim, "text_len": text_len, "source": source, "i2v": i2v,
                 "settings_hash": settings_hash, "settings": settings}
        atomic_write_bytes(index_path, (json.dumps(index, indent=1, ensure_ascii=False, default=str) + "\n").encode())
        console.print(f"{len(summary['written'])} shards written in {seconds:.1f} s; dataset index → {index_path}")
    if latent_shape is not None:
        summary["latent_shape"] = latent_shape
    return summary
