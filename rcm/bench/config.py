"""The `rcm bench` commands' configs, as plain dataclasses that import no torch (their help is built without it;
the checks that need torch or CUDA import it when the command runs). The benchmarks are attention.py, step.py,
sample.py and i2v.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from rcm import MAX_SAMPLING_STEPS, ConfigError, check_count, check_number, check_seed
from rcm.parallel.config import ParallelConfig
from rcm.sample import resolve_device
from rcm.wan import presets

DEFAULT_SHAPES = [(1, 12, 32760, 128), (2, 24, 4096, 128), (1, 40, 32760, 128), (1, 24, 4096, 64)]


ALL = ("ours_jvp", "ours_fwd_bwd", "triton_fwd_bwd", "sdpa_fwd_bwd", "matmul", "jvp_flash_attention",
       "sdpa_math_jvp")


DEFAULT_INCLUDE = ("ours_jvp", "ours_fwd_bwd", "triton_fwd_bwd", "sdpa_fwd_bwd", "matmul")


BenchRow = Literal[ALL]


@dataclass
class BenchAttentionConfig:
    """Time the attention op against SDPA and a matmul on the same inputs (needs CUDA for real figures;
    on the CPU it runs a tiny smoke version under the Triton interpreter)."""

    shapes: tuple[str, ...] = tuple(",".join(map(str, s)) for s in DEFAULT_SHAPES)
    """B,H,L,D each. Head dims D: multiples of 8 from 8 to 256 (the op); our Triton kernels take 64, 128 and
    256, other dims run the reference backend."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    include: tuple[BenchRow, ...] = DEFAULT_INCLUDE
    out_json: Optional[str] = None

    def __post_init__(self):
        self.parsed_shapes()  # before any kernel is compiled or timed

    def parsed_shapes(self) -> list[tuple[int, int, int, int]]:
        from rcm import ConfigError, check_memory
        import torch

        from rcm.kernels.ops import MAX_HEAD_DIM, TRITON_HEAD_DIMS

        shapes = []
        for entry in self.shapes:
            parts = entry.split(",")
            if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise ConfigError("shapes", f"{entry!r} is not B,H,L,D with four positive integers")
            shape = tuple(int(p) for p in parts)
            if shape[3] % 8 or shape[3] > MAX_HEAD_DIM:
                raise ConfigError("shapes", f"head dim {shape[3]} in {entry!r} is not supported: the op takes multiples "
                                            f"of 8 from 8 to {MAX_HEAD_DIM}, our Triton kernels "
                                            f"{', '.join(map(str, TRITON_HEAD_DIMS))}")
            # q, k, v, the output and its gradient: five tensors of the shape, in fp32 at most
            check_memory("shapes", 5 * 4 * math.prod(shape), f"attention at {entry}",
                         "cuda" if torch.cuda.is_available() else "cpu")
            shapes.append(shape)
        return shapes


WanModel = Literal["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan-tiny"]


Mode = Literal["eager", "compiled"]


Part = Literal["sample-ti2v", "sample-a14b", "step-ti2v"]


PARTS: tuple[Part, ...] = ("sample-ti2v", "sample-a14b", "step-ti2v")


