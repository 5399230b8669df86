"""The optimizers of a run: AdamW (fp32 master weights under bf16 networks) and its learning-rate warmup."""

from __future__ import annotations


import torch
from torch import Tensor

from rcm.train.config import OptimizerConfig


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
