"""What ``rcm synth`` reads: prompt files (``.txt`` / ``.jsonl``), folders of videos with their prompts, and
the videos' frames; every unreadable input is an error naming its flag and file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from rcm import ConfigError, PathArgumentError
from rcm.wan import presets
from rcm.wan.pipeline import fit_frames


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def read_prompts(path: Path) -> list[str]:
    """Prompts of a .txt (one per non-empty line) or .jsonl (a "prompt" key per line) file."""
    if not path.is_file():
        raise PathArgumentError("prompts", f"no file at {path}")
    lines = read_text("prompts", path).splitlines()
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError("prompts", f"{path} line {n}: not a JSON object with a \"prompt\" key ({e})") from e
            if not isinstance(prompt, str):
                raise ConfigError("prompts", f"{path} line {n}: \"prompt\" must be a string")
            prompts.append(prompt.strip())
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts or not all(prompts):
        raise ConfigError("prompts", f"{path} holds no prompts" if not prompts else f"{path} has an empty prompt")
    return prompts


def read_text(field: str, path: Path) -> str:
    """A UTF-8 text file of ``field``; other bytes are an error naming the file (not a codec's message)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(field, f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e


def list_videos(cfg) -> list[tuple[Path, str]]:
    """The videos of ``cfg.videos`` with their prompts (``clip.txt`` beside ``clip.mp4``, else line i of
    ``cfg.prompts`` for the i-th video by name)."""
    videos = sorted(p for p in Path(cfg.videos).iterdir() if p.suffix.lower() in presets.VIDEO_SUFFIXES)
    if not videos:
        raise ConfigError("videos", f"{cfg.videos} holds no {'/'.join(presets.VIDEO_SUFFIXES)} files")
    listed = read_prompts(Path(cfg.prompts)) if cfg.prompts is not None else None
    if listed is not None and len(listed) != len(videos):
        raise ConfigError("prompts", f"{len(listed)} prompts for {len(videos)} videos in {cfg.videos} (one per video, by name)")
    out = []
    for i, v in enumerate(videos):
        side = v.with_suffix(".txt")
        if side.is_file() and read_text("videos", side).strip():
            out.append((v, read_text("videos", side).strip()))
        elif listed is not None:
            out.append((v, listed[i]))
        else:
            raise ConfigError("videos", f"{v.name} has no prompt: put it in {side.name} or pass --prompts")
    return out


def read_video(path: Path, num_frames: int, height: int, width: int) -> Tensor:
    """The first ``num_frames`` frames of a video, centre-cropped to the aspect ratio and resized
    (antialiased) to ``height x width``: ``[3, T, H, W]`` float32 in [-1, 1]."""
    import imageio.v3 as iio
    import numpy as np

    try:
        frames = np.asarray(iio.imread(path, index=None))
    except Exception as e:  # imageio raises many types for an unreadable file
        raise ConfigError("videos", f"cannot read {path} ({type(e).__name__}: {e})") from e
    if frames.ndim == 3:  # grey
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[0] < num_frames:
        raise ConfigError("videos", f"{path.name} has {frames.shape[0] if frames.ndim == 4 else 0} frames; "
                             f"--num-frames is {num_frames}")
    video = torch.from_numpy(np.ascontiguousarray(frames[:num_frames, :, :, :3])).float().permute(0, 3, 1, 2)
    return (fit_frames(video, height, width) / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3)
