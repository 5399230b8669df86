"""The optimizers of a run: AdamW (fp32 master weights under bf16 networks) and its learning-rate warmup."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rcm import ConfigError


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a linear learning-rate warmup (the reference: factor 1e-6 → 1 over `warmup` steps of
    this optimizer, then constant)."""

    lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup: int = 100

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr", f"must be a positive number, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must lie in [0, 1), got {self.betas}")
        for name, ok in (("weight_decay", self.weight_decay >= 0), ("eps", self.eps > 0), ("warmup", self.warmup >= 0)):
            if not ok:
                raise ConfigError(name, f"must be {'> 0' if name == 'eps' else '>= 0'}, got {getattr(self, name)}")


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW stepping fp32 master copies of low-precision (bf16) model parameters.

    The networks compute and take gradients in bf16; ``step`` moves the gradients onto the fp32 masters,
    updates them, and copies them back into the model. The masters travel in ``state_dict``, so a
    resumed run continues from the exact fp32 values (the reference's FusedAdam with master weights)."""

    def __init__(self, params, **kwargs):
        self.model_params = [p for p in params]
        masters = [p.detach().to(torch.float32, copy=True).requires_grad_(True) for p in self.model_params]
        super().__init__(masters, **kwargs)

    def _masters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        for p, m in zip(self.model_params, self._masters()):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
        super().step()
        for p, m in zip(self.model_params, self._masters()):
            p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "master_weights": [m.detach().clone() for m in self._masters()]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, m, saved in zip(self.model_params, self._masters(), masters, strict=True):
                m.copy_(saved)
                p.copy_(saved)


WARMUP_START = 1e-6  # the learning-rate factor of the first step (the reference's warmup starts there)


def warmup_factor(step: int, warmup: int) -> float:
    """The learning-rate factor after ``step`` steps: linear from ``WARMUP_START`` to 1 over ``warmup``."""
    return WARMUP_START + (1 - WARMUP_START) * min(1.0, step / warmup) if warmup > 0 else 1.0


def build_optimizer(params, cfg: OptimizerConfig):
    """(optimizer, scheduler) for ``params``: plain AdamW for fp32 parameters, ``MasterWeightAdamW``
    for low-precision ones; fused on CUDA (one kernel for the whole update)."""
    params = list(params)
    cls = torch.optim.AdamW if all(p.dtype == torch.float32 for p in params) else MasterWeightAdamW
    fused = all(p.is_cuda for p in params)
    opt = cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused or None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda n: warmup_factor(n, cfg.warmup))
