"""The Wan DiT variants beyond Wan2.1 T2V (docs/wan_models.md): Wan2.1 I2V-14B-style (conditioning
channels + CLIP image cross-attention), Wan2.2 TI2V-5B-style (per-token timesteps) and Wan2.2 A14B's
two experts as one network of t. Tiny random configs, fp32 parity with diffusers' implementation
from every supported layout, strict loading errors, and the JVP through an I2V DiT in fp64.

diffusers' I2V attention splits its context as "everything but the last 512 tokens is image", so the
I2V parity configs use text_len = 512 (as every real Wan model).
"""

import math

import pytest
import torch

from rcm.models import (
    WAN_CONFIGS,
    WanDiT,
    WanExperts,
    dit_state_dict_to_diffusers,
    load_dit,
    load_wan_experts,
    save_dit,
    save_wan_experts,
    wan_config,
    wan_config_to_diffusers,
)
from test_checkpoint_loading import random_model, rel

I2V = wan_config("wan-tiny-i2v", text_len=512)  # CLIP image tokens + 8 conditioning channels
TI2V = wan_config("wan-tiny-ti2v")
EXPERT = wan_config("wan-tiny-i2v-experts", text_len=512)  # Wan2.2 I2V-A14B style: no CLIP
B, T, H, W = 3, 2, 4, 6  # 2·2·3 = 12 patch tokens


def draw(cfg, b=B, seed=1, dtype=torch.float32):
    """(x [B, out_dim, ...], y [B, cond_dim, ...] or None, timestep [B], context, image tokens or None)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.out_dim, T, H, W, generator=g, dtype=dtype)
    y = torch.randn(b, cfg.cond_dim, T, H, W, generator=g, dtype=dtype) if cfg.cond_dim else None
    t = torch.tensor([971.5, 412.25, 25.0, 899.0, 903.0][:b], dtype=dtype)
    c = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g, dtype=dtype)
    img = torch.randn(b, cfg.image_len, cfg.image_dim, generator=g, dtype=dtype) if cfg.image_dim else None
    return x, y, t, c, img


def diffusers_model(cfg, model=None, seed=3):
    """diffusers' WanTransformer3DModel of ``cfg``: ``model``'s weights converted, else random."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.WanTransformer3DModel(**wan_config_to_diffusers(cfg)).eval()
    if model is not None:
        ref.load_state_dict(dit_state_dict_to_diffusers(model.state_dict()), strict=True)
    else:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5 + (p.ndim == 1) * 0.5)
    return ref


def run_diffusers(ref, x, y, t, c, img):
    hidden = x if y is None else torch.cat([x, y], dim=1)
    with torch.no_grad():
        return ref(hidden, t, c, encoder_hidden_states_image=img).sample


def run_ours(model, x, y, t, c, img):
    with torch.no_grad():
        return model(x, t, c, y=y, image_context=img)


def check_parity(model, ref, inputs):
    a, b = run_ours(model, *inputs), run_diffusers(ref, *inputs)
    assert a.abs().max() > 0.1 and rel(a, b) <= 1e-5, rel(a, b)


# ------------------------------------------------------------------------------------------------
# Wan2.1 I2V-14B style


def test_i2v_parity_with_diffusers_from_every_layout(tmp_path):
    inputs = draw(I2V)
    ours = random_model(I2V)
    check_parity(ours, diffusers_model(I2V, ours), inputs)  # ours -> diffusers, key for key
    save_dit(ours, tmp_path / "official")
    save_dit(ours, tmp_path / "diffusers", layout="diffusers")
    save_dit(ours, tmp_path / "one.safetensors")
    torch.save(ours.state_dict(), tmp_path / "official.pth")  # no config: inferred from the shapes
    ref = diffusers_model(I2V, ours)
    for src in ("official", "diffusers", "one.safetensors", "official.pth"):
        loaded = load_dit(tmp_path / src, config=None if src != "official.pth" else I2V)
        assert loaded.config.image_dim == I2V.image_dim, src
        check_parity(loaded, ref, inputs)
    # diffusers -> ours through diffusers' own folder, config.json written by diffusers
    ref = diffusers_model(I2V)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = load_dit(tmp_path / "pipe", config=I2V)
    check_parity(loaded, ref, inputs)
    assert load_dit(tmp_path / "pipe", device="meta").config.image_dim == I2V.image_dim  # read from config.json


