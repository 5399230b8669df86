"""Time distributions and loss configs, with the reference's Wan2.1 values (docs/method.md §5.1).

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
import numbers
from dataclasses import dataclass, field
from typing import Any, Union

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the configs import no torch (a command's help builds them); sampling imports it when used
    import torch
    from torch import Tensor

__all__ = [
    "ConfigError",
    "DMDConfig",
    "LogNormalTime",
    "RCMConfig",
    "RCM_PRESETS",
    "SCMConfig",
    "UniformShiftTime",
]


class ConfigError(ValueError):
    """A config dataclass refused one of its fields: ``config`` is the class name, ``field`` the field's
    name (the CLI maps the pair to its flag), the message says what is wrong and starts with both."""

    def __init__(self, config: str, field: str, message: str):
        super().__init__(f"{config}.{field} {message}")
        self.config, self.field = config, field


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_real(obj: Any, name: str, *, minimum: float = -math.inf, strict: bool = False) -> None:
    """``obj.name`` is a finite real number >= minimum (> minimum with ``strict``)."""
    value = getattr(obj, name)
    if not _is_real(value) or value < minimum or (strict and value == minimum):
        bound = "" if minimum == -math.inf else f" {'>' if strict else '>='} {minimum:g}"
        raise ConfigError(type(obj).__name__, name, f"must be a finite number{bound}, got {value!r}")


def _check_int(obj: Any, name: str, minimum: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(type(obj).__name__, name, f"must be an int >= {minimum}, got {value!r}")


def _check_type(obj: Any, name: str, types: tuple[type, ...]) -> None:
    value = getattr(obj, name)
    if not isinstance(value, types):
        raise ConfigError(type(obj).__name__, name, f"must be a {' or '.join(t.__name__ for t in types)}, "
                                                    f"got {type(value).__name__}")


@dataclass(frozen=True)
class LogNormalTime:
    """p_G: log σ ~ N(p_mean, p_std²), t = arctan σ (via the clamped RF map), §2.1.

    The normal is drawn in fp32 and cast to float64, as the reference does."""

    p_mean: float = 0.7
    p_std: float = 1.6

    def __post_init__(self):
        _check_real(self, "p_mean")
        _check_real(self, "p_std", minimum=0, strict=True)

    def sample(self, batch_size: int, generator: torch.Generator | None, device="cpu") -> Tensor:
        import torch

        from rcm.losses.common import check_count, draw_normal
        from rcm.models.trigflow import rf_to_trig

        batch_size = check_count(batch_size, "batch_size", 1)
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
        _check_real(self, "shift", minimum=0, strict=True)

    def sample(self, batch_size: int, generator: torch.Generator | None, device="cpu") -> Tensor:
        import torch

        from rcm.losses.common import check_count, draw_uniform
        from rcm.models.trigflow import rf_to_trig, shift_rf_time

        batch_size = check_count(batch_size, "batch_size", 1)
        u = draw_uniform(batch_size, generator, device).to(torch.float64)
        return rf_to_trig(shift_rf_time(u, self.shift))


TimeDistribution = Union[LogNormalTime, UniformShiftTime]


@dataclass(frozen=True)
class SCMConfig:
    """sCM distillation (docs/method.md §2). The defaults here are the reference's Wan recipe; each
    application's presets set its own (the help of each command shows them)."""

    loss_scale: float = 100.0
    """λ_CM multiplying the per-sample sum."""
    guidance: float = 5.0
    """teacher CFG weight w, applied for w > 1 against the negative prompt (or null label)."""
    tangent_warmup: int = 1000
    """iterations over which r = min(1, iteration/tangent_warmup) ramps; 0: r = 1."""
    tangent_norm_eps: float = 0.1
    """c in ĝ = g/(‖g‖ + c); > 0, since a zero tangent (a sample zeroed by the non-finite guard) would give 0/0."""
    time_dist: TimeDistribution = field(default_factory=LogNormalTime)
    """p_G."""

    def __post_init__(self):
        _check_real(self, "loss_scale", minimum=0)
        _check_real(self, "guidance", minimum=0)
        _check_int(self, "tangent_warmup", 0)
        _check_real(self, "tangent_norm_eps", minimum=0, strict=True)
        _check_type(self, "time_dist", (LogNormalTime, UniformShiftTime))


