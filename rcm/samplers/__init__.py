"""Samplers (docs/method.md §5.2-5.3): short free functions over (callable, noise, times).

Student:  ``sample_consistency(student_denoiser(net, ctx), noise, consistency_times(4), generator=g)``
Teacher:  ``sample_unipc(teacher_velocity(net, ctx, guidance=5, negative_context=neg), noise,
          shifted_flow_times(50, shift=5))``, or ``sample_euler`` with the same arguments.
Each takes ``progress(step, num_steps)`` for a progress bar.
"""
from rcm.samplers.consistency import (
    StudentDenoiser,
    sample_consistency,
    student_denoiser,
)
from rcm.samplers.flow import (
    TeacherVelocity,
    sample_euler,
    sample_unipc,
    teacher_velocity,
)
from rcm.samplers.schedules import (
    DEFAULT_MID_TIMES,
    consistency_times,
    shifted_flow_times,
)

__all__ = [
    "DEFAULT_MID_TIMES",
    "StudentDenoiser",
    "TeacherVelocity",
    "consistency_times",
    "sample_consistency",
    "sample_euler",
    "sample_unipc",
    "shifted_flow_times",
    "student_denoiser",
    "teacher_velocity",
]
