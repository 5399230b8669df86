"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, chunked (cached) processing, key layouts, loading.
(Wan2.2: tests/test_vae_wan22.py, sharing the helpers here.)"""

import json

import pytest
import torch

from rcm.models.vae import (
    WanVAE,
    WanVAEConfig,
    detect_vae_layout,
    load_vae,
    save_vae,
    vae_state_dict_from_diffusers,
    vae_state_dict_from_official,
    vae_state_dict_to_diffusers,
    vae_state_dict_to_official,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm gains around 1, biases around 0, weights ~ 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return module.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def stats(cfg: WanVAEConfig):
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def diffusers_encode(model, video, cfg):
    mean, std = stats(cfg)
    with torch.no_grad():
        return (model.encode(video).latent_dist.mean - mean) / std


def diffusers_decode(model, latent, cfg):
    mean, std = stats(cfg)
    with torch.no_grad():
        return model.decode(latent * std + mean).sample


def video_like(b, t, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


TINY = WanVAEConfig.tiny()


@pytest.fixture(scope="module")
def pair():
    """Our random tiny VAE and diffusers' model holding the same weights (converted ours -> diffusers)."""
    ours = randomize_(WanVAE(TINY), seed=0)
    theirs = AutoencoderKLWan(**TINY.to_diffusers()).eval()
    theirs.load_state_dict(vae_state_dict_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


# ---------------------------------------------------------------------------------------------------
# parity


def test_parity_ours_to_diffusers(pair):
    ours, theirs = pair
    video = video_like(2, 5, 24, 16, seed=1)
    z = ours.encode(video)
    assert z.shape == (2, 16, 2, 3, 2) and z.dtype == torch.float32
    assert rel(z, diffusers_encode(theirs, video, TINY)) <= 1e-5
    x = ours.decode(z)
    x_ref = diffusers_decode(theirs, z, TINY)
    assert x.shape == video.shape
    assert (x_ref.abs() < 1).float().mean() > 0.5, "decoder output saturated: the comparison would be vacuous"
    assert rel(x, x_ref) <= 1e-5


def test_parity_diffusers_to_ours():
    """The other direction, on a structure variant (1 residual block per stage, other temporal pattern)."""
    cfg = WanVAEConfig(base_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, False),
                       z_dim=4, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))  # fmt: skip
    theirs = randomize_(AutoencoderKLWan(**cfg.to_diffusers()), seed=2)
    ours = WanVAE(cfg).eval()
    ours.load_state_dict(vae_state_dict_from_diffusers(theirs.state_dict(), cfg), strict=True)
    video = video_like(1, 5, 16, 16, seed=3)  # temporal factor 2: 5 frames -> 3 latent frames
    z = ours.encode(video)
    assert z.shape == (1, 4, 3, 4, 4)
    assert rel(z, diffusers_encode(theirs, video, cfg)) <= 1e-5
    assert rel(ours.decode(z), diffusers_decode(theirs, z, cfg)) <= 1e-5


def test_chunked_long_video_matches_diffusers_and_one_pass(pair):
    """The causal cache makes chunk-by-chunk processing equal to diffusers' own chunked path (first
    frame, then 4 at a time / one latent frame at a time) and to one pass over the whole clip."""
    ours, theirs = pair
    video = video_like(1, 17, 16, 8, seed=4)  # 5 latent frames
    z_ref = diffusers_encode(theirs, video, TINY)
    for chunk in (1, 2, None):  # 2: uneven last chunk
        assert rel(ours.encode(video, chunk_size=chunk), z_ref) <= 1e-5, chunk
    z = z_ref
    x_ref = diffusers_decode(theirs, z, TINY)
    assert x_ref.shape[2] == 17
    for chunk in (1, 2, None):
        assert rel(ours.decode(z, chunk_size=chunk), x_ref) <= 1e-5, chunk


def test_causality(pair):
    """Frames only depend on earlier frames: a prefix of the input gives a prefix of the output."""
    ours, _ = pair
    video = video_like(1, 9, 16, 8, seed=5)
    z = ours.encode(video)
    assert rel(ours.encode(video[:, :, :5]), z[:, :, :2]) <= 1e-5
    x = ours.decode(z)
    assert rel(ours.decode(z[:, :, :2]), x[:, :, :5]) <= 1e-5


def test_large_batches_are_sliced_and_huge_chunks_refused(pair):
    ours, _ = pair
    video = video_like(3, 5, 16, 8, seed=7)
    z, x = ours.encode(video), ours.decode(ours.encode(video))
    limit = ours._largest_activation(5, 16, 8)  # room for one sample of one 5-frame chunk
    ours.MAX_ACTIVATION_ELEMENTS = limit
    try:
        assert ours._batch_slice(3, 1, 2, 16, 8) == 1
        assert rel(ours.encode(video), z) <= 1e-5 and rel(ours.decode(z), x) <= 1e-5
        with pytest.raises(ValueError, match="chunk_size=None gives chunks of 9 frames"):
            ours.decode(torch.zeros(1, 16, 3, 2, 1), chunk_size=None)
    finally:
        del ours.MAX_ACTIVATION_ELEMENTS
    with torch.device("meta"):
        full = WanVAE()
    assert full._batch_slice(8, 1, 21, 480, 832) >= 2  # Wan's chunks at 480p: several samples at a time
    with pytest.raises(ValueError, match="smaller chunk_size"):  # one pass over 81 frames at 480p
        full._batch_slice(1, None, 21, 480, 832)