def test_i2v_y_is_the_channel_concatenation_and_image_tokens_matter():
    x, y, t, c, img = draw(I2V, b=2)
    model = random_model(I2V)
    split = run_ours(model, x, y, t, c, img)
    assert torch.equal(split, run_ours(model, torch.cat([x, y], 1), None, t, c, img))
    assert rel(run_ours(model, x, y, t, c, torch.randn_like(img)), split) > 1e-3  # the CLIP tokens enter the output
    assert rel(run_ours(model, x, y + 1, t, c, img), split) > 1e-3  # and so do the conditioning channels


def test_i2v_input_errors():
    x, y, t, c, img = draw(I2V, b=2)
    model = random_model(I2V)
    with pytest.raises(ValueError, match="image_context"):
        model(x, t, c, y=y)
    with pytest.raises(ValueError, match=r"image_context .*\[2, 5, 48\]"):
        model(x, t, c, y=y, image_context=img[:, :3])
    with pytest.raises(ValueError, match="y with 8"):
        model(x, t, c, image_context=img)
    with pytest.raises(ValueError, match="x has 4 and y 7 channels"):
        model(x, t, c, y=y[:, :7], image_context=img)
    with pytest.raises(ValueError, match="no image cross-attention"):
        random_model(TI2V)(torch.randn(2, 8, T, H, W), t, torch.randn(2, 8, 32), image_context=img)


# ------------------------------------------------------------------------------------------------
# Wan2.2 TI2V-5B style: per-token timesteps


def per_token_timesteps(t, tokens_per_frame, tokens):
    """The conditioning frame's tokens at t = 0, every other token at the sample's t (official TI2V)."""
    tt = t[:, None].expand(-1, tokens).clone()
    tt[:, :tokens_per_frame] = 0
    return tt


