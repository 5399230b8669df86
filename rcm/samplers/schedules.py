"""Time schedules of the samplers (docs/method.md §5.2, §5.3), float64 1-D tensors ending at 0."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from rcm.models.trigflow import shift_rf_time, sigma_to_rf, sigma_to_trig

__all__ = ["DEFAULT_MID_TIMES", "check_num_steps", "consistency_times", "shifted_flow_times"]

DEFAULT_MID_TIMES = (1.5, 1.4, 1.0)  # the reference's TrigFlow mid-times for 2-4 steps


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_num_steps(value: object, name: str = "num_steps") -> int:
    """A step count (or order) is an int >= 1 (not a bool, not 1.5)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def consistency_times(num_steps: int, *, sigma_max: float = 80.0,
                      mid_times: Sequence[float] | None = None) -> Tensor:
    """TrigFlow times [arctan σ_max, mid_times[:N−1]…, 0] of an N-step consistency sampler.

    σ_max = 80 for Wan 1.3B, 200 for 14B (``inf`` starts at exactly π/2). Without ``mid_times`` the
    reference's (1.5, 1.4, 1.0) cover up to 4 steps; more steps need explicit ``mid_times``.
    """
    num_steps = check_num_steps(num_steps)
    if not _is_number(sigma_max) or not sigma_max > 0:
        raise ValueError(f"sigma_max must be a number > 0 (inf: start at π/2), got {sigma_max!r}")
    if mid_times is None:
        if num_steps - 1 > len(DEFAULT_MID_TIMES):
            raise ValueError(f"num_steps={num_steps}: the default mid_times {DEFAULT_MID_TIMES} cover at "
                             f"most {len(DEFAULT_MID_TIMES) + 1} steps; pass {num_steps - 1} mid_times")
        mid_times = DEFAULT_MID_TIMES
    if isinstance(mid_times, (str, bytes)) or not hasattr(mid_times, "__iter__") \
            or not all(_is_number(t) for t in mid_times):
        raise ValueError(f"mid_times must be a sequence of numbers, got {mid_times!r}")
    mid = [float(t) for t in mid_times][: num_steps - 1]
    if len(mid) < num_steps - 1:
        raise ValueError(f"num_steps={num_steps} needs {num_steps - 1} mid_times, got {list(mid_times)}")
    t_max = float(sigma_to_trig(float(sigma_max)))
    times = torch.tensor([t_max, *mid, 0.0], dtype=torch.float64)
    if not (times[1:-1] > 0).all() or (times[1:] > times[:-1]).any():
        raise ValueError(f"times must decrease from arctan(sigma_max)={t_max:.5f} to 0 with mid_times "
                         f"in (0, π/2], got {times.tolist()}")
    return times


def shifted_flow_times(num_steps: int, *, shift: float = 5.0, sigma_max: float = 5000.0) -> Tensor:
    """Wan's shifted RF schedule [ρ_0 … ρ_{N−1}, 0] of an N-step teacher sampler (§5.3).

    ρ_max = σ_max/(1 + σ_max) is unshifted to u_max, linspace(u_max, 0, N + 1) without its last entry
    is shifted by S, and 0 is appended. The network's timesteps are 1000·ρ.
    """
    num_steps = check_num_steps(num_steps)
    if not _is_number(sigma_max) or not (sigma_max > 0 and math.isfinite(sigma_max)):
        raise ValueError(f"sigma_max must be a finite number > 0, got {sigma_max!r}")
    if not _is_number(shift) or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number (<= 0: no shift), got {shift!r}")
    rho_max = sigma_to_rf(float(sigma_max))
    u_max = shift_rf_time(rho_max, 1 / shift) if shift > 0 else rho_max  # inverse shift: by 1/S
    u = torch.linspace(float(u_max), 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_rf_time(u, shift), u.new_zeros(1)])
