"""Image-to-video conditioning in the samplers (docs/method.md §12.2): the student's consistency sampler
and the teacher's Euler/UniPC keep the given frames exactly clean in every state and in the output."""
import pytest
import torch

from rcm.samplers import (
    consistency_times,
    sample_consistency,
    sample_euler,
    sample_unipc,
    shifted_flow_times,
    student_denoiser,
    teacher_velocity,
)
from tests.test_conditioning import (
    MASK,
    B,
    Recorder,
    T,
    ToyVideoNet,
    draws,
    frame_condition,
    generated,
    given,
)

f64 = torch.float64

def test_consistency_sampler_keeps_the_given_frames():
    net = Recorder(ToyVideoNet(seed=18))
    condition = frame_condition(7)
    out = sample_consistency(student_denoiser(net, None, condition=condition), draws(12)[0],
                             consistency_times(3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(given(out), given(condition.latent))
    assert len(net.calls) == 3
    for x_in, timestep, _ in net.calls:
        assert torch.equal(given(x_in), given(condition.latent)) and timestep.shape == (B, 1, T, 1, 1)


@pytest.mark.parametrize("sampler", [sample_euler, sample_unipc])
def test_teacher_samplers_keep_the_given_frames(sampler):
    net = Recorder(ToyVideoNet(seed=19))
    condition = frame_condition(8)
    rf_times = shifted_flow_times(5, shift=3.0)
    velocity = teacher_velocity(net, torch.zeros(B, dtype=f64), guidance=2.0,
                                negative_context=torch.ones(B, dtype=f64), condition=condition)
    out = sampler(velocity, draws(13)[0], rf_times)
    assert torch.equal(given(out), given(condition.latent))
    assert len(net.calls) == 2 * 5  # conditional and negative pass per step
    for i, (x_in, timestep, _) in enumerate(net.calls):
        rho = float(rf_times[i // 2])
        assert torch.equal(given(x_in), given(condition.latent))
        expected = torch.where(MASK, 0.0, 1000 * rho * torch.ones(B, 1, 1, 1, 1, dtype=f64))
        torch.testing.assert_close(timestep, expected, rtol=1e-12, atol=0)
    # the generated frames really are sampled (not left at noise or at the latent)
    plain = sampler(teacher_velocity(ToyVideoNet(seed=19), None), draws(13)[0], rf_times)
    assert not torch.equal(generated(out), generated(plain)) and generated(out).abs().max() > 0


def test_samplers_impose_the_condition_on_plain_callables():
    """A plain denoiser / velocity (not built with the condition) still gets clean given frames in every
    state the sampler makes, and the output keeps them: the samplers impose ``condition`` themselves."""
    condition = frame_condition(9)
    seen = []

    def denoiser(x, t):
        seen.append(x.clone())
        return x * 0.5 + 1.0  # moves every frame, the given ones too

    out = sample_consistency(denoiser, draws(14)[0], consistency_times(4), condition=condition,
                             generator=torch.Generator().manual_seed(0))
    assert len(seen) == 4 and all(torch.equal(given(x), given(condition.latent)) for x in seen)
    assert torch.equal(given(out), given(condition.latent))
    for sampler in (sample_euler, sample_unipc):
        seen.clear()

        def velocity(x, rho):
            seen.append(x.clone())
            return torch.sin(x) + rho.view(-1, 1, 1, 1, 1)  # non-zero on the given frames too

        out = sampler(velocity, draws(15)[0], shifted_flow_times(4, shift=3.0), condition=condition)
        assert len(seen) == 4 and all(torch.equal(given(x), given(condition.latent)) for x in seen)
        assert torch.equal(given(out), given(condition.latent))
        free = sampler(velocity, draws(15)[0], shifted_flow_times(4, shift=3.0))
        assert not torch.allclose(given(free), given(condition.latent))