@dataclass
class BenchI2VConfig:
    """Time 4-step sampling of TI2V-5B- and A14B-shaped DiTs and one rCM iteration of the 5B shape, with
    the first frame given (random weights, bf16 on the GPU), eager and compiled."""

    config: Literal["480p", "tiny"] = "480p"
    """480p: the real shapes (one H200); tiny: miniature shapes that run on the CPU (tests)."""
    parts: tuple[Part, ...] = PARTS
    """which parts to run (each is independent)."""
    modes: tuple[Mode, ...] = ("eager", "compiled")
    num_frames: int = 81
    """video frames, 1 + 4k (81: 21 latent frames)."""
    student_steps: int = 4
    rollout_steps: int = 2
    """DMD rollout steps of the timed rCM iteration."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """step-ti2v: sgd (bf16 weights, no state: fits one GPU) or adamw (fp32 masters and moments: the recipe)."""
    activation_checkpointing: bool = True
    device: Literal["auto", "cuda", "cpu"] = "auto"
    out: Path | None = None
    """write the results as JSON here."""
    seed: int = 0
    compile_backend: str = "inductor"

    def __post_init__(self):
        if not self.parts or len(set(self.parts)) != len(self.parts):
            raise ConfigError("parts", f"must name each part at most once, got {self.parts}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ConfigError("modes", f"must name eager and/or compiled once each, got {self.modes}")
        # eager first: compiling is in place (the compiled mode reuses the eager mode's networks)
        self.modes = tuple(m for m in ("eager", "compiled") if m in self.modes)
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ConfigError("num_frames", f"must be 1 + 4k (1, 5, ..., 81), got {self.num_frames}")
        if not 1 <= self.student_steps <= 4:
            raise ConfigError("student_steps", f"must be in 1..4, got {self.student_steps}")
        if not 1 <= self.rollout_steps <= 4:
            raise ConfigError("rollout_steps", f"must be in 1..4 (max_simulation_steps), got {self.rollout_steps}")


@dataclass
class BenchSampleConfig:
    """Seconds per video: 1/2/4-step student sampling and 50-step CFG teacher sampling, DiT only and with
    the VAE decode (random weights)."""

    model: WanModel = "wan2.1-t2v-1.3b"
    resolution: Literal["480p", "720p"] = "480p"
    num_frames: int = presets.NUM_FRAMES
    height: int | None = None
    width: int | None = None
    student_steps: tuple[int, ...] = (1, 2, 4)
    teacher_steps: int = presets.TEACHER_STEPS
    guidance: float = presets.GUIDANCE
    modes: tuple[Mode, ...] = ("eager", "compiled")
    decode: bool = True  # also time the VAE decode (random real-size Wan VAE)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    json_path: Path | None = None
    seed: int = 0
    compile_backend: str = "inductor"  # torch.compile backend of the compiled mode

    def __post_init__(self):
        if not self.student_steps or any(not 1 <= s <= 4 for s in self.student_steps):
            raise ConfigError("student_steps", f"must be in 1..4, got {self.student_steps}")
        if self.teacher_steps < 1:
            raise ConfigError("teacher_steps", f"must be >= 1, got {self.teacher_steps}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ConfigError("modes", f"must name eager and/or compiled once each, got {self.modes}")
        check_count("teacher_steps", self.teacher_steps, 1, MAX_SAMPLING_STEPS)
        check_number("guidance", self.guidance, 0)
        check_seed("seed", self.seed)
        from rcm.bench.common import check_shape_fits, wan_shape

        check_shape_fits(wan_shape(self.model, self.resolution, self.num_frames, self.height, self.width),
                         resolve_device(self.device))


@dataclass
class BenchStepConfig:
    """Time one rCM student iteration and one critic iteration of a Wan2.1 DiT, eager and compiled."""

    model: WanModel = "wan2.1-t2v-1.3b"
    resolution: Literal["480p", "720p"] = "480p"
    num_frames: int = presets.NUM_FRAMES
    height: int | None = None  # explicit size (overrides --resolution), a multiple of 16
    width: int | None = None
    batch_size: int = 1
    modes: tuple[Mode, ...] = ("eager", "compiled")
    repeats: int = 2  # timed iterations of each kind, after one warm-up (compile) iteration
    rollout_steps: int = 2  # DMD rollout length of the timed iterations (training cycles 1..4)
    activation_checkpointing: bool = True  # recompute each block in the backward (needed to fit 480p/81 frames)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    profile: Path | None = None  # write a Chrome trace of one compiled student iteration here, print top kernels
    json_path: Path | None = None  # write the results as JSON
    seed: int = 0
    compile_backend: str = "inductor"  # torch.compile backend of the compiled mode
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """under torchrun: FSDP2 / CP layout (--parallel.cp 2 ...); activation checkpointing follows the flag above."""
    compare: Path | None = None
    """a JSON of an earlier run (e.g. one GPU) to compare with: first-iteration losses, step times, scaling."""

    def __post_init__(self):
        if self.repeats < 1:
            raise ConfigError("repeats", f"must be >= 1, got {self.repeats}")
        if not 1 <= self.rollout_steps <= 4:
            raise ConfigError("rollout_steps", f"must be in 1..4 (max_simulation_steps), got {self.rollout_steps}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ConfigError("modes", f"must name eager and/or compiled once each, got {self.modes}")
        check_count("repeats", self.repeats, 1, 10**6)
        check_seed("seed", self.seed)
        from rcm.bench.common import check_shape_fits, wan_shape

        shape = wan_shape(self.model, self.resolution, self.num_frames, self.height, self.width, self.batch_size)
        check_shape_fits(shape, resolve_device(self.device))
