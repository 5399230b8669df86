"""Wan2.1 DiT (rcm/models/wan.py): shapes, official keys, RoPE, patchify, JVP, compile, input checks.

CPU, tiny config; the whole file runs in well under a minute (the inductor test is opt-in: RCM_SLOW=1).
"""
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import rcm.kernels
from rcm.models import dit_state_dict_to_diffusers
from rcm.models.wan import (
    WAN_CONFIGS,
    WanBlock,
    WanConfig,
    WanDiT,
    patchify,
    rope_apply,
    rope_dims,
    rope_table,
    sinusoidal_embedding,
    unpatchify,
    wan_config,
)

TINY = wan_config("wan-tiny")
B, T, H, W = 2, 2, 8, 6  # patch grid 2 x 4 x 3 = 24 tokens


def make_model(dtype=torch.float32, seed=0, cfg=TINY) -> WanDiT:
    """Tiny model with a random (non-zero) head, so outputs and derivatives are non-trivial."""
    torch.manual_seed(seed)
    model = WanDiT(cfg)
    g = torch.Generator().manual_seed(seed)
    model.init_weights(generator=g)
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.05, generator=g)
        model.head.head.bias.normal_(0, 0.05, generator=g)
    return model.to(dtype)


def make_inputs(dtype=torch.float32, seed=1, cfg=TINY, b=B, t=T, h=H, w=W):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_dim, t, h, w, generator=g, dtype=dtype)
    timestep = torch.tensor([37.5, 912.25, 500.0, 3.0][:b], dtype=dtype)
    context = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g, dtype=dtype)
    return x, timestep, context


