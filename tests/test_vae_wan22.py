"""Wan2.2 VAE (residual stages, 2x2 pixel patches, 48 channels, 16x spatial): parity with diffusers'
AutoencoderKLWan from each key layout, chunked equals one pass, the official key names, strict loading."""

import pytest
import torch

from rcm.models.vae import (
    WanVAE,
    WanVAEConfig,
    default_vae_config,
    detect_vae_layout,
    load_vae,
    vae_state_dict_from_diffusers,
    vae_state_dict_from_official,
    vae_state_dict_to_diffusers,
    vae_state_dict_to_official,
)
from tests.test_vae import (
    TINY,
    diffusers_decode,
    diffusers_encode,
    randomize_,
    rel,
    video_like,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan

TINY22 = WanVAEConfig.tiny_wan22()


@pytest.fixture(scope="module")
def pair22():
    ours = randomize_(WanVAE(TINY22), seed=10)
    theirs = AutoencoderKLWan(**TINY22.to_diffusers()).eval()
    theirs.load_state_dict(vae_state_dict_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


def test_wan22_parity_ours_to_diffusers(pair22):
    ours, theirs = pair22
    for b, t, h, w in [(2, 5, 32, 48), (1, 1, 16, 16), (1, 9, 48, 16)]:  # 1 + 4k frames, awkward sizes
        video = video_like(b, t, h, w, seed=t)
        z = ours.encode(video)
        assert z.shape == (b, 48, 1 + (t - 1) // 4, h // 16, w // 16)
        assert rel(z, diffusers_encode(theirs, video, TINY22)) <= 1e-5, (t, h, w)
        x, x_ref = ours.decode(z), diffusers_decode(theirs, z, TINY22)
        assert x.shape == video.shape
        assert (x_ref.abs() < 1).float().mean() > 0.5, "decoder output saturated: the comparison would be vacuous"
        assert rel(x, x_ref) <= 1e-5, (t, h, w)


def test_wan22_parity_diffusers_to_ours_structure_variant():
    """diffusers -> ours without a config (structure inferred from the keys and shapes), on a variant:
    3 stages, 1 block, temporal pattern (True, False), decoder narrower than the encoder, 4 channels."""
    cfg = WanVAEConfig(base_dim=8, decoder_base_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, z_dim=4,
                       temporal_downsample=(True, False), residual=True, patch_size=2,
                       latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))  # fmt: skip
    theirs = randomize_(AutoencoderKLWan(**cfg.to_diffusers()), seed=11)
    ours = WanVAE(cfg).eval()
    ours.load_state_dict(vae_state_dict_from_diffusers(theirs.state_dict()), strict=True)
    assert set(vae_state_dict_to_diffusers(ours.state_dict())) == set(theirs.state_dict())
    video = video_like(1, 5, 24, 8, seed=12)  # temporal factor 2: 5 frames -> 3 latent frames; 8x spatial
    z = ours.encode(video)
    assert z.shape == (1, 4, 3, 3, 1)
    assert rel(z, diffusers_encode(theirs, video, cfg)) <= 1e-5
    assert rel(ours.decode(z), diffusers_decode(theirs, z, cfg)) <= 1e-5


def test_wan22_chunked_equals_one_pass_and_is_causal(pair22):
    ours, theirs = pair22
    video = video_like(1, 17, 16, 32, seed=13)  # 5 latent frames
    z_ref = diffusers_encode(theirs, video, TINY22)
    x_ref = diffusers_decode(theirs, z_ref, TINY22)
    for chunk in (1, 2, None):  # 2: uneven last chunk
        assert rel(ours.encode(video, chunk_size=chunk), z_ref) <= 1e-5, chunk
        assert rel(ours.decode(z_ref, chunk_size=chunk), x_ref) <= 1e-5, chunk
    assert rel(ours.encode(video[:, :, :9], chunk_size=None), z_ref[:, :, :3]) <= 1e-5
    assert rel(ours.decode(z_ref[:, :, :2], chunk_size=None), x_ref[:, :, :5]) <= 1e-5


def test_wan22_patch_order_matches_diffusers():
    from diffusers.models.autoencoders.autoencoder_kl_wan import (
        patchify as their_patchify,
    )

    from rcm.models.vae.blocks import patchify, unpatchify

    x = torch.randn(2, 3, 3, 6, 10)
    assert torch.equal(patchify(x, 2), their_patchify(x, 2))
    assert torch.equal(unpatchify(patchify(x, 2), 2), x)


def test_wan22_config():
    c = WanVAEConfig.wan22()
    assert (c.spatial_factor, c.temporal_factor, c.image_channels) == (16, 4, 12)
    assert c.latent_shape(121, 704, 1280) == (48, 31, 44, 80)
    assert WanVAEConfig.from_diffusers(c.to_diffusers()) == c
    assert WanVAEConfig.from_diffusers(TINY22.to_diffusers()) == TINY22
    with pytest.raises(ValueError, match="scale_factor_spatial=8 contradicts"):
        WanVAEConfig.from_diffusers({**c.to_diffusers(), "scale_factor_spatial": 8})
    with pytest.raises(ValueError, match="encoder stage 1"):  # 4 channels x8 folded into 24
        WanVAEConfig(base_dim=4, dim_mult=(1, 6), temporal_downsample=(True,), residual=True)
    with torch.device("meta"):
        full = WanVAE(c)
    assert full._batch_slice(1, 1, 21, 480, 832) >= 1  # Wan's chunks at 480p fit
    with pytest.raises(ValueError, match="video.*multiples of 16"):
        WanVAE(TINY22).encode(torch.zeros(1, 3, 5, 24, 16))


def test_wan22_full_size_keys_and_shapes():
    """The released Wan2.2 architecture (meta device): the same parameters as diffusers' model of it, and
    the official release's key names (checked once against the official code's state dict)."""
    cfg = WanVAEConfig.wan22()
    with torch.device("meta"):
        ours = WanVAE(cfg)
        theirs = AutoencoderKLWan(**cfg.to_diffusers())
    sd = ours.state_dict()
    assert {k: v.shape for k, v in vae_state_dict_to_diffusers(sd).items()} == {
        k: v.shape for k, v in theirs.state_dict().items()}  # fmt: skip
    official = vae_state_dict_to_official(sd)  # structure inferred from our keys and shapes
    assert len(official) == len(theirs.state_dict()) == 196
    assert {
        "conv1.weight", "encoder.conv1.weight", "encoder.head.0.gamma", "decoder.head.2.bias",
        "encoder.downsamples.0.downsamples.0.residual.0.gamma", "encoder.downsamples.1.downsamples.0.shortcut.weight",
        "encoder.downsamples.1.downsamples.2.time_conv.weight", "encoder.downsamples.0.downsamples.2.resample.1.weight",
        "decoder.upsamples.0.upsamples.3.time_conv.weight", "decoder.upsamples.2.upsamples.0.shortcut.weight",
        "decoder.upsamples.2.upsamples.3.resample.1.bias", "decoder.middle.1.to_qkv.weight",
    } <= set(official)  # fmt: skip
    assert official["encoder.conv1.weight"].shape == (160, 12, 3, 3, 3)
    assert official["decoder.head.2.weight"].shape == (12, 256, 3, 3, 3)
    back = vae_state_dict_from_official(official)
    for a, b in [(back, sd), (vae_state_dict_to_diffusers(back), vae_state_dict_to_diffusers(sd))]:
        assert set(a) == set(b) and all(a[k] is b[k] for k in b)
    assert detect_vae_layout(official) == "official"
    assert default_vae_config(official, "official") == cfg
    assert default_vae_config(vae_state_dict_to_diffusers(sd), "diffusers") == cfg
    with torch.device("meta"):
        assert default_vae_config(WanVAE().state_dict(), "ours") == WanVAEConfig()


@pytest.fixture(scope="module")
def files22(tmp_path_factory, pair22):
    ours, theirs = pair22
    root = tmp_path_factory.mktemp("vae22")
    torch.save(vae_state_dict_to_official(ours.state_dict(), TINY22), root / "Wan2.2_VAE.pth")
    theirs.save_pretrained(root / "pipeline" / "vae")
    return root


def test_wan22_load_each_layout_then_parity(files22, pair22):
    _, theirs = pair22
    video = video_like(1, 5, 16, 32, seed=14)
    z_ref = diffusers_encode(theirs, video, TINY22)
    x_ref = diffusers_decode(theirs, z_ref, TINY22)
    loaded = [load_vae(files22 / "Wan2.2_VAE.pth", config=TINY22), load_vae(files22 / "pipeline")]
    assert loaded[1].config == TINY22  # from config.json
    for m in loaded:
        assert rel(m.encode(video), z_ref) <= 1e-5 and rel(m.decode(z_ref), x_ref) <= 1e-5


def test_wan22_strict_loading_errors(files22, pair22, tmp_path):
    ours, _ = pair22
    official = {k: v.clone() for k, v in vae_state_dict_to_official(ours.state_dict(), TINY22).items()}
    bad = dict(official)
    del bad["decoder.upsamples.0.upsamples.3.time_conv.weight"]
    bad["decoder.upsamples.0.upsamples.4.time_conv.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\):\s+decoder\.upsamples\.0\.upsamples\.3\.time_conv"
                                         r".*unexpected keys \(1\):\s+decoder\.upsamples\.0\.upsamples\.4\.time_conv"):
        load_vae(tmp_path / "bad.pth", config=TINY22)
    # a Wan2.2 file read as Wan2.1 (and the other way round): every stage key is named as in the file
    with pytest.raises(ValueError, match=r"(?s)missing keys \(146\):\s+decoder\.upsamples\.0\.residual\.0\.gamma"
                                         r".*unexpected keys \(148\):\s+decoder\.upsamples\.0\.upsamples\.0\.residual"):
        load_vae(files22 / "Wan2.2_VAE.pth", config=TINY)
    torch.save(vae_state_dict_to_official(randomize_(WanVAE(TINY), 0).state_dict()), tmp_path / "21.pth")
    with pytest.raises(ValueError, match=r"(?s)missing keys.*:\s+decoder\.upsamples\.0\.upsamples\.0\.residual\.0"):
        load_vae(tmp_path / "21.pth", config=TINY22)
    # without a config a 12-channel file is taken for the released Wan2.2: tiny shapes are named
    with pytest.raises(ValueError, match=r"shape mismatches.*\n    decoder\.conv1\.bias: \[24\] vs \[1024\]"):
        load_vae(files22 / "Wan2.2_VAE.pth")
