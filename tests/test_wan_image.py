"""The FrameCondition of a first-frame image for each Wan I2V family (rcm/models/wan_image.py), on tiny
random VAEs and CLIP encoders, checked against Wan's own construction written out here."""
import pytest
import torch

from rcm.models import WanDiT, wan_config
from rcm.models.image_encoder import tiny_image_encoder
from rcm.models.vae import WanVAE, WanVAEConfig
from rcm.models.wan_image import (
    first_frame_mask_channels,
    first_latent_frame_condition,
    image_conditioning,
    wan_image_condition,
)


def official_mask(num_frames, h, w):
    """Wan2.1 I2V's mask as its sampler builds it: per pixel frame, the first repeated 4 times, folded."""
    msk = torch.ones(1, num_frames, h, w)
    msk[:, 1:] = 0
    msk = torch.cat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, h, w)
    return msk.transpose(1, 2)  # [1, 4, T_lat, h, w]


@pytest.mark.parametrize("num_frames", [1, 5, 9, 17])
def test_mask_channels_are_wans(num_frames):
    mine = first_frame_mask_channels(num_frames, 1 + (num_frames - 1) // 4)
    assert torch.equal(mine.expand(-1, -1, -1, 3, 2), official_mask(num_frames, 3, 2))
    with pytest.raises(ValueError, match="num_frames"):
        first_frame_mask_channels(num_frames + 1, 1 + (num_frames - 1) // 4)


def image(seed, b=2, h=32, w=48):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_channels_condition_wan21_i2v_with_clip_tokens():
    vae = WanVAE(WanVAEConfig.tiny()).eval()
    clip = tiny_image_encoder(32, num_layers=2, image_size=28)
    config = wan_config("wan-tiny-i2v", in_dim=16 + 20, out_dim=16, image_dim=32, image_len=clip.num_tokens,
                        num_layers=1)
    assert image_conditioning(config) == "channels"
    img = image(0)
    with torch.no_grad():
        condition = wan_image_condition(config, vae, img, 9, image_encoder=clip)
        video = torch.cat([img[:, :, None], torch.zeros(2, 3, 8, 32, 48)], dim=2)
        latent = vae.encode(video)
    y = condition.inputs["y"]
    assert y.shape == (2, 20, 3, 4, 6) and condition.mask is None
    assert torch.equal(y[:, :4], official_mask(9, 4, 6).expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(y[:, 4:], latent, rtol=0, atol=0)
    torch.testing.assert_close(condition.inputs["image_context"], clip.encode(img), rtol=1e-6, atol=1e-6)
    dit = WanDiT(config)
    dit.init_weights(generator=torch.Generator().manual_seed(0))
    out = dit(torch.randn(2, 16, 3, 4, 6), torch.tensor([500.0, 10.0]), torch.randn(2, 8, 32), **condition.inputs)
    assert out.shape == (2, 16, 3, 4, 6)
    with pytest.raises(ValueError, match="image_encoder"):
        wan_image_condition(config, vae, img, 9)


def test_channels_condition_wan22_i2v_a14b_has_no_clip():
    vae = WanVAE(WanVAEConfig.tiny()).eval()
    config = wan_config("wan-tiny-i2v-experts", in_dim=36, out_dim=16)
    with torch.no_grad():
        condition = wan_image_condition(config, vae, image(1, b=1, h=16, w=16), 5)
    assert sorted(condition.inputs) == ["y"] and condition.inputs["y"].shape == (1, 20, 2, 2, 2)
    with pytest.raises(ValueError, match="image_encoder given"):
        wan_image_condition(config, vae, image(1, b=1, h=16, w=16), 5, image_encoder=tiny_image_encoder())


def test_frame_condition_ti2v_replaces_the_first_latent_frame():
    vae = WanVAE(WanVAEConfig.tiny_wan22()).eval()
    config = wan_config("wan-tiny-ti2v", in_dim=48, out_dim=48)
    assert image_conditioning(config) == "frame"
    img = image(2, h=32, w=48)
    with torch.no_grad():
        condition = wan_image_condition(config, vae, img, 9)
        first = vae.encode(img[:, :, None])
    assert condition.inputs is None and condition.latent.shape == (2, 48, 3, 2, 3)
    assert condition.mask.tolist() == [[[[[True]], [[False]], [[False]]]]]
    torch.testing.assert_close(condition.latent[:, :, :1], first, rtol=0, atol=0)
    assert bool((condition.latent[:, :, 1:] == 0).all())
    with pytest.raises(ValueError, match="latent channels"):
        wan_image_condition(wan_config("wan-tiny-ti2v"), vae, img, 9)
    with pytest.raises(ValueError, match=r"image must be a floating tensor \[B, 3, H, W\]"):
        wan_image_condition(config, vae, img[:, :1], 9)


@pytest.mark.parametrize("vae_config", [WanVAEConfig.tiny(), WanVAEConfig.tiny_wan22()], ids=["wan2.1", "wan2.2"])
def test_a_video_latents_first_frame_is_its_images_latent(vae_config):
    """Why a TI2V batch of video latents is its own condition (and synthesised I2V data needs no second
    encode for the frame): the causal VAE encodes frame 0 alone."""
    vae = WanVAE(vae_config).eval()
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(video)
        first = vae.encode(video[:, :, :1])
    torch.testing.assert_close(latent[:, :, :1], first, rtol=1e-5, atol=1e-6)
    condition = first_latent_frame_condition(latent)
    assert torch.equal(condition.impose(torch.zeros_like(latent))[:, :, :1], latent[:, :, :1])
    assert bool((condition.impose(torch.zeros_like(latent))[:, :, 1:] == 0).all())
