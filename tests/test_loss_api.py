"""The loss and sampler API on bad input: the critic's non-finite isolation, network output-shape checks,
a ValueError naming the argument for every wrong input, and ConfigError naming the config field."""
import math

import pytest
import torch
from torch import nn

from rcm.losses import (
    ConfigError,
    DMDConfig,
    LogNormalTime,
    RCMConfig,
    SCMConfig,
    UniformShiftTime,
    backward_simulation,
    critic_loss,
    dmd_loss,
    ema_update_,
    fake_score_loss,
    is_student_iteration,
    normalize_tangent,
    power_ema_beta,
    power_ema_gamma,
    rcm_phase,
    rollout_steps,
    rollout_times,
    scm_jvp,
    scm_loss,
    scm_target,
    student_iteration_count,
    student_losses,
    tangent_warmup_ratio,
)
from rcm.models.trigflow import (
    classifier_free_guidance,
    per_sample,
    shift_rf_time,
    sigma_to_rf,
    trig_to_rf,
    trigflow_denoise,
)
from rcm.samplers import (
    consistency_times,
    sample_consistency,
    sample_euler,
    sample_unipc,
    shifted_flow_times,
    student_denoiser,
    teacher_velocity,
)

f64 = torch.float64
B, SHAPE = 4, (2, 1, 2, 2)  # batch; C, T, H, W


class Net(nn.Module):
    """A per-sample nonlinear velocity field; ``context`` [B] is added to v (NaN there: a NaN output)."""

    def __init__(self, seed: int, dim: int = 8, hidden: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp, self.out = nn.Linear(dim + 1, hidden, dtype=f64), nn.Linear(hidden, dim, dtype=f64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=f64) * 0.5)

    def forward(self, x, timestep, context):
        h = torch.cat([x.flatten(1), timestep[:, None] / 1000], dim=1)
        v = self.out(torch.tanh(self.inp(h))).view_as(x)
        return v if context is None else v + context.reshape(-1, *([1] * (x.ndim - 1)))


class Broken(nn.Module):
    """``net`` with a broken output: batch 1, flattened, or not a tensor."""

    def __init__(self, net, how):
        super().__init__()
        self.net, self.how = net, how

    def forward(self, x, timestep, context):
        v = self.net(x, timestep, context)
        return {"batch1": v[:1], "flat": v.flatten(1), "tuple": (v,)}[self.how]


def _draws(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *SHAPE, generator=g, dtype=f64)
    noise = torch.randn(B, *SHAPE, generator=g, dtype=f64)
    t = torch.rand(B, generator=g, dtype=f64) * 1.3 + 0.15
    return x0, noise, t


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters()}


# ------------------------------------------------------------------------------------------------
# critic: one non-finite sample does not poison the fake score's gradients


@pytest.mark.parametrize("where", ["G", "noise", "output"])
def test_critic_isolates_a_nonfinite_sample(where):
    fake = Net(seed=3)
    G, noise, t = _draws()
    ctx = torch.full((B,), 0.1, dtype=f64)
    bad = 2
    if where == "G":
        G[bad, 0, 0, 0, 0] = math.nan
    elif where == "noise":
        noise[bad, 1, 0, 1, 1] = math.inf
    else:  # finite input, NaN out of the network
        ctx[bad] = math.nan
    config = DMDConfig(critic_max_weight=None)
    loss, diag = fake_score_loss(G, fake, ctx, config=config, t=t, noise=noise)
    loss.sum().backward()
    grads = _grads(fake)
    fake.zero_grad()
    keep = torch.tensor([i for i in range(B) if i != bad])
    clean, clean_diag = fake_score_loss(G[keep], fake, ctx[keep], config=config, t=t[keep], noise=noise[keep])
    clean.sum().backward()
    assert int(diag["nonfinite"]) == 1 and int(clean_diag["nonfinite"]) == 0
    assert loss[bad] == 0 and torch.isfinite(loss).all()
    torch.testing.assert_close(loss[keep], clean, rtol=1e-12, atol=0)
    for k, v in _grads(fake).items():
        assert torch.isfinite(grads[k]).all(), k
        torch.testing.assert_close(grads[k], v, rtol=1e-12, atol=1e-14)


