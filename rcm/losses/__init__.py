"""Pure loss functions of rCM (docs/method.md §2-4): networks in, per-sample losses out.

Every loss takes networks called as ``net(x, timestep, context) -> v`` (use
``rcm.models.trigflow.FunctionalNet(module, params, buffers)`` to evaluate a module on explicit
parameter dicts through ``torch.func.functional_call``), tensors, the random draws or an explicit
``torch.Generator``, and a frozen config; it returns a per-sample loss [B] and a small dict of
detached diagnostics. Nothing holds state.
"""
from rcm import lazy_exports
from rcm.losses.config import (
    RCM_PRESETS,
    ConfigError,
    DMDConfig,
    LogNormalTime,
    RCMConfig,
    SCMConfig,
    UniformShiftTime,
)

# the loss functions (torch) are imported on first use: the configs above are all a command's help needs
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["backward_simulation", "dmd_loss", "fake_score_loss", "rollout_times"], "rcm.losses.dmd"),
    **dict.fromkeys(["ema_update_", "power_ema_beta", "power_ema_gamma"], "rcm.losses.ema"),
    "expert_boundary_loss": "rcm.losses.experts",
    **dict.fromkeys(["critic_iteration_count", "critic_loss", "is_student_iteration", "rcm_phase", "rollout_steps",
                     "student_iteration_count", "student_losses"], "rcm.losses.objectives"),
    **dict.fromkeys(["normalize_tangent", "scm_jvp", "scm_loss", "scm_target", "tangent_warmup_ratio"],
                    "rcm.losses.scm"),
})

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
