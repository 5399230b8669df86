"""Few-step consistency sampler of the distilled student, TrigFlow form (docs/method.md §5.2).

    x = z;  for t_i in [arctan σ_max, mid…]:  x̂0 = f(x, t_i);  x ← cos t_{i+1} x̂0 + sin t_{i+1} z_i
    return x̂0 at the last step (t_N = 0), through nan_to_num

With a ``FrameCondition`` (docs/method.md §12) the start, every re-noised state and the output keep the
given frames exactly clean.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from rcm.models.trigflow import (
    FrameCondition,
    check_time_range,
    per_sample,
    trigflow_denoise,
)

__all__ = ["StudentDenoiser", "sample_consistency", "student_denoiser"]

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B]) -> x̂0


class StudentDenoiser(NamedTuple):
    """The consistency function f(x_t, t) = x̂0 of a network ``net(x, timestep, context) -> v`` under
    ``condition``; ``sample_consistency`` imposes the same condition on its states."""

    net: Callable
    context: Any
    condition: FrameCondition | None = None

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        return trigflow_denoise(self.net, x_t, t, self.context, name="student", condition=self.condition).x0


def student_denoiser(net: Callable, context: Any, *, condition: FrameCondition | None = None) -> StudentDenoiser:
    """The consistency function of ``net`` with ``context`` and image conditioning ``condition`` (§12)."""
    if not callable(net):
        raise ValueError(f"net must be callable (net(x, timestep, context) -> v), got {type(net).__name__}")
    return StudentDenoiser(net, context, condition)


def _check_times(times: Tensor, name: str) -> None:
    if not isinstance(times, Tensor) or not times.is_floating_point() or times.ndim != 1 or times.numel() < 2:
        raise ValueError(f"{name} must be a floating 1-D tensor of at least 2 times, got "
                         f"{f'{tuple(times.shape)} {times.dtype}' if isinstance(times, Tensor) else type(times).__name__}")
    check_time_range(times, name)
    if times[-1] != 0 or (times[1:] > times[:-1]).any():
        raise ValueError(f"{name} must be non-increasing and end at 0, got {times.tolist()}")


@torch.no_grad()
def sample_consistency(denoiser: Denoiser, noise: Tensor, times: Tensor, *,
                       generator: torch.Generator | None = None, condition: FrameCondition | None = None,
                       progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Sample with a consistency function ``denoiser(x_t, t) -> x̂0`` over TrigFlow ``times``
    (from ``consistency_times``), starting at x = ``noise`` as the reference does (not sin t_0 · z).

    Every intermediate step re-noises with fresh z from ``generator`` (fp32 draws). ``progress(i, n)``
    is called after step i of n. Returns float64 samples shaped like ``noise``.
    ``condition``: imposed on every state and the output (default: the denoiser's own, for a
    ``StudentDenoiser``); the denoiser must condition its network the same way.
    """
    _check_times(times, "times")
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 2:
        raise ValueError(f"noise must be a floating tensor [B, ...], got "
                         f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
    num_steps = times.numel() - 1
    if num_steps > 1 and not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator for the re-noising of a multi-step sampler")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable(step, num_steps), got {type(progress).__name__}")
    times = times.to(device=noise.device, dtype=torch.float64)
    batch = noise.shape[0]
    if condition is None:
        condition = getattr(denoiser, "condition", None)
    condition = FrameCondition() if condition is None else condition.checked(noise)
    x = condition.impose(noise.to(torch.float64))
    for i in range(num_steps):
        x0 = denoiser(x, times[i].expand(batch))
        if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.shape != noise.shape:
            raise ValueError(f"denoiser returned {tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}"
                             f"; expected a floating tensor of the shape of noise {tuple(noise.shape)}")
        x0 = x0.to(torch.float64)
        if i + 1 < num_steps:
            z = torch.randn(noise.shape, generator=generator, device=generator.device, dtype=torch.float32)
            t_next = per_sample(times[i + 1].expand(batch), x0)
            x = condition.impose(torch.cos(t_next) * x0 + torch.sin(t_next) * z.to(x0.device, torch.float64))
        if progress is not None:
            progress(i + 1, num_steps)
    return condition.impose(torch.nan_to_num(x0))  # as the reference: NaN → 0, ±inf → the largest finite float64