def test_critic_uncapped_weight_at_t0_of_a_zeroed_sample_stays_zero():
    fake = Net(seed=3)
    G, noise, t = _draws()
    G[0, 0, 0, 0, 0], t[0] = math.nan, 0.0  # weight 1/sin²0 = inf on a sample the guard zeroes
    loss, diag = fake_score_loss(G, fake, None, config=DMDConfig(critic_max_weight=None), t=t, noise=noise)
    assert loss[0] == 0 and torch.isfinite(loss).all() and int(diag["nonfinite"]) == 1


# ------------------------------------------------------------------------------------------------
# every network call of the losses and samplers checks the output's shape


def _network_calls():
    """(role, call(nets)) for every network call; nets maps the role to the (possibly broken) network."""
    x0, noise, t = _draws()
    ctx, neg = torch.zeros(B, dtype=f64), torch.ones(B, dtype=f64)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    scm = SCMConfig(guidance=3.0, tangent_warmup=0)
    rcm = RCMConfig(scm=SCMConfig(guidance=3.0, tangent_warmup=0), student_update_freq=2)
    return [
        ("student", "scm_loss", lambda n: scm_loss(n["student"], n["teacher"], x0, ctx, neg, iteration=0, config=scm,
                                                   t=t, noise=noise)),
        ("teacher", "scm_loss", lambda n: scm_loss(n["student"], n["teacher"], x0, ctx, neg, iteration=0, config=scm,
                                                   t=t, noise=noise)),
        ("teacher", "scm_loss (no CFG)", lambda n: scm_loss(n["student"], n["teacher"], x0, ctx, iteration=0,
                                                            config=SCMConfig(guidance=1.0), t=t, noise=noise)),
        ("student", "scm_jvp", lambda n: scm_jvp(n["student"], x0, t, ctx, noise)),
        ("teacher", "dmd_loss", lambda n: dmd_loss(x0, n["teacher"], n["fake_score"], ctx, neg, t=t, noise=noise)),
        ("fake_score", "dmd_loss", lambda n: dmd_loss(x0, n["teacher"], n["fake_score"], ctx, neg, t=t, noise=noise)),
        ("fake_score", "fake_score_loss", lambda n: fake_score_loss(x0, n["fake_score"], ctx, t=t, noise=noise)),
        ("student", "backward_simulation", lambda n: backward_simulation(n["student"], ctx, noise, 2, generator=gen())),
        ("student", "student_losses", lambda n: list(student_losses(
            n["student"], n["teacher"], n["fake_score"], x0, ctx, neg, iteration=2, config=rcm, generator=gen()))),
        ("fake_score", "student_losses (dmd)", lambda n: list(student_losses(
            n["student"], n["teacher"], n["fake_score"], x0, ctx, neg, iteration=2, config=rcm, generator=gen()))),
        ("student", "critic_loss", lambda n: critic_loss(n["student"], n["fake_score"], x0, ctx, iteration=1,
                                                         config=rcm, generator=gen())),
        ("fake_score", "critic_loss", lambda n: critic_loss(n["student"], n["fake_score"], x0, ctx, iteration=1,
                                                            config=rcm, generator=gen())),
        ("student", "sample_consistency", lambda n: sample_consistency(
            student_denoiser(n["student"], ctx), noise, consistency_times(2), generator=gen())),
        ("teacher", "sample_euler", lambda n: sample_euler(
            teacher_velocity(n["teacher"], ctx, guidance=3.0, negative_context=neg), noise, shifted_flow_times(2))),
        ("teacher", "sample_unipc", lambda n: sample_unipc(
            teacher_velocity(n["teacher"], ctx), noise, shifted_flow_times(3))),
    ]


@pytest.mark.parametrize("how", ["batch1", "flat", "tuple"])
@pytest.mark.parametrize("role,call", [(role, call) for role, _, call in _network_calls()],
                         ids=[f"{where}-{role}" for role, where, _ in _network_calls()])
def test_a_wrong_network_output_is_a_value_error_naming_the_network(role, call, how):
    nets = {"student": Net(1), "teacher": Net(2), "fake_score": Net(3)}
    call(nets)  # the healthy networks run
    nets[role] = Broken(nets[role], how)
    with pytest.raises(ValueError, match=rf"^{role}\b.* returned") as info:
        call(nets)
    expected = {"batch1": (1, *SHAPE), "flat": (B, math.prod(SHAPE)), "tuple": None}[how]
    message = str(info.value)
    assert str((B, *SHAPE)) in message  # the input's shape
    assert (str(expected) if expected else "tuple") in message  # and what came back


