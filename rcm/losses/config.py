"""Time distributions and loss configs, with the reference's Wan2.1 values (RCM_METHOD.md §5.1).

Defaults are the 1.3B run; ``RCM_PRESETS`` holds both sizes:

    |                     | 1.3B                  | 14B                   |
    |---------------------|-----------------------|-----------------------|
    | p_G (sCM times)     | LogNormal(0.7, 1.6)   | LogNormal(1.5, 1.6)   |
    | p_D (DMD/critic)    | UniformShift(5)       | UniformShift(5)       |
    | tangent_warmup      | 1000                  | 0                     |
    | student_update_freq | 5                     | 10                    |

Learning rates (student 2e-6 / 1e-6, fake score 4e-7 / 1e-7), the optimizer and sampling's
sigma_max (80 / 200) are not loss settings; they live with the training loop and the samplers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

from rcm.losses.common import draw_normal, draw_uniform
from rcm.models.trigflow import rf_to_trig, shift_rf_time

__all__ = [
    "DMDConfig",
    "LogNormalTime",
    "RCMConfig",
    "RCM_PRESETS",
    "SCMConfig",
    "UniformShiftTime",
]


@dataclass(frozen=True)
class LogNormalTime:
    """p_G: log σ ~ N(p_mean, p_std²), t = arctan σ (via the clamped RF map), §2.1.

    The normal is drawn in fp32 and cast to float64, as the reference does."""

    p_mean: float = 0.7
    p_std: float = 1.6

    def __post_init__(self):
        if not (math.isfinite(self.p_mean) and self.p_std > 0):
            raise ValueError(f"LogNormalTime needs finite p_mean and p_std > 0, got {self}")

    def sample(self, batch_size: int, generator: torch.Generator | None, device="cpu") -> Tensor:
        n = draw_normal((batch_size,), generator, device, name="t").to(torch.float64)
        sigma = torch.exp(self.p_mean + self.p_std * n)
        rho = (sigma / (1 + sigma)).clamp(0.0, 1.0)
        return rf_to_trig(rho)


@dataclass(frozen=True)
class UniformShiftTime:
    """p_D: u ~ U[0, 1) (fp32, cast to float64), ρ = shift_S(u), t = arctan(ρ/(1 − ρ)), §3.3.

    With S = 5: tan t = 5u/(1 − u); quantiles u = .1/.5/.9 give t ≈ 0.507/1.373/1.549."""

    shift: float = 5.0

    def __post_init__(self):
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"UniformShiftTime.shift must be a positive float, got {self.shift}")

    def sample(self, batch_size: int, generator: torch.Generator | None, device="cpu") -> Tensor:
        u = draw_uniform(batch_size, generator, device).to(torch.float64)
        return rf_to_trig(shift_rf_time(u, self.shift))


TimeDistribution = Union[LogNormalTime, UniformShiftTime]


def _check_nonneg(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{type(obj).__name__}.{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class SCMConfig:
    """sCM distillation (RCM_METHOD.md §2).

    loss_scale: λ_CM multiplying the per-sample sum (100).
    guidance: teacher CFG weight w, applied for w > 1 against the negative prompt (5).
    tangent_warmup: iterations over which r = min(1, iteration/tangent_warmup) ramps (1000; 0: r = 1).
    tangent_norm_eps: c in ĝ = g/(‖g‖ + c) (0.1).
    time_dist: p_G.
    """

    loss_scale: float = 100.0
    guidance: float = 5.0
    tangent_warmup: int = 1000
    tangent_norm_eps: float = 0.1
    time_dist: TimeDistribution = field(default_factory=LogNormalTime)

    def __post_init__(self):
        _check_nonneg(self, "loss_scale", "guidance", "tangent_norm_eps")
        if not isinstance(self.tangent_warmup, int) or self.tangent_warmup < 0:
            raise ValueError(f"SCMConfig.tangent_warmup must be an int >= 0, got {self.tangent_warmup!r}")


@dataclass(frozen=True)
class DMDConfig:
    """DMD2 regularizer, student rollout and fake-score critic (RCM_METHOD.md §3).

    loss_scale: λ_DMD (1); 0 turns the regularizer (and the critic phase) off: pure sCM.
    guidance: CFG weight of the teacher's "real" x̂0 (5).
    time_dist: p_D, for the DMD/critic noise level and the random rollout times.
    max_simulation_steps: rollouts cycle through 1..max steps (4).
    fix_timesteps: use ``backward_timesteps`` as rollout mid-times instead of draws from p_D.
    backward_timesteps: fixed TrigFlow mid-times (1.5, 1.4, 1.0).
    omega_min: floor of the mean-abs normalizer ω (1e-5).
    critic_max_weight: cap on the critic's 1/sin²t weight. Below sin t ≈ 0.01 the loss mostly measures
        the network-input rounding amplified by 1/sin²t; the reference has no cap (None reproduces it,
        and an exact t = 0 draw then gives an infinite loss).
    """

    loss_scale: float = 1.0
    guidance: float = 5.0
    time_dist: TimeDistribution = field(default_factory=UniformShiftTime)
    max_simulation_steps: int = 4
    fix_timesteps: bool = False
    backward_timesteps: tuple[float, ...] = (1.5, 1.4, 1.0)
    omega_min: float = 1e-5
    critic_max_weight: float | None = 1e4

    def __post_init__(self):
        _check_nonneg(self, "loss_scale", "guidance", "omega_min")
        if not isinstance(self.max_simulation_steps, int) or self.max_simulation_steps < 1:
            raise ValueError(f"DMDConfig.max_simulation_steps must be an int >= 1, "
                             f"got {self.max_simulation_steps!r}")
        times = tuple(float(t) for t in self.backward_timesteps)
        if any(not 0 < t <= math.pi / 2 for t in times):
            raise ValueError(f"DMDConfig.backward_timesteps must lie in (0, π/2], got {times}")
        object.__setattr__(self, "backward_timesteps", times)
        if self.fix_timesteps and len(times) < self.max_simulation_steps - 1:
            raise ValueError(f"DMDConfig.backward_timesteps needs max_simulation_steps - 1 = "
                             f"{self.max_simulation_steps - 1} times with fix_timesteps, got {times}")
        if self.critic_max_weight is not None and not self.critic_max_weight > 0:
            raise ValueError(f"DMDConfig.critic_max_weight must be > 0 or None, got {self.critic_max_weight}")


@dataclass(frozen=True)
class RCMConfig:
    """rCM = sCM + DMD2 regularizer, with the phase schedule of RCM_METHOD.md §3.1.

    student_update_freq: after warmup, one student iteration per ``student_update_freq`` iterations,
    critic iterations in between (5 for 1.3B, 10 for 14B).
    """

    scm: SCMConfig = field(default_factory=SCMConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    student_update_freq: int = 5

    def __post_init__(self):
        if not isinstance(self.student_update_freq, int) or self.student_update_freq < 1:
            raise ValueError(f"RCMConfig.student_update_freq must be an int >= 1, "
                             f"got {self.student_update_freq!r}")

    @property
    def dmd_enabled(self) -> bool:
        """The regularizer and its critic phase exist only with loss_scale_dmd > 0 (the reference's rule)."""
        return self.dmd.loss_scale > 0


RCM_PRESETS: dict[str, RCMConfig] = {
    "wan2.1-t2v-1.3b": RCMConfig(),
    "wan2.1-t2v-14b": RCMConfig(scm=SCMConfig(time_dist=LogNormalTime(1.5, 1.6), tangent_warmup=0),
                                student_update_freq=10),
}