def test_ti2v_per_token_timesteps_parity_with_diffusers(tmp_path):
    x, _, t, c, _ = draw(TI2V)
    tokens = T * (H // 2) * (W // 2)
    tt = per_token_timesteps(t, (H // 2) * (W // 2), tokens)
    ours = random_model(TI2V)
    check_parity(ours, diffusers_model(TI2V, ours), (x, None, tt, c, None))
    check_parity(ours, diffusers_model(TI2V, ours), (x, None, t, c, None))  # text-only mode: one t per sample
    ref = diffusers_model(TI2V)
    ref.save_pretrained(tmp_path / "transformer")
    check_parity(load_dit(tmp_path / "transformer", config=TI2V), ref, (x, None, tt, c, None))
    # a constant per-token timestep is the per-sample one, and the conditioning frame's t matters
    same = run_ours(ours, x, None, t[:, None].expand(-1, tokens), c, None)
    assert rel(same, run_ours(ours, x, None, t, c, None)) <= 1e-6
    assert rel(run_ours(ours, x, None, tt, c, None), same) > 1e-4
    with pytest.raises(ValueError, match=r"\[B, L\]=\[3, 12\]"):
        ours(x, tt[:, :-1], c)


# ------------------------------------------------------------------------------------------------
# Wan2.2 A14B: two experts as one network of t


def test_experts_dispatch_per_sample_and_match_diffusers_from_every_layout(tmp_path):
    x, y, _, c, _ = draw(EXPERT, b=5)
    t = torch.tensor([950.0, 899.9, 900.0, 12.5, 999.0])  # boundary 0.9 -> 900: high, low, high, low, high
    high_ref, low_ref = diffusers_model(EXPERT, seed=5), diffusers_model(EXPERT, seed=6)
    want = torch.where(torch.tensor([1, 0, 1, 0, 1]).bool()[:, None, None, None, None],
                       run_diffusers(high_ref, x, y, t, c, None), run_diffusers(low_ref, x, y, t, c, None))
    # the diffusers layout of a pipeline: transformer/ (high noise), transformer_2/ (low), boundary_ratio
    high_ref.save_pretrained(tmp_path / "pipe" / "transformer")
    low_ref.save_pretrained(tmp_path / "pipe" / "transformer_2")
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9}')
    experts = load_wan_experts(tmp_path / "pipe", config=EXPERT)
    assert isinstance(experts, WanExperts) and experts.boundary == 0.9
    assert experts.uses_high_noise(t).tolist() == [True, False, True, False, True]
    got = run_ours(experts, x, y, t, c, None)
    assert rel(got, want) <= 1e-5, rel(got, want)
    for i in range(5):  # each sample saw only its own expert (the batch split changes nothing)
        one = run_ours(experts, x[i:i + 1], y[i:i + 1], t[i:i + 1], c[i:i + 1], None)
        assert rel(one, got[i:i + 1]) <= 1e-6
    # official layout (high_noise_model/, low_noise_model/) and our diffusers writer; boundary recorded
    for layout in ("official", "diffusers"):
        save_wan_experts(experts, tmp_path / layout, layout=layout)
        again = load_wan_experts(tmp_path / layout)
        assert again.boundary == 0.9 and again.config == experts.config
        assert rel(run_ours(again, x, y, t, c, None), want) <= 1e-5
    # no boundary in the files: the official config's (I2V 0.900, T2V 0.875)
    save_dit(experts.high_noise, tmp_path / "bare" / "high_noise_model")
    save_dit(experts.low_noise, tmp_path / "bare" / "low_noise_model")
    assert load_wan_experts(tmp_path / "bare", device="meta").boundary == 0.9
    assert load_wan_experts(tmp_path / "bare", boundary=0.5, device="meta").boundary == 0.5


def test_experts_per_token_timesteps_and_errors():
    cfg = wan_config("wan-tiny")
    experts = WanExperts(random_model(cfg, seed=1), random_model(cfg, seed=2), boundary=0.875)
    tt = torch.tensor([[0.0, 880.0], [0.0, 100.0]])  # per-token: the noisy tokens' time decides
    assert experts.uses_high_noise(tt).tolist() == [True, False]
    with pytest.raises(ValueError, match="boundary"):
        WanExperts(random_model(cfg), random_model(cfg), boundary=875)
    with pytest.raises(ValueError, match="configs differ"):
        WanExperts(random_model(cfg), random_model(TI2V), boundary=0.9)


# ------------------------------------------------------------------------------------------------
# Strict loading


def test_strict_loading_names_the_key(tmp_path):
    model = random_model(I2V)
    sd = model.state_dict()
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.cross_attn.k_img.weight"}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\):\n    blocks\.1\.cross_attn\.k_img\.weight"):
        load_dit(tmp_path / "missing.pth", config=I2V)
    save_dit(model, tmp_path / "diffusers", layout="diffusers")
    no_clip = wan_config("wan-tiny-i2v-experts", text_len=512)  # the Wan2.2 I2V architecture: no CLIP
    with pytest.raises(ValueError, match=r"unexpected keys .*\n(.*\n)*    blocks\.0\.attn2\.add_k_proj\.weight"):
        load_dit(tmp_path / "diffusers", config=no_clip, device="meta")
    torch.save({**sd, "img_emb.proj.0.weight": torch.zeros(3)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"img_emb\.proj\.0\.weight: \[3\] vs \[48\]"):
        load_dit(tmp_path / "shape.pth", config=I2V, device="meta")


def test_real_presets_build_on_meta_with_their_sizes():
    expected = {"wan2.1-i2v-14b": 16.4e9, "wan2.2-ti2v-5b": 5.0e9, "wan2.2-t2v-a14b": 14.3e9, "wan2.2-i2v-a14b": 14.3e9}
    for name, params in expected.items():
        with torch.device("meta"):
            model = WanDiT(WAN_CONFIGS[name])
        n = sum(p.numel() for p in model.parameters())
        assert abs(n / params - 1) < 0.01, (name, n)
    assert WAN_CONFIGS["wan2.1-i2v-14b"].cond_dim == 20 and WAN_CONFIGS["wan2.2-i2v-a14b"].image_dim is None


# ------------------------------------------------------------------------------------------------
# The JVP through an I2V DiT (fp64): finite differences, and no tangent through the conditioning


def test_i2v_jvp_matches_finite_differences_and_conditioning_tangent_is_exactly_zero():
    cfg = wan_config("wan-tiny-i2v", num_layers=1)
    model = random_model(cfg).double()
    x, y, t, c, img = draw(cfg, b=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    dx, dy = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(y.shape, generator=g, dtype=torch.float64)
    dt = torch.tensor([3.0, -2.0], dtype=torch.float64)

    def net(x_, t_, y_):
        return model(x_, t_, c, y=y_, image_context=img)

    def fd(vx, vt, vy, h=1e-5):
        return (net(x + h * vx, t + h * vt, y + h * vy) - net(x - h * vx, t - h * vt, y - h * vy)) / (2 * h)

    zy = torch.zeros_like(y)
    with torch.no_grad():
        out, tangent = torch.func.jvp(net, (x, t, y), (dx, dt, zy))
        assert rel(tangent, fd(dx, dt, zy)) <= 1e-6, rel(tangent, fd(dx, dt, zy))
        # a zero tangent on the conditioning channels is exactly "y held fixed"
        _, closed = torch.func.jvp(lambda x_, t_: net(x_, t_, y), (x, t), (dx, dt))
        assert torch.equal(tangent, closed)
        # and only that tangent (zero) moves nothing: the tangent is exactly zero
        _, none = torch.func.jvp(lambda y_: net(x, t, y_), (y,), (zy,))
        assert torch.count_nonzero(none) == 0
        # the conditioning is differentiable when asked (so the zero above is not vacuous)
        _, through_y = torch.func.jvp(lambda y_: net(x, t, y_), (y,), (dy,))
        zx, zt = torch.zeros_like(x), torch.zeros_like(t)
        assert through_y.abs().max() > 1e-3 and rel(through_y, fd(zx, zt, dy)) <= 1e-6
    assert out.dtype == torch.float64 and math.isfinite(out.abs().max().item())


def test_i2v_with_per_token_timesteps_compiles_fullgraph():
    model = random_model(I2V)
    x, y, t, c, img = draw(I2V, b=2)
    tt = per_token_timesteps(t, (H // 2) * (W // 2), T * (H // 2) * (W // 2))
    compiled = torch.compile(lambda *a: model(a[0], a[1], c, y=a[2], image_context=a[3]), backend="aot_eager",
                             fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x, tt, y, img), model(x, tt, c, y=y, image_context=img)
    assert rel(got, want) <= 1e-6, rel(got, want)


def test_experts_are_one_teacher_callable_of_t_under_jvp():
    """Through the TrigFlow wrapper and torch.func.jvp (the sCM tangent's path), a batch straddling the
    boundary gives each sample its own expert's denoiser and tangent."""
    from rcm.models import FunctionalNet, trigflow_denoise

    cfg = wan_config("wan-tiny")
    high, low = random_model(cfg, seed=1), random_model(cfg, seed=2)
    experts = WanExperts(high, low, boundary=0.875)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, T, H, W, generator=g, dtype=torch.float64)
    c = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    rho = torch.tensor([0.95, 0.3], dtype=torch.float64)  # RF time: high-noise expert, low-noise expert
    t = torch.atan(rho / (1 - rho))  # TrigFlow time with sin t / (cos t + sin t) = rho
    dx, dt = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.tensor([0.1, -0.2], dtype=torch.float64)

    def denoise(net, context):
        return lambda x_, t_: trigflow_denoise(FunctionalNet(net, dict(net.named_parameters())), x_, t_, context).F

    with torch.no_grad():
        F, F_dot = torch.func.jvp(denoise(experts, c), (x, t), (dx, dt))
        for i, expert in enumerate((high, low)):
            one = slice(i, i + 1)
            Fi, Fi_dot = torch.func.jvp(denoise(expert, c[one]), (x[one], t[one]), (dx[one], dt[one]))
            assert rel(F[one], Fi) <= 1e-6 and rel(F_dot[one], Fi_dot) <= 1e-6