def test_wrong_denoiser_and_velocity_outputs_in_samplers():
    noise = torch.randn(B, *SHAPE, dtype=f64)
    with pytest.raises(ValueError, match=r"denoiser returned \(1, 2, 1, 2, 2\).*\(4, 2, 1, 2, 2\)"):
        sample_consistency(lambda x, t: x[:1], noise, consistency_times(1))
    with pytest.raises(ValueError, match=r"velocity returned \(4, 8\).*\(4, 2, 1, 2, 2\)"):
        sample_euler(lambda x, rho: x.flatten(1), noise, shifted_flow_times(2))
    with pytest.raises(ValueError, match="velocity returned list"):
        sample_unipc(lambda x, rho: [x], noise, shifted_flow_times(2))


# ------------------------------------------------------------------------------------------------
# a ValueError naming the argument for every wrong input


def _bad_calls():
    x0, noise, t = _draws()
    net = Net(1)
    ctx = torch.zeros(B, dtype=f64)
    gen = torch.Generator().manual_seed(0)
    meta = lambda x: x.to("meta")  # noqa: E731  (another device, on a CPU-only machine)
    scm = SCMConfig(guidance=1.0, tangent_warmup=0)

    def scm_call(**kw):
        args = dict(student=net, teacher=net, x0=x0, context=ctx, iteration=0, config=scm, t=t, noise=noise)
        args.update(kw)
        return lambda: scm_loss(**args)

    def fake_call(**kw):
        args = dict(G=x0, fake_score=net, context=ctx, t=t, noise=noise)
        args.update(kw)
        return lambda: fake_score_loss(**args)

    def sim_call(**kw):
        args = dict(student=net, context=None, noise=noise, num_steps=2, generator=gen)
        args.update(kw)
        return lambda: backward_simulation(**args)

    good_times = rollout_times(B, 2, generator=torch.Generator().manual_seed(1))
    rcm = RCMConfig(scm=SCMConfig(tangent_warmup=0), student_update_freq=2)
    return {
        # scm_loss: time, iteration, tensors, context, config, networks
        "t below 0": (scm_call(t=t - 1.0), "t must lie in"),
        "t above pi/2": (scm_call(t=t + 1.5), "t must lie in"),
        "t NaN": (scm_call(t=torch.full_like(t, math.nan)), "t must lie in"),
        "t integer": (scm_call(t=torch.ones(B, dtype=torch.long)), "^t must be"),
        "t other device": (scm_call(t=meta(t)), "^t must be on"),
        "iteration 1.5": (scm_call(iteration=1.5), "^iteration must be an int"),
        "iteration -1": (scm_call(iteration=-1), "^iteration must be an int"),
        "iteration bool": (scm_call(iteration=True), "^iteration must be an int"),
        "x0 integer": (scm_call(x0=torch.ones(B, *SHAPE, dtype=torch.long)), "^x0 must be"),
        "x0 1-D": (scm_call(x0=x0.flatten()), "^x0 must be"),
        "x0 not a tensor": (scm_call(x0=x0.tolist()), "^x0 must be"),
        "noise shape": (scm_call(noise=noise[:, :1]), "^noise must be"),
        "noise integer": (scm_call(noise=noise.long()), "^noise must be"),
        "noise other device": (scm_call(noise=meta(noise)), "^noise must be"),
        "labels batch": (scm_call(context=ctx[:2]), "^context must have one entry per sample"),
        "labels other device": (scm_call(context=meta(ctx)), "^context must have one entry per sample"),
        "negative batch": (scm_call(negative_context=ctx[:1]), "^negative_context must have one entry"),
        "config class": (scm_call(config=DMDConfig()), "^config must be a SCMConfig"),
        "student not callable": (scm_call(student="net"), "^student must be callable"),
        "jvp not callable": (scm_call(jvp=3), "^jvp must be callable"),
        "guidance -1 in CFG": (lambda: classifier_free_guidance(net, -1.0, ctx), "^guidance must be"),
        "guidance NaN in CFG": (lambda: classifier_free_guidance(net, math.nan, ctx), "^guidance must be"),
        "guidance string": (lambda: classifier_free_guidance(net, "5", ctx), "^guidance must be"),
        "guidance -2 in sampler": (lambda: teacher_velocity(net, ctx, guidance=-2.0), "^guidance must be"),
        # sCM pieces
        "warmup ratio iteration 1.5": (lambda: tangent_warmup_ratio(1.5, 10), "^iteration must be"),
        "warmup negative": (lambda: tangent_warmup_ratio(3, -1), "^tangent_warmup must be"),
        "tangent eps negative": (lambda: normalize_tangent(x0, -0.1), "^eps must be"),
        "tangent eps NaN": (lambda: normalize_tangent(x0, math.nan), "^eps must be"),
        "tangent g 1-D": (lambda: normalize_tangent(x0.flatten(), 0.1), "^g must be"),
        "scm_target ratio": (lambda: scm_target(x0, t, x0, x0, x0, warmup_ratio=1.5), "^warmup_ratio must be"),
        "scm_target F_minus": (lambda: scm_target(x0, t, x0, x0[:, :1], x0), "^F_minus must be"),
        "scm_jvp F_teacher": (lambda: scm_jvp(net, x0, t, ctx, x0[:2]), "^F_teacher must be"),
        "scm_jvp t": (lambda: scm_jvp(net, x0, t[:2], ctx, x0), "^t must be"),
        # DMD and critic
        "critic G integer": (fake_call(G=x0.long()), "^G must be"),
        "critic t above pi/2": (fake_call(t=t + 2), "^t must lie in"),
        "critic labels": (fake_call(context=ctx[:3]), "^context must have one entry"),
        "critic config": (fake_call(config=SCMConfig()), "^config must be a DMDConfig"),
        "critic fake_score": (fake_call(fake_score=None), "^fake_score must be callable"),
        "dmd negative labels": (lambda: dmd_loss(x0, net, net, ctx, ctx[:1], t=t, noise=noise),
                                "^negative_context must have one entry"),
        "dmd teacher": (lambda: dmd_loss(x0, 1.0, net, ctx, t=t, noise=noise), "^teacher must be callable"),
        # rollout
        "rollout num_steps 0": (sim_call(num_steps=0), "^num_steps must be an int >= 1"),
        "rollout num_steps 1.5": (sim_call(num_steps=1.5), "^num_steps must be an int >= 1"),
        "rollout times integer": (sim_call(times=good_times.long()), "^times must be a floating tensor"),
        "rollout times shape": (sim_call(times=good_times[:2]), "^times must be a floating tensor"),
        "rollout times range": (sim_call(times=good_times + 1), "^times must lie in"),
        "rollout times unsorted": (sim_call(times=good_times.flip(0)), "^times must be non-increasing"),
        "rollout noise": (sim_call(noise=noise[0, 0, 0, 0]), "^noise must be"),
        "rollout labels": (sim_call(context=ctx[:1]), "^context must have one entry"),
        "rollout_times batch 0": (lambda: rollout_times(0, 2, generator=gen), "^batch_size must be"),
        "rollout_times num_steps": (lambda: rollout_times(2, 2.0, generator=gen), "^num_steps must be"),
        "rollout_times config": (lambda: rollout_times(2, 2, config=RCMConfig()), "^config must be a DMDConfig"),
        "time sample batch": (lambda: LogNormalTime().sample(1.5, gen), "^batch_size must be"),
        "time sample batch 0": (lambda: UniformShiftTime().sample(0, gen), "^batch_size must be"),
        # schedule and objectives
        "schedule iteration 1.5": (lambda: is_student_iteration(1.5, 10, 5), "^iteration must be"),
        "schedule warmup": (lambda: is_student_iteration(3, -1, 5), "^warmup must be"),
        "schedule warmup float": (lambda: student_iteration_count(3, 1.5, 5), "^warmup must be"),
        "schedule freq": (lambda: is_student_iteration(3, 0, 0), "^freq must be"),
        "rollout_steps counter": (lambda: rollout_steps(-1, 4), "^counter must be"),
        "rollout_steps max": (lambda: rollout_steps(1, 0), "^max_steps must be"),
        "phase iteration without DMD": (lambda: rcm_phase(1.5, RCMConfig(dmd=DMDConfig(loss_scale=0.0))),
                                        "^iteration must be"),
        "phase config": (lambda: rcm_phase(3, SCMConfig()), "^config must be a RCMConfig"),
        "critic_loss iteration": (lambda: critic_loss(net, net, x0, ctx, iteration=1.5, config=rcm, generator=gen),
                                  "^iteration must be"),
        "critic_loss x0": (lambda: critic_loss(net, net, x0[0, 0, 0, 0], ctx, iteration=1, config=rcm, generator=gen),
                           "^x0 must be"),
        "student_losses iteration": (lambda: list(student_losses(net, net, net, x0, ctx, iteration=2.0, config=rcm,
                                                                 generator=gen)), "^iteration must be"),
        "student_losses x0": (lambda: list(student_losses(net, net, net, x0.long(), ctx, iteration=0, config=rcm,
                                                          generator=gen)), "^x0 must be"),
        # EMA
        "ema n 1.5": (lambda: power_ema_beta(1.5, 6.9), "^n must be"),
        "ema n -1": (lambda: power_ema_beta(-1, 6.9), "^n must be"),
        "ema gamma": (lambda: power_ema_beta(3, -2.0), "^gamma must be"),
        "ema sigma_rel": (lambda: power_ema_gamma("0.1"), "^sigma_rel must be"),
        "ema beta string": (lambda: ema_update_(Net(1), Net(2), "0.5"), "^beta must be"),
        "ema live": (lambda: ema_update_(Net(1), [1, 2], 0.5), "^live must be"),
        "ema device": (lambda: ema_update_(dict(Net(1).named_parameters()),
                                           {k: meta(v) for k, v in Net(2).named_parameters()}, 0.5), "is on cpu, live on meta"),
        # samplers
        "consistency num_steps 0": (lambda: consistency_times(0), "^num_steps must be"),
        "consistency num_steps bool": (lambda: consistency_times(True), "^num_steps must be"),
        "consistency sigma_max string": (lambda: consistency_times(2, sigma_max="80"), "^sigma_max must be"),
        "consistency mid-times unsorted": (lambda: consistency_times(3, mid_times=(1.0, 1.4)), "mid_times"),
        "consistency mid-time out of range": (lambda: consistency_times(2, mid_times=(2.0,)), "mid_times"),
        "consistency mid-time NaN": (lambda: consistency_times(2, mid_times=(math.nan,)), "mid_times"),
        "consistency mid-time string": (lambda: consistency_times(2, mid_times=("1.0",)), "^mid_times must be"),
        "flow num_steps": (lambda: shifted_flow_times(-3), "^num_steps must be"),
        "flow shift NaN": (lambda: shifted_flow_times(4, shift=math.nan), "^shift must be"),
        "flow sigma_max inf": (lambda: shifted_flow_times(4, sigma_max=math.inf), "^sigma_max must be"),
        "sampler times NaN": (lambda: sample_consistency(lambda x, t: x, noise, torch.tensor([math.nan, 0.0],
                                                                                               dtype=f64)), "^times must"),
        "sampler times above pi/2": (lambda: sample_consistency(lambda x, t: x, noise, torch.tensor([2.0, 0.0])),
                                     "^times must lie in"),
        "sampler times integer": (lambda: sample_consistency(lambda x, t: x, noise, torch.tensor([1, 0])),
                                  "^times must be a floating"),
        "sampler progress": (lambda: sample_consistency(lambda x, t: x, noise, consistency_times(1), progress=3),
                             "^progress must be callable"),
        "euler rf_times NaN": (lambda: sample_euler(lambda x, r: x, noise, torch.tensor([math.nan, 0.0])),
                               "^rf_times must"),
        "euler velocity": (lambda: sample_euler(None, noise, shifted_flow_times(2)), "^velocity must be callable"),
        "unipc order 1.5": (lambda: sample_unipc(lambda x, r: x, noise, shifted_flow_times(2), order=1.5),
                            "^order must be"),
        "unipc order 0": (lambda: sample_unipc(lambda x, r: x, noise, shifted_flow_times(2), order=0),
                          "^order must be"),
        "teacher_velocity net": (lambda: teacher_velocity("net", ctx), "^net must be callable"),
        # TrigFlow maps
        "time map string": (lambda: sigma_to_rf("80"), "^sigma must be"),
        "time map complex": (lambda: trig_to_rf(torch.ones(2, dtype=torch.complex64)), "^t must be"),
        "shift NaN": (lambda: shift_rf_time(0.5, math.nan), "^shift must be"),
        "per-sample shape": (lambda: per_sample(t[:2], x0), "^per-sample values"),
        "denoise t": (lambda: trigflow_denoise(net, x0, t[:1], ctx), "^t must be"),
    }


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_a_wrong_input_is_a_value_error_naming_the_argument(case):
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_integer_times_are_converted_not_rejected():
    assert trig_to_rf(torch.zeros(2, dtype=torch.long)).dtype == f64
    assert float(sigma_to_rf(1)) == 0.5


