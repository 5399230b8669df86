"""Wan2.2 A14B's two experts as one network of t (docs/wan_models.md).

A14B denoises with two DiTs of one architecture: the high-noise expert for RF times σ ≥ boundary
(0.875 for T2V, 0.900 for I2V, the official configs' ``boundary``; the official sampler switches
at ``t >= boundary · 1000`` on its shifted timesteps, which are σ · 1000) and the low-noise expert
below. ``WanExperts`` is that rule as a module with the DiT's call signature, so samplers and
losses see one teacher callable of t; each sample goes to its own expert (a batch may straddle the
boundary). Parameters are ``high_noise.*`` and ``low_noise.*``, so ``functional_call`` and the
parallel wrappers (which look for every ``WanDiT`` inside a module) apply unchanged.

The dispatch reads the timesteps' values (it is data-dependent control flow): it works under
``torch.func.jvp`` / ``grad`` in eager mode; ``torch.compile`` breaks the graph there (the experts'
blocks still compile). The rule is ``TimeSwitchedNet``'s (docs/method.md §12.3), the one
implementation; this module adds the weights, their names and the loaders.
"""
from __future__ import annotations

from torch import Tensor, nn

from rcm.models.trigflow import TimeSwitchedNet
from rcm.models.wan import WanDiT

__all__ = ["WanExperts"]


def _holds_a_dit(module) -> bool:
    return isinstance(module, nn.Module) and any(isinstance(m, WanDiT) for m in module.modules()) \
        and hasattr(module, "config")


class WanExperts(nn.Module):
    """``forward(x, timestep, context, **conditioning)``: ``high_noise`` where ``timestep ≥ 1000·boundary``,
    ``low_noise`` elsewhere, per sample (per-token timesteps: the sample's largest, i.e. its noisy
    tokens' time)."""

    def __init__(self, high_noise: nn.Module, low_noise: nn.Module, boundary: float):
        super().__init__()
        if not (_holds_a_dit(high_noise) and type(high_noise) is type(low_noise)):
            raise ValueError(f"WanExperts: high_noise and low_noise must be two WanDiT (or two modules of one type "
                             f"around a WanDiT, e.g. the digits' class-conditioned DiT), got "
                             f"{type(high_noise).__name__} and {type(low_noise).__name__}")
        if high_noise.config != low_noise.config:
            raise ValueError(f"WanExperts: the experts' configs differ: {high_noise.config} vs {low_noise.config}")
        if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0.0 < boundary < 1.0:
            raise ValueError(f"WanExperts: boundary must be an RF time in (0, 1), got {boundary!r}")
        self.high_noise = high_noise
        self.low_noise = low_noise
        self.boundary = float(boundary)

    @property
    def config(self):
        return self.high_noise.config

    def switch(self) -> TimeSwitchedNet:
        """The dispatch rule itself (docs/method.md §12.3): the one implementation, shared with the
        losses' and samplers' two-expert networks."""
        return TimeSwitchedNet(self.high_noise, self.low_noise, self.boundary)

    def uses_high_noise(self, timestep: Tensor) -> Tensor:
        """Per sample: True where the high-noise expert applies (``timestep`` [B], [B, L] or [B, 1, T, 1, 1],
        1000·σ; the sample's largest)."""
        return self.switch().uses_high(timestep)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, **conditioning: Tensor | None) -> Tensor:
        if not isinstance(timestep, Tensor) or timestep.ndim not in (1, 2, 5) or timestep.shape[0] != x.shape[0]:
            raise ValueError(f"timestep must be a tensor [B], [B, L] or [B, 1, T, 1, 1] with B = {x.shape[0]}, got "
                             f"{tuple(timestep.shape) if isinstance(timestep, Tensor) else type(timestep).__name__}")
        return self.switch()(x, timestep, context, **conditioning)