@dataclass(frozen=True)
class DMDConfig:
    """DMD2 regularizer, student rollout and fake-score critic (docs/method.md §3). The defaults here are
    the reference's Wan recipe; each application's presets set its own (the help of each command shows them)."""

    loss_scale: float = 1.0
    """λ_DMD; 0 turns the regularizer (and the critic phase) off: pure sCM."""
    guidance: float = 5.0
    """CFG weight of the teacher's "real" x̂0."""
    time_dist: TimeDistribution = field(default_factory=UniformShiftTime)
    """p_D, for the DMD/critic noise level and the random rollout times."""
    max_simulation_steps: int = 4
    """rollouts cycle through 1..max steps."""
    fix_timesteps: bool = False
    """use ``backward_timesteps`` as rollout mid-times instead of draws from p_D."""
    backward_timesteps: tuple[float, ...] = (1.5, 1.4, 1.0)
    """fixed TrigFlow mid-times."""
    omega_min: float = 1e-5
    """floor of the mean-abs normalizer ω, > 0."""
    critic_max_weight: float | None = 1e4
    """cap on the critic's 1/sin²t weight. Below sin t ≈ 0.01 the loss mostly measures the network-input
    rounding amplified by 1/sin²t; the reference has no cap (None reproduces it, and an exact t = 0 draw then
    gives an infinite loss)."""

    def __post_init__(self):
        _check_real(self, "loss_scale", minimum=0)
        _check_real(self, "guidance", minimum=0)
        _check_type(self, "time_dist", (LogNormalTime, UniformShiftTime))
        _check_int(self, "max_simulation_steps", 1)
        _check_type(self, "fix_timesteps", (bool,))
        given = self.backward_timesteps
        if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__") \
                or not all(_is_real(t) for t in given):
            raise ConfigError("DMDConfig", "backward_timesteps", f"must be a sequence of numbers, got {given!r}")
        times = tuple(float(t) for t in given)
        if any(not 0 < t <= math.pi / 2 for t in times):
            raise ConfigError("DMDConfig", "backward_timesteps", f"must lie in (0, π/2], got {times}")
        if any(b > a for a, b in zip(times, times[1:])):
            raise ConfigError("DMDConfig", "backward_timesteps",
                              f"must be non-increasing (a rollout only removes noise), got {times}")
        object.__setattr__(self, "backward_timesteps", times)
        if self.fix_timesteps and len(times) < self.max_simulation_steps - 1:
            raise ConfigError("DMDConfig", "backward_timesteps", f"needs max_simulation_steps - 1 = "
                              f"{self.max_simulation_steps - 1} times with fix_timesteps, got {times}")
        _check_real(self, "omega_min", minimum=0, strict=True)
        if self.critic_max_weight is not None:
            value = self.critic_max_weight
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ConfigError("DMDConfig", "critic_max_weight", f"must be > 0 or None, got {value!r}")


@dataclass(frozen=True)
class RCMConfig:
    """rCM = sCM + DMD2 regularizer, with the phase schedule of docs/method.md §3.1."""

    scm: SCMConfig = field(default_factory=SCMConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    student_update_freq: int = 5
    """after warmup, one student iteration per this many iterations, critic iterations in between."""

    def __post_init__(self):
        _check_type(self, "scm", (SCMConfig,))
        _check_type(self, "dmd", (DMDConfig,))
        _check_int(self, "student_update_freq", 1)

    @property
    def dmd_enabled(self) -> bool:
        """The regularizer and its critic phase exist only with loss_scale_dmd > 0 (the reference's rule)."""
        return self.dmd.loss_scale > 0


RCM_PRESETS: dict[str, RCMConfig] = {
    "wan2.1-t2v-1.3b": RCMConfig(),
    "wan2.1-t2v-14b": RCMConfig(scm=SCMConfig(time_dist=LogNormalTime(1.5, 1.6), tangent_warmup=0),
                                student_update_freq=10),
}