def test_the_range_check_accepts_pi_over_2_in_float32():
    x0, noise, _ = _draws()
    t = torch.full((B,), math.pi / 2, dtype=torch.float32)  # float32(π/2) > π/2
    assert t.double()[0] > math.pi / 2
    fake_score_loss(x0, Net(3), None, t=t, noise=noise)


# ------------------------------------------------------------------------------------------------
# configs: ConfigError naming the class and the field


CONFIG_CASES = [
    (lambda: LogNormalTime(p_mean=math.nan), "LogNormalTime", "p_mean"),
    (lambda: LogNormalTime(p_std=0.0), "LogNormalTime", "p_std"),
    (lambda: UniformShiftTime(shift=0.0), "UniformShiftTime", "shift"),
    (lambda: UniformShiftTime(shift=math.inf), "UniformShiftTime", "shift"),
    (lambda: SCMConfig(loss_scale=-1.0), "SCMConfig", "loss_scale"),
    (lambda: SCMConfig(guidance=-1.0), "SCMConfig", "guidance"),
    (lambda: SCMConfig(guidance=math.nan), "SCMConfig", "guidance"),
    (lambda: SCMConfig(tangent_warmup=1.5), "SCMConfig", "tangent_warmup"),
    (lambda: SCMConfig(tangent_warmup=-1), "SCMConfig", "tangent_warmup"),
    (lambda: SCMConfig(tangent_norm_eps=-0.1), "SCMConfig", "tangent_norm_eps"),
    (lambda: SCMConfig(tangent_norm_eps=0.0), "SCMConfig", "tangent_norm_eps"),
    (lambda: SCMConfig(time_dist="lognormal"), "SCMConfig", "time_dist"),
    (lambda: DMDConfig(loss_scale=math.inf), "DMDConfig", "loss_scale"),
    (lambda: DMDConfig(guidance=-0.5), "DMDConfig", "guidance"),
    (lambda: DMDConfig(time_dist=None), "DMDConfig", "time_dist"),
    (lambda: DMDConfig(max_simulation_steps=0), "DMDConfig", "max_simulation_steps"),
    (lambda: DMDConfig(max_simulation_steps=2.0), "DMDConfig", "max_simulation_steps"),
    (lambda: DMDConfig(fix_timesteps="yes"), "DMDConfig", "fix_timesteps"),
    (lambda: DMDConfig(backward_timesteps=(2.0,)), "DMDConfig", "backward_timesteps"),
    (lambda: DMDConfig(backward_timesteps=(1.0, 1.4)), "DMDConfig", "backward_timesteps"),
    (lambda: DMDConfig(backward_timesteps="1.5"), "DMDConfig", "backward_timesteps"),
    (lambda: DMDConfig(fix_timesteps=True, max_simulation_steps=5), "DMDConfig", "backward_timesteps"),
    (lambda: DMDConfig(omega_min=0.0), "DMDConfig", "omega_min"),
    (lambda: DMDConfig(omega_min=-1e-5), "DMDConfig", "omega_min"),
    (lambda: DMDConfig(critic_max_weight=0.0), "DMDConfig", "critic_max_weight"),
    (lambda: DMDConfig(critic_max_weight=math.nan), "DMDConfig", "critic_max_weight"),
    (lambda: RCMConfig(student_update_freq=0), "RCMConfig", "student_update_freq"),
    (lambda: RCMConfig(scm=DMDConfig()), "RCMConfig", "scm"),
    (lambda: RCMConfig(dmd=None), "RCMConfig", "dmd"),
]


@pytest.mark.parametrize("make,config,field", CONFIG_CASES, ids=[f"{c}.{f}-{i}" for i, (_, c, f) in
                                                                  enumerate(CONFIG_CASES)])
def test_config_errors_name_the_field(make, config, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert isinstance(info.value, ValueError)
    assert (info.value.config, info.value.field) == (config, field)
    assert str(info.value).startswith(f"{config}.{field} ")


def test_valid_configs_still_build():
    DMDConfig(fix_timesteps=True, backward_timesteps=[1.5, 1.5, 1.0], critic_max_weight=None, omega_min=1e-9)
    SCMConfig(tangent_norm_eps=1e-12, guidance=0.0, loss_scale=0.0)
    RCMConfig(dmd=DMDConfig(loss_scale=0.0))
