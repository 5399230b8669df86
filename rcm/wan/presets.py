"""Every default of the Wan2.1 application, written once: per-size distillation recipes (the reference's,
docs/method.md §5.1), sampling (§5.2, §5.3) and video sizes.

``DISTILL`` holds what differs between the sizes; everything else of a run is the 1.3B row, and
``rcm.wan.task.WanDistillConfig``'s field defaults are read from it. ``wan` (the architecture read from
the teacher file) uses the 1.3B recipe.
"""

from __future__ import annotations

from rcm.losses import RCM_PRESETS

WAN_MODELS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan")

# distillation, per size: the reference's recipe
DISTILL: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(loss=RCM_PRESETS["wan2.1-t2v-1.3b"], max_latent_frames=20, iterations=100_000,
                            checkpoint_every=500, student_lr=2e-6, critic_lr=4e-7, sigma_max=80.0, sample_every=500),
    "wan2.1-t2v-14b": dict(loss=RCM_PRESETS["wan2.1-t2v-14b"], max_latent_frames=21, iterations=100_000,
                           checkpoint_every=250, student_lr=1e-6, critic_lr=1e-7, sigma_max=200.0, sample_every=250),
}
DISTILL["wan"] = DISTILL["wan2.1-t2v-1.3b"]
# The reference's sharding (FSDP shard group / CP size, §5.1): a property of its 32/64-GPU jobs, not a
# default here (any world size runs; --parallel.dp-shard / --parallel.cp set them).
REFERENCE_SHARDING = {"wan2.1-t2v-1.3b": "4 / 1", "wan2.1-t2v-14b": "32 / 8"}

# sampling
STUDENT_SIGMA_MAX = DISTILL["wan2.1-t2v-1.3b"]["sigma_max"]  # the student's σ_max (rCM: 120 at 720p, 200 for 14B)
TEACHER_SIGMA_MAX = 5000.0
TEACHER_STEPS = 50
GUIDANCE = 5.0  # the teacher's CFG weight, when sampling and in the losses (RCMConfig's default)
SHIFT = 5.0  # the teacher's schedule shift when sampling
FPS = 16
NUM_FRAMES = 81

# (height, width) of Wan2.1's supported sizes (official `SIZE_CONFIGS`).
WAN_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (480, 832), "9:16": (832, 480), "1:1": (624, 624)},
    "720p": {"16:9": (720, 1280), "9:16": (1280, 720), "1:1": (960, 960)},
}

# `rcm synth`: the teacher samples of the released data (Euler, 100 steps, shift 3)
SYNTH_SAMPLER = "euler"
SYNTH_STEPS = 100
SYNTH_SHIFT = 3.0
VIDEO_SUFFIXES = (".mp4", ".gif")  # what Wan videos are written as and read from
