"""Every default of the digits demo, written once: sampling, distillation, report.

The teacher samples with UniPC over a shift-1 schedule from σ_max 5000 at CFG 2 (what it was evaluated
with); the students learn its CFG-guided ODE at that guidance and sample from σ_max 80 (docs/method.md
§5.2). Distillation: 400 iterations of batch 16 on the CPU, lr 2e-4 with a 20-step warmup for both
networks, the sCM tangent warmed up over 100 iterations, one student step per two critic steps.

Student mid-times per step count (``STUDENT_MID_TIMES``): the reference's (1.5, 1.4, 1.0) are tuned for
Wan; this 1.2M-parameter student re-noises far too much at t = 1.5. 2 steps: t_mid 0.8 beat 1.0 and 1.2
for every setting of the H200 search (docs/study.md; rCM at λ_DMD 8, 2,000 iterations, selection seed 1:
frame FD 2.79 / 3.73 / 5.36). 4 steps: (0.8, 0.6, 0.4) replaced (1.3, 1.0, 0.6), which had been chosen at
λ_DMD 1: on the CPU default's rCM student (selection seed 1) it was better on frame FD, accuracy and
switching (8.58 / 0.886 / 0.44 vs 11.13 / 0.879 / 0.48) and it kept FD@4 below FD@2; lower times gave
lower FD still but lower accuracy and more switching ((0.6, 0.4, 0.2): 7.03 / 0.861 / 0.55), higher ones
worse FD ((1.0, 0.7, 0.4): 9.02) (`scripts/digits_midtimes.py`, docs/study.md). On an H200 rCM student (5,250
iterations, seed 1) it was again the best of six candidates (FD 2.19; old 2.97). 3 steps, (0.8, 0.5), is
an interpolation that was never measured.
"""

from __future__ import annotations

from rcm.losses import DMDConfig, RCMConfig, SCMConfig
from rcm.train.config import OptimizerConfig

# sampling
TEACHER_STEPS = 50
TEACHER_GUIDANCE = 2.0
TEACHER_SHIFT = 1.0
TEACHER_SIGMA_MAX = 5000.0
STUDENT_SIGMA_MAX = 80.0
STUDENT_STEPS = (1, 2, 4)  # the student step counts reported
STUDENT_MID_TIMES = {1: (), 2: (0.8,), 3: (0.8, 0.5), 4: (0.8, 0.6, 0.4)}  # TrigFlow times (see above)
FPS = 8  # an 8-frame clip plays in one second

# CPU threads of every digits command (--threads; 0: torch's default, one per core). The 1.2M-parameter model's
# matrices are small: a second thread gains little on an idle 2-core machine and loses much when the other
# core is busy. `rcm distill --loop.iterations 6 --no-report`, training seconds, 2-core machine, torch 2.13:
# idle 12.1 (1 thread) vs 8.8 (2); beside a CPU hog 12.4 vs 19.1; the loaded machine 12.2 vs 31.0.
THREADS = 1

# distillation
# λ_DMD: the DMD gradient at the output grows with sqrt(elements per sample) (|Δ| ~ 1 per element) while the
# sCM gradient is capped (‖ĝ‖ < 1): a 1×8×16×16 clip has 1/1024 of a Wan 480p latent's elements, so at
# λ_DMD = 1 the regularizer is ~32× weaker against sCM than in the paper's setting. 8 was best on frame FD
# at 2 and 4 steps in the search (docs/study.md): 1 → 8 → 32 → 100 gave rCM@2 frame FD 5.7 / 3.7 / 4.5 / 5.3.
DMD_LOSS_SCALE = 8.0
BATCH_SIZE = 16
ITERATIONS = 400
CHECKPOINT_EVERY = 50
OPTIMIZER = OptimizerConfig(lr=2e-4, warmup=20)
LOSS = RCMConfig(
    scm=SCMConfig(guidance=TEACHER_GUIDANCE, tangent_warmup=100),
    dmd=DMDConfig(guidance=TEACHER_GUIDANCE, loss_scale=DMD_LOSS_SCALE),
    student_update_freq=3,
)
EMA_SIGMA_REL = 0.1
I2V_BOUNDARY = 0.875  # the two-expert I2V teacher's switch: Wan2.2 T2V A14B's RF boundary


def student_mid_times(steps: int) -> tuple[float, ...]:
    """The digits student's mid-times for a ``steps``-step sampler (``STUDENT_MID_TIMES``)."""
    if steps not in STUDENT_MID_TIMES:
        raise ValueError(f"steps: the digits presets have mid-times for {sorted(STUDENT_MID_TIMES)} steps, got "
                         f"{steps}; pass mid_times explicitly")
    return STUDENT_MID_TIMES[steps]