def official_state_dict_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """The official Wan2.1 key list of docs/method.md §8, expanded for a config."""
    d, f = cfg.dim, cfg.ffn_dim
    out = cfg.out_dim * math.prod(cfg.patch_size)
    keys = {
        "patch_embedding.weight": (d, cfg.in_dim, *cfg.patch_size), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (out, d), "head.head.bias": (out,),
    }
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        keys[p + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                keys[f"{p}{attn}.{proj}.weight"] = (d, d)
                keys[f"{p}{attn}.{proj}.bias"] = (d,)
            keys[f"{p}{attn}.norm_q.weight"] = (d,)
            keys[f"{p}{attn}.norm_k.weight"] = (d,)
        keys[p + "norm3.weight"] = (d,)
        keys[p + "norm3.bias"] = (d,)
        keys[p + "ffn.0.weight"], keys[p + "ffn.0.bias"] = (f, d), (f,)
        keys[p + "ffn.2.weight"], keys[p + "ffn.2.bias"] = (d, f), (d,)
    return keys


# ------------------------------------------------------------------------------------------------
# Config


def test_named_configs():
    c13, c14 = wan_config("wan2.1-t2v-1.3b"), wan_config("wan2.1-t2v-14b")
    assert (c13.dim, c13.ffn_dim, c13.num_heads, c13.num_layers, c13.head_dim) == (1536, 8960, 12, 30, 128)
    assert (c14.dim, c14.ffn_dim, c14.num_heads, c14.num_layers, c14.head_dim) == (5120, 13824, 40, 40, 128)
    for c in (c13, c14):
        assert (c.in_dim, c.out_dim, c.patch_size, c.text_len, c.text_dim, c.freq_dim, c.eps) == (
            16, 16, (1, 2, 2), 512, 4096, 256, 1e-6)
        assert c.bf16_timestep is False
    assert TINY.head_dim == 64 and set(WAN_CONFIGS) >= {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan-tiny"}
    assert wan_config("wan-tiny", bf16_timestep=True).bf16_timestep is True
    with pytest.raises(ValueError, match="wan-tiny"):  # lists the valid names
        wan_config("wan2.1-t2v-7b")


@pytest.mark.parametrize("overrides, field", [
    (dict(dim=128, num_heads=3), r"dim \(128\) must be divisible by num_heads"),
    (dict(dim=64, num_heads=2), "head_dim"),  # 32 < 64: not supported by the attention op
    (dict(dim=130, num_heads=2), "head_dim"),  # 65: odd, RoPE rotates pairs
    (dict(dim=-128), "WanConfig.dim "),
    (dict(num_layers=0), "num_layers"),
    (dict(ffn_dim=-1), "ffn_dim"),
    (dict(patch_size=(1, 2)), "patch_size"),
    (dict(freq_dim=31), "freq_dim"),
    (dict(eps=0.0), "eps"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **overrides)


# ------------------------------------------------------------------------------------------------
# State dict


@pytest.mark.parametrize("name", ["wan-tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_state_dict_keys_match_official(name):
    cfg = wan_config(name)
    with torch.device("meta"):  # the big ones cost nothing on meta
        model = WanDiT(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_state_dict_shapes(cfg)
    assert not list(model.buffers())  # RoPE is not state


def test_init_weights_covers_every_parameter():
    """meta -> to_empty -> init_weights(seeded) equals an ordinary build with the same seed."""
    ref = WanDiT(TINY)
    ref.init_weights(generator=torch.Generator().manual_seed(3))
    with torch.device("meta"):
        model = WanDiT(TINY)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights(generator=torch.Generator().manual_seed(3))
    for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    # The documented choice: zero head, so the untrained net predicts exactly 0; modulation ~ N(0, 1/dim).
    assert not ref.head.head.weight.any() and not ref.head.head.bias.any()
    assert ref(*make_inputs()).abs().max() == 0
    assert 0.5 < ref.blocks[0].modulation.std().item() * TINY.dim ** 0.5 < 1.5


# ------------------------------------------------------------------------------------------------
# Forward


def test_forward_shape_dtype_and_attention_routing(monkeypatch):
    model = make_model()
    x, t, c = make_inputs()
    calls = []
    real = rcm.kernels.attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(rcm.kernels, "attention", spy)
    out = model(x, t, c)
    assert out.shape == (B, TINY.out_dim, T, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() > 1e-3
    L, heads, d = T * (H // 2) * (W // 2), TINY.num_heads, TINY.head_dim
    self_shape, cross_k = (B, L, heads, d), (B, TINY.text_len, heads, d)
    assert calls == [(self_shape, self_shape, self_shape), (self_shape, cross_k, cross_k)] * TINY.num_layers
    # Each sample depends on its own inputs only.
    out1 = model(x[1:], t[1:], c[1:])
    torch.testing.assert_close(out1, out[1:], rtol=1e-5, atol=1e-6)


def test_attention_fn_is_injectable_without_new_parameters():
    model = make_model()
    x, t, c = make_inputs()
    keys = list(model.state_dict())
    ref = model(x, t, c)
    seen = []

    def doubled(q, k, v):  # a wrapper around the op, as context parallelism installs
        seen.append(tuple(q.shape))
        return 2 * rcm.kernels.attention(q, k, v)

    for block in model.blocks:
        block.self_attn.attention_fn = doubled
    out = model(x, t, c)
    assert len(seen) == TINY.num_layers and list(model.state_dict()) == keys
    assert ((out - ref).norm() / ref.norm()).item() > 1e-3  # the installed function is what runs
    for block in model.blocks:
        block.self_attn.attention_fn = None  # back to rcm.kernels.attention
    assert torch.equal(model(x, t, c), ref)


def test_blocks_are_a_modulelist_of_wanblock_taking_plain_tensors():
    model = make_model()
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert all(type(b) is WanBlock for b in model.blocks) and len(model.blocks) == TINY.num_layers
    x, t, c = make_inputs()
    # Re-run the block stack by hand with the same plain tensors the model passes.
    grid = (T, H // 2, W // 2)
    e, e0 = model.time_embed(t, torch.float32)
    tokens = model.patch_embedding(x)
    ctx = model.text_embedding(c)
    rope = rope_table(grid, TINY.head_dim)
    for block in model.blocks:
        tokens = block(tokens, e0, ctx, rope)
    torch.testing.assert_close(unpatchify(model.head(tokens, e), grid, TINY.patch_size), model(x, t, c))


def test_bf16_parameters_run_and_track_fp32():
    model = make_model()
    x, t, c = make_inputs()
    ref = model(x, t, c)
    out = model.to(torch.bfloat16)(x, t, c)
    assert out.dtype == torch.float32  # head in fp32
    err = (out - ref).norm() / ref.norm()
    assert err < 3e-2, err


def test_bf16_timestep_flag_reproduces_reference_rounding():
    x, t, c = make_inputs()
    model = make_model()
    t_a = torch.tensor([933.78, 933.78])  # bf16 rounds 933.78 to 932 (spacing 4 in [512, 1024))
    t_b = torch.tensor([932.0, 932.0])
    assert not torch.equal(model(x, t_a, c), model(x, t_b, c))  # default: fp32 timestep
    model.config = dataclasses.replace(model.config, bf16_timestep=True)
    assert torch.equal(model(x, t_a, c), model(x, t_b, c))


def test_functional_call_uses_the_given_parameters():
    model = make_model()
    x, t, c = make_inputs()
    params = dict(model.named_parameters())
    out = torch.func.functional_call(model, params, (x, t, c))
    torch.testing.assert_close(out, model(x, t, c), rtol=0, atol=0)
    zero_head = {**params, "head.head.weight": torch.zeros_like(params["head.head.weight"]),
                 "head.head.bias": torch.zeros_like(params["head.head.bias"])}
    assert torch.func.functional_call(model, zero_head, (x, t, c)).abs().max() == 0


# ------------------------------------------------------------------------------------------------
# Patchify / unpatchify


def test_patchify_is_conv3d_order_and_unpatchify_is_official_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 8, generator=g)
    p = (2, 3, 2)
    tok = patchify(x, p)
    assert torch.equal(tok, rearrange(x, "b c (t kt) (h kh) (w kw) -> b (t h w) (c kt kh kw)", kt=2, kh=3, kw=2))
    grid = (2, 2, 4)
    y = torch.randn(2, math.prod(grid), math.prod(p) * 5, generator=g)
    assert torch.equal(unpatchify(y, grid, p),
                       rearrange(y, "b (t h w) (kt kh kw c) -> b c (t kt) (h kh) (w kw)",
                                 t=2, h=2, w=4, kt=2, kh=3, kw=2))
    # Round trip: reorder features (c k) -> (k c) between the two.
    back = unpatchify(rearrange(tok, "b l (c k) -> b l (k c)", c=3), (2, 2, 4), p)
    assert torch.equal(back, x)


def test_patch_embedding_equals_official_conv3d():
    model = make_model()
    x, _, _ = make_inputs()
    pe = model.patch_embedding
    conv = F.conv3d(x, pe.weight, pe.bias, stride=TINY.patch_size)  # [B, dim, T', H', W']
    torch.testing.assert_close(pe(x), conv.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Time embedding and RoPE


def test_sinusoid_is_cos_first_float64():
    t = torch.tensor([0.0, 250.5], dtype=torch.float32)
    phi = sinusoidal_embedding(t, 8)
    assert phi.dtype == torch.float64 and phi.shape == (2, 8)
    f = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    expect = torch.cat([torch.cos(250.5 * f), torch.sin(250.5 * f)])
    torch.testing.assert_close(phi[1], expect, rtol=0, atol=1e-12)
    assert torch.equal(phi[0], torch.tensor([1.0] * 4 + [0.0] * 4, dtype=torch.float64))


def official_rope_apply(x, grid, head_dim):
    """Official Wan2.1 rope_params(1024, ·) + rope_apply: complex multiply, split over complex pairs."""
    def rope_params(max_len, dim, theta=10000):
        freqs = torch.outer(torch.arange(max_len),
                            1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
        return torch.polar(torch.ones_like(freqs), freqs)

    d = head_dim
    freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                       rope_params(1024, 2 * (d // 6))], dim=1)
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    x_c = torch.view_as_complex(x.to(torch.float64).reshape(x.shape[0], f * h * w, n, -1, 2))
    freqs_i = torch.cat([
        freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    return torch.view_as_real(x_c * freqs_i).flatten(3)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_matches_official_wan(head_dim):
    grid = (3, 5, 4)
    x = torch.randn(2, math.prod(grid), 2, head_dim, dtype=torch.float64)
    ours = rope_apply(x, rope_table(grid, head_dim, dtype=torch.float64))
    torch.testing.assert_close(ours, official_rope_apply(x, grid, head_dim), rtol=0, atol=1e-12)
    assert rope_dims(128) == (44, 42, 42) and rope_dims(64) == (24, 20, 20)


def test_rope_preserves_norms_and_is_relative_along_each_axis():
    d, grid = 64, (6, 7, 5)
    rope = rope_table(grid, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, d, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64, generator=g)
    L = math.prod(grid)
    rq = rope_apply(q.expand(1, L, 1, d), rope)[0, :, 0]  # [L, d]: q at every position
    rk = rope_apply(k.expand(1, L, 1, d), rope)[0, :, 0]
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(L), rtol=1e-12, atol=0)
    # Pair norms too (a rotation acts on each interleaved pair separately).
    torch.testing.assert_close(rq.unflatten(-1, (-1, 2)).norm(dim=-1),
                               q.reshape(-1, 2).norm(dim=-1).expand(L, -1), rtol=1e-12, atol=1e-14)

    def idx(f, h, w):
        assert 0 <= f < grid[0] and 0 <= h < grid[1] and 0 <= w < grid[2]
        return (f * grid[1] + h) * grid[2] + w

    def dot(pq, pk):
        return (rq[idx(*pq)] * rk[idx(*pk)]).sum()

    base_q, base_k = [1, 2, 1], [0, 4, 2]
    for axis in range(3):
        shifted_q, shifted_k = list(base_q), list(base_k)
        shifted_q[axis] += 2
        shifted_k[axis] += 2  # same offset m - n, new absolute positions
        torch.testing.assert_close(dot(base_q, base_k), dot(shifted_q, shifted_k), rtol=1e-10, atol=1e-12)
        assert abs(dot(shifted_q, base_k) - dot(base_q, base_k)) > 1e-3  # offset changed: score changes
    # Position 0 is the identity rotation.
    torch.testing.assert_close(rq[0], q[0, 0, 0], rtol=0, atol=1e-15)


def test_rope_table_is_capped_like_official():
    cfg = dataclasses.replace(TINY, rope_max_len=3)
    model = WanDiT(cfg)
    x, t, c = make_inputs(cfg=cfg, h=6, w=8)  # grid (2, 3, 4): w exceeds 3
    with pytest.raises(ValueError, match="RoPE"):
        model(x, t, c)


# ------------------------------------------------------------------------------------------------
# Forward-mode AD and compile


def test_jvp_matches_central_finite_differences_float64():
    model = make_model(torch.float64)
    params = dict(model.named_parameters())
    x, t, c = make_inputs(torch.float64, b=2, h=4, w=4)
    g = torch.Generator().manual_seed(5)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dt = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def f(x_, t_):
        return torch.func.functional_call(model, params, (x_, t_, c))

    with torch.no_grad():  # how the sCM target is computed
        out, tangent = torch.func.jvp(f, (x, t), (dx, dt))
        torch.testing.assert_close(out, f(x, t), rtol=0, atol=0)
        h = 1e-4
        for tx, tt in ((dx, dt), (torch.zeros_like(dx), dt), (dx, torch.zeros_like(dt))):
            jvp = torch.func.jvp(f, (x, t), (tx, tt))[1]
            fd = (f(x + h * tx, t + h * tt) - f(x - h * tx, t - h * tt)) / (2 * h)
            assert jvp.abs().max() > 1e-3  # both x and the timestep contribute
            torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tangent, jvp + torch.func.jvp(f, (x, t), (torch.zeros_like(dx), dt))[1])


def test_compile_fullgraph_matches_eager_forward_and_grads():
    """fullgraph=True fails on any graph break; aot_eager keeps this fast (inductor: the slow test)."""
    model = make_model()
    x, t, c = make_inputs()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, t, c)
    grads_c = torch.autograd.grad(out_c.square().sum(), list(model.parameters()))
    out_e = model(x, t, c)
    grads_e = torch.autograd.grad(out_e.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e):  # compiled LayerNorm is spelled out (WanLayerNorm): fp32 rounding differs
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RCM_SLOW"), reason="inductor compile takes ~45 s on 2 cores; RCM_SLOW=1")
def test_compile_inductor_fullgraph_matches_eager():
    model = make_model()
    x, t, c = make_inputs()
    with torch.no_grad():
        out_c = torch.compile(model, fullgraph=True)(x, t, c)
        torch.testing.assert_close(out_c, model(x, t, c), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Input checks


def _bad(arg):
    x, t, c = make_inputs()
    return {
        "x rank": (x[:, :, 0], t, c),
        "x channels": (torch.randn(B, 3, T, H, W), t, c),
        "x H not divisible": (torch.randn(B, 4, T, 7, W), t, c),
        "x W not divisible": (torch.randn(B, 4, T, H, 5), t, c),
        "x int": (x.long(), t, c),
        "timestep rank": (x, t[:, None], c),
        "timestep batch": (x, t[:1], c),
        "context rank": (x, t, c[:, 0]),
        "context text_dim": (x, t, c[..., :16]),
        "context text_len": (x, t, c[:, :4]),
        "context batch": (x, t, c[:1]),
    }[arg]


@pytest.mark.parametrize("case", ["x rank", "x channels", "x H not divisible", "x W not divisible", "x int",
                                  "timestep rank", "timestep batch", "context rank", "context text_dim",
                                  "context text_len", "context batch"])
def test_bad_inputs_raise_value_error_naming_the_argument(case):
    model = make_model()
    arg = case.split()[0]
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        model(*_bad(case))


# ------------------------------------------------------------------------------------------------
# Parity with diffusers' implementation of the same architecture (test dependency)


def test_matches_diffusers_wan_transformer():
    diffusers = pytest.importorskip("diffusers")
    model = make_model()
    with torch.no_grad():  # randomize everything, norms included, to exercise every parameter
        for p in model.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    ref = diffusers.WanTransformer3DModel(
        patch_size=TINY.patch_size, num_attention_heads=TINY.num_heads, attention_head_dim=TINY.head_dim,
        in_channels=TINY.in_dim, out_channels=TINY.out_dim, text_dim=TINY.text_dim, freq_dim=TINY.freq_dim,
        ffn_dim=TINY.ffn_dim, num_layers=TINY.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=TINY.eps)
    ref.load_state_dict(dit_state_dict_to_diffusers(model.state_dict()), strict=True)  # rcm.models.wan_layouts
    x, t, c = make_inputs()
    with torch.no_grad():
        ours, theirs = model(x, t, c), ref(x, t, c).sample
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# GPU: bf16 parameters (the training configuration)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_gpu_bf16_forward_jvp_and_inductor_compile():
    dev = "cuda"
    x, t, c = (a.to(dev) for a in make_inputs())
    dx, dt = torch.randn_like(x), torch.tensor([0.5, -2.0], device=dev)
    ref_model = make_model().to(dev)
    model = make_model().to(dev, torch.bfloat16)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        ref_out, ref_tan = torch.func.jvp(lambda a, b: ref_model(a, b, c), (x, t), (dx, dt))
        out, tan = torch.func.jvp(lambda a, b: model(a, b, c), (x, t), (dx, dt))
        assert out.dtype == torch.float32 and tan.dtype == torch.float32
        assert rel(out, ref_out) < 3e-2 and rel(tan, ref_tan) < 5e-2, (rel(out, ref_out), rel(tan, ref_tan))
        compiled = torch.compile(model, fullgraph=True)
        assert rel(compiled(x, t, c), out) < 1e-2
    # Training forward + backward in bf16.
    model(x, t, c).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@needs_cuda
def test_gpu_wan_1p3b_bf16_smoke():
    cfg = wan_config("wan2.1-t2v-1.3b")
    with torch.device("cuda"):
        model = WanDiT(cfg).to(torch.bfloat16)
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
        x = torch.randn(1, 16, 2, 16, 16)  # 2 x 8 x 8 = 128 tokens
        t = torch.tensor([700.0])
        c = torch.randn(1, cfg.text_len, cfg.text_dim) * 0.1
    with torch.no_grad():
        out, tan = torch.func.jvp(lambda a, b: model(a, b, c), (x, t), (torch.randn_like(x), torch.ones_like(t)))
    assert out.shape == x.shape and torch.isfinite(out).all() and torch.isfinite(tan).all()
    assert out.abs().max() > 0 and tan.abs().max() > 0