def test_encode_decode_validation(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="video.*1 \\+ 4k frames"):
        ours.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="video.*multiples of 8"):
        ours.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="video must be a \\[B, 3, T, H, W\\]"):
        ours.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match="video must be floating point"):
        ours.encode(torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="latent must be a \\[B, 16, T, h, w\\]"):
        ours.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        ours.decode(torch.zeros(1, 16, 2, 2, 2), chunk_size=0)


def test_config():
    d = WanVAEConfig()
    assert (d.spatial_factor, d.temporal_factor) == (8, 4)
    assert d.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    assert WanVAEConfig.from_diffusers(TINY.to_diffusers()) == TINY
    with torch.device("meta"):
        default = AutoencoderKLWan()
    assert WanVAEConfig.from_diffusers(dict(default.config)) == WanVAEConfig()
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAEConfig.from_diffusers({**TINY.to_diffusers(), "attn_scales": [0.5]})
    with pytest.raises(ValueError, match="in_channels=3 with patch_size=2"):
        WanVAEConfig.from_diffusers({**TINY.to_diffusers(), "patch_size": 2})
    with pytest.raises(ValueError, match="latents_mean"):
        WanVAEConfig(z_dim=4)


# ---------------------------------------------------------------------------------------------------
# key layouts


def test_full_size_keys_and_shapes_match_diffusers():
    """The released architecture (built on the meta device): same parameters as AutoencoderKLWan()."""
    with torch.device("meta"):
        ours = WanVAE()
        theirs = AutoencoderKLWan()
    mine = {k: v.shape for k, v in vae_state_dict_to_diffusers(ours.state_dict()).items()}
    ref = {k: v.shape for k, v in theirs.state_dict().items()}
    assert mine == ref
    assert sum(v.numel() for v in ours.parameters()) == sum(v.numel() for v in theirs.parameters())


def test_key_conversion_round_trips():
    with torch.device("meta"):
        sd = WanVAE().state_dict()
    official = vae_state_dict_to_official(sd)
    dif = vae_state_dict_to_diffusers(sd)
    assert detect_vae_layout(sd) == "ours"
    assert detect_vae_layout(official) == "official"
    assert detect_vae_layout(dif) == "diffusers"
    # the official layout's own names
    assert {"conv1.weight", "conv2.bias", "encoder.conv1.weight", "encoder.head.0.gamma", "decoder.head.2.bias",
            "encoder.middle.1.to_qkv.weight", "encoder.downsamples.2.resample.1.weight",
            "encoder.downsamples.5.time_conv.weight", "decoder.upsamples.3.time_conv.bias",
            "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.weight",
            "decoder.middle.0.residual.6.weight"} <= set(official)  # fmt: skip
    for a, b in [
        (vae_state_dict_from_official(official), sd),
        (vae_state_dict_from_diffusers(dif), sd),
        (vae_state_dict_to_diffusers(vae_state_dict_from_official(official)), dif),
        (vae_state_dict_to_official(vae_state_dict_from_diffusers(dif)), official),
    ]:
        assert set(a) == set(b)
        assert all(a[k] is b[k] for k in b)  # renames only: the very same tensors
    # without a config the structure is inferred from the keys; with it, the same
    assert set(vae_state_dict_from_official(official, WanVAEConfig())) == set(sd)


