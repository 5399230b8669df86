"""Every default of the digits demo, written once: sampling, distillation, report.

The teacher samples with UniPC over a shift-1 schedule from σ_max 5000 at CFG 2 (what it was evaluated
with); the students learn its CFG-guided ODE at that guidance and sample from σ_max 80 (docs/method.md
§5.2). Distillation: 400 iterations of batch 16 on the CPU, lr 2e-4 with a 20-step warmup for both
networks, the sCM tangent warmed up over 100 iterations, one student step per two critic steps.
"""

from __future__ import annotations

from rcm.losses import DMDConfig, RCMConfig, SCMConfig
from rcm.optim import OptimizerConfig

# sampling
TEACHER_STEPS = 50
TEACHER_GUIDANCE = 2.0
TEACHER_SHIFT = 1.0
TEACHER_SIGMA_MAX = 5000.0
STUDENT_SIGMA_MAX = 80.0
STUDENT_STEPS = (1, 2, 4)  # the student step counts reported
FPS = 8  # an 8-frame clip plays in one second

# distillation
BATCH_SIZE = 16
ITERATIONS = 400
CHECKPOINT_EVERY = 50
OPTIMIZER = OptimizerConfig(lr=2e-4, warmup=20)
LOSS = RCMConfig(
    scm=SCMConfig(guidance=TEACHER_GUIDANCE, tangent_warmup=100),
    dmd=DMDConfig(guidance=TEACHER_GUIDANCE),
    student_update_freq=3,
)
EMA_SIGMA_REL = 0.1
