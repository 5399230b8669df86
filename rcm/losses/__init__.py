"""Pure loss functions of rCM (docs/method.md §2-4): networks in, per-sample losses out.

Every loss takes networks called as ``net(x, timestep, context) -> v`` (use
``rcm.models.trigflow.FunctionalNet(module, params, buffers)`` to evaluate a module on explicit
parameter dicts through ``torch.func.functional_call``), tensors, the random draws or an explicit
``torch.Generator``, and a frozen config; it returns a per-sample loss [B] and a small dict of
detached diagnostics. Nothing holds state.
"""
from rcm.losses.config import (
    RCM_PRESETS,
    ConfigError,
    DMDConfig,
    LogNormalTime,
    RCMConfig,
    SCMConfig,
    UniformShiftTime,
)
from rcm.losses.dmd import backward_simulation, dmd_loss, fake_score_loss, rollout_times
from rcm.losses.ema import ema_update_, power_ema_beta, power_ema_gamma
from rcm.losses.experts import expert_boundary_loss
from rcm.losses.objectives import (
    critic_iteration_count,
    critic_loss,
    is_student_iteration,
    rcm_phase,
    rollout_steps,
    student_iteration_count,
    student_losses,
)
from rcm.losses.scm import (
    normalize_tangent,
    scm_jvp,
    scm_loss,
    scm_target,
    tangent_warmup_ratio,
)

__all__ = [
    "ConfigError",
    "DMDConfig",
    "LogNormalTime",
    "RCMConfig",
    "RCM_PRESETS",
    "SCMConfig",
    "UniformShiftTime",
    "backward_simulation",
    "critic_iteration_count",
    "critic_loss",
    "dmd_loss",
    "ema_update_",
    "expert_boundary_loss",
    "fake_score_loss",
    "is_student_iteration",
    "normalize_tangent",
    "power_ema_beta",
    "power_ema_gamma",
    "rcm_phase",
    "rollout_steps",
    "rollout_times",
    "scm_jvp",
    "scm_loss",
    "scm_target",
    "student_iteration_count",
    "student_losses",
    "tangent_warmup_ratio",
]