def test_official_mapping_agrees_with_diffusers_converter():
    """diffusers ships its own official -> diffusers converter (for the released structure): ours agrees."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = randomize_(WanVAE(TINY), seed=6).state_dict()
    converted = convert_wan_vae_to_diffusers(vae_state_dict_to_official(sd))
    mine = vae_state_dict_to_diffusers(sd)
    assert set(converted) == set(mine)
    assert all(converted[k] is mine[k] for k in mine)


# ---------------------------------------------------------------------------------------------------
# loading


@pytest.fixture(scope="module")
def files(tmp_path_factory, pair):
    ours, theirs = pair
    root = tmp_path_factory.mktemp("vae")
    torch.save(vae_state_dict_to_official(ours.state_dict()), root / "Wan2.1_VAE.pth")
    theirs.save_pretrained(root / "pipeline" / "vae")
    save_vae(ours, root / "ours.safetensors")
    return root


def test_load_official_pth(files, pair):
    ours, _ = pair
    m = load_vae(files / "Wan2.1_VAE.pth", dtype=torch.bfloat16, config=TINY)
    ref = ours.state_dict()
    for k, v in m.state_dict().items():
        assert v.dtype == torch.bfloat16 and v.device.type == "cpu"
        assert torch.equal(v, ref[k].to(torch.bfloat16)), k
    assert not any(p.requires_grad for p in m.parameters()) and not m.training
    x = m.decode(torch.zeros(1, 16, 2, 2, 2))  # runs in bf16
    assert x.dtype == torch.float32 and x.shape == (1, 3, 5, 16, 16) and torch.isfinite(x).all()


def test_load_diffusers_folder(files, pair):
    ours, _ = pair
    for path in (files / "pipeline", files / "pipeline" / "vae"):  # pipeline root or its vae/ folder
        m = load_vae(path)  # config from config.json
        assert m.config == TINY
        ref = ours.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())


def test_load_our_safetensors_and_diffusers_layout_file(files, pair, tmp_path):
    ours, _ = pair
    m = load_vae(files / "ours.safetensors", config=TINY)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in m.state_dict().items())
    save_vae(ours, tmp_path / "dif", layout="diffusers")
    assert json.loads((tmp_path / "dif" / "config.json").read_text())["base_dim"] == TINY.base_dim
    m = load_vae(tmp_path / "dif")
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in m.state_dict().items())


def _official(pair):
    ours, _ = pair
    return {k: v.clone() for k, v in vae_state_dict_to_official(ours.state_dict()).items()}


def test_bad_checkpoints_give_clear_errors(pair, tmp_path):
    def load(sd, name):
        torch.save(sd, tmp_path / name)
        return load_vae(tmp_path / name, config=TINY)

    sd = _official(pair)
    del sd["decoder.upsamples.3.time_conv.weight"]
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\):\s+decoder\.upsamples\.3\.time_conv\.weight"):
        load(sd, "missing.pth")

    sd = _official(pair)
    sd["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)unexpected keys \(1\):\s+decoder\.extra\.weight"):
        load(sd, "extra.pth")

    sd = _official(pair)
    sd["encoder.head.2.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*encoder\.head\.2\.bias: \[7\] vs \[32\]"):
        load(sd, "shape.pth")

    # all problems in one error
    sd = _official(pair)
    del sd["conv1.weight"]
    sd["bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)missing keys.*conv1\.weight.*unexpected keys.*bogus"):
        load(sd, "both.pth")

    # the released config against a tiny checkpoint: shape mismatches, named as in the file
    torch.save(_official(pair), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match=r"shape mismatches \(188, file vs model\):\n    decoder\.conv1\.bias: \[16\] vs \[384\]"):
        load_vae(tmp_path / "tiny.pth")


def test_truncated_and_foreign_files(files, tmp_path):
    data = (files / "Wan2.1_VAE.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_vae(tmp_path / "cut.pth", config=TINY)
    data = (files / "ours.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_vae(tmp_path / "cut.safetensors", config=TINY)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text((files / "pipeline" / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_vae(tmp_path / "vae")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not a Wan VAE state dict"):
        load_vae(tmp_path / "foreign.pth")
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "nope.pth")



# ---------------------------------------------------------------------------------------------------
# the fast decode path: bf16 and channels-last against the fp32 decode

# relative L2 of a bf16 decode against fp32: bf16 convolutions dominate (random tiny weights: 1.3e-2 to 3.3e-2
# over seeds, the same with the fp32-applied norm of before); a layout or ordering bug gives ~1
BF16_DECODE_REL_TOL = 5e-2


@pytest.mark.parametrize("cfg", [TINY, WanVAEConfig.tiny_wan22()], ids=["wan21", "wan22"])
def test_fast_decode_paths_match_fp32(cfg):
    ours = randomize_(WanVAE(cfg), seed=20)
    z = ours.encode(video_like(1, 9, 32, 48, seed=21))
    x32 = ours.decode(z)
    assert (x32.abs() < 1).float().mean() > 0.5
    assert rel(ours.decode(z, channels_last=True), x32) <= 1e-6
    bf16 = randomize_(WanVAE(cfg), seed=20).to(torch.bfloat16)
    for channels_last in (False, True):
        x = bf16.decode(z, channels_last=channels_last)
        assert x.dtype == torch.float32 and rel(x, x32) <= BF16_DECODE_REL_TOL, channels_last


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channels_last_decode_keeps_the_layout_on_cuda():
    """On CUDA (cuDNN) the decoder's convolutions must see channels-last inputs all the way through,
    else the layout is converted back and forth and the fast path is slower than the plain one."""
    from rcm.models.vae.blocks import CausalConv3d

    cfg = WanVAEConfig(base_dim=16)
    ours = randomize_(WanVAE(cfg), seed=22).cuda()
    z = torch.randn(1, 16, 3, 16, 24, device="cuda")
    x32 = ours.decode(z)
    ours = ours.to(torch.bfloat16)
    misses = []
    hooks = [m.register_forward_pre_hook(lambda m, a: misses.append(
        (type(m).__name__, tuple(a[0].shape)) if not a[0].is_contiguous(memory_format=torch.channels_last_3d) else None))
        for m in ours.decoder.modules() if isinstance(m, CausalConv3d)]  # fmt: skip
    x = ours.decode(z, channels_last=True)
    for h in hooks:
        h.remove()
    assert [m for m in misses if m] == []
    assert rel(x, x32) <= BF16_DECODE_REL_TOL
