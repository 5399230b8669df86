"""CLIP image encoder of Wan2.1 I2V: Wan's preprocessing, the official key layout checked against a plain
transcription of Wan's ViT forward, the transformers layout, strict loading."""

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from rcm.models.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    OFFICIAL_CLIP_FILE,
    CLIPImageEncoder,
    clip_visual_state_dict_from_official,
    clip_visual_state_dict_to_official,
    detect_clip_layout,
    load_image_encoder,
    preprocess_images,
    tiny_image_encoder,
    vit_h14_config,
)

# Awkward tiny sizes: head_dim 8 with 5 heads, a 3x3 patch grid (10 tokens), 3 blocks (2 are run).
DIM, HEADS, LAYERS, PATCH, IMAGE, OUT_DIM = 40, 5, 3, 7, 21, 24


def tiny_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        patch_size=PATCH, image_size=IMAGE, hidden_act="gelu", layer_norm_eps=1e-5,
    )  # fmt: skip


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Wan's CLIP checkpoint layout written out by hand from ``wan/modules/clip.py``'s module shapes (not
    from the key map under test), with the text tower, logit scale and projection head it also holds."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return offset + scale * torch.randn(shape, generator=g)

    n = (IMAGE // PATCH) ** 2 + 1
    sd = {
        "visual.patch_embedding.weight": rnd(DIM, 3, PATCH, PATCH, scale=0.1),
        "visual.cls_embedding": rnd(1, 1, DIM),
        "visual.pos_embedding": rnd(1, n, DIM),
        "visual.pre_norm.weight": rnd(DIM, scale=0.2, offset=1.0),
        "visual.pre_norm.bias": rnd(DIM, scale=0.2),
        "visual.post_norm.weight": rnd(DIM, scale=0.2, offset=1.0),
        "visual.post_norm.bias": rnd(DIM, scale=0.2),
        "visual.head": rnd(DIM, OUT_DIM),
        "textual.token_embedding.weight": rnd(11, 16),
        "textual.head.0.weight": rnd(20, 16),
        "log_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(LAYERS):
        p = f"visual.transformer.{i}."
        sd |= {
            p + "norm1.weight": rnd(DIM, scale=0.2, offset=1.0), p + "norm1.bias": rnd(DIM, scale=0.2),
            p + "attn.to_qkv.weight": rnd(3 * DIM, DIM, scale=DIM**-0.5), p + "attn.to_qkv.bias": rnd(3 * DIM, scale=0.2),
            p + "attn.proj.weight": rnd(DIM, DIM, scale=DIM**-0.5), p + "attn.proj.bias": rnd(DIM, scale=0.2),
            p + "norm2.weight": rnd(DIM, scale=0.2, offset=1.0), p + "norm2.bias": rnd(DIM, scale=0.2),
            p + "mlp.0.weight": rnd(4 * DIM, DIM, scale=DIM**-0.5), p + "mlp.0.bias": rnd(4 * DIM, scale=0.2),
            p + "mlp.2.weight": rnd(DIM, 4 * DIM, scale=(4 * DIM) ** -0.5), p + "mlp.2.bias": rnd(DIM, scale=0.2),
        }  # fmt: skip
    return sd


def wan_visual_reference(sd, images, *, num_heads, image_size, eps=1e-5):
    """A plain fp64 transcription of Wan's ``CLIPModel.visual`` (``use_31_block=True``) on official keys:
    bicubic resize, [-1, 1] -> [0, 1], normalize; patch conv, class token, position embedding, pre-LN,
    then all blocks but the last (pre-LN attention with fused qkv, exact GELU MLP)."""
    w = {k: v.double() for k, v in sd.items() if k.startswith("visual.")}
    x = F.interpolate(images.double(), size=(image_size, image_size), mode="bicubic", align_corners=False)
    x = (x * 0.5 + 0.5 - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        CLIP_STD, dtype=torch.float64
    ).view(1, 3, 1, 1)
    patch_w = w["visual.patch_embedding.weight"]
    x = F.conv2d(x, patch_w, stride=patch_w.shape[-1]).flatten(2).transpose(1, 2)
    b, dim = x.shape[0], x.shape[-1]
    x = torch.cat([w["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + w["visual.pos_embedding"]

    def ln(t, name):
        return F.layer_norm(t, (dim,), w[name + ".weight"], w[name + ".bias"], eps)

    x = ln(x, "visual.pre_norm")
    num_layers = len({k.split(".")[2] for k in w if k.startswith("visual.transformer.")})
    d = dim // num_heads
    for i in range(num_layers - 1):
        p = f"visual.transformer.{i}."
        h = ln(x, p + "norm1") @ w[p + "attn.to_qkv.weight"].T + w[p + "attn.to_qkv.bias"]
        q, k, v = h.view(b, -1, 3, num_heads, d).unbind(2)  # [b, s, n, d] each
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d)
        h = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, -1, dim)
        x = x + h @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = ln(x, p + "norm2") @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"]
    return x


def random_images(b, h, w, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_hf_model(seed=0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    model = CLIPVisionModel(tiny_config()).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped weight/bias would show
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def state_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------
# Preprocessing


def keys_cubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] fp64 weights of bicubic resampling (Keys kernel, a = -0.75), pixel centres aligned
    (align_corners=False), no antialias, edge pixels replicated: what Wan's ``F.interpolate`` computes."""
    a, scale = -0.75, n_in / n_out
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        for off in (-1, 0, 1, 2):
            x = abs(off - t)
            wgt = (a + 2) * x**3 - (a + 3) * x**2 + 1 if x <= 1 else a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
            m[o, min(max(base + off, 0), n_in - 1)] += wgt
    return m


@pytest.mark.parametrize("h,w,size", [(19, 33, 8), (5, 3, 7), (224, 300, 224)])
def test_preprocess_is_bicubic_resize_then_clip_normalization(h, w, size):
    images = random_images(2, h, w)
    images[:, :, : h // 2] = -1.0  # a sharp edge: bicubic overshoots past [-1, 1] and Wan does not clamp
    got = preprocess_images(images, size)
    assert got.shape == (2, 3, size, size) and got.dtype == torch.float32
    assert preprocess_images(images.half(), size).dtype == torch.float32
    resized = keys_cubic_matrix(h, size) @ images.double() @ keys_cubic_matrix(w, size).T
    mean, std = torch.tensor(CLIP_MEAN, dtype=torch.float64), torch.tensor(CLIP_STD, dtype=torch.float64)
    want = ((resized + 1) / 2 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    # fp32 resampling (as Wan's, on fp32 images) is off the fp64 kernel by <= 5e-5 in [-1, 1] units: 2e-4 here
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=0)
    torch.testing.assert_close(preprocess_images(images.double(), size), want, atol=1e-12, rtol=0)


def test_preprocess_at_native_size_is_exactly_the_affine_normalization():
    images = random_images(3, 224, 224)
    got = preprocess_images(images)
    want = (images * 0.5 + 0.5 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # -1 and 1 map to CLIP's normalized black and white
    ends = preprocess_images(torch.stack([-torch.ones(3, 224, 224), torch.ones(3, 224, 224)]))
    for c in range(3):
        assert ends[0, c].allclose(torch.tensor(-CLIP_MEAN[c] / CLIP_STD[c]))
        assert ends[1, c].allclose(torch.tensor((1 - CLIP_MEAN[c]) / CLIP_STD[c]))


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 16, 16),
        torch.zeros(1, 4, 16, 16),
        torch.zeros(1, 3, 1, 16, 16),
        torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
    ],
)
def test_preprocess_rejects_bad_images(bad):
    with pytest.raises(ValueError, match="images"):
        preprocess_images(bad)


# ---------------------------------------------------------------------------------------------------
# The official layout


def test_official_checkpoint_matches_a_plain_transcription_of_wans_forward(tmp_path):
    sd = official_state_dict()
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(sd, path)
    encoder = load_image_encoder(path, config=tiny_config())
    assert isinstance(encoder, CLIPImageEncoder) and encoder.num_tokens == 10 and encoder.dim == DIM
    images = random_images(3, 19, 33)  # not square, not the model's size
    got = encoder.encode(images)
    want = wan_visual_reference(sd, images, num_heads=HEADS, image_size=IMAGE)
    assert got.shape == (3, 10, DIM) and got.dtype == torch.float32
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-5, err
    assert encoder.encode(images, dtype=torch.float64).dtype == torch.float64
    # in fp64 throughout, only the order of operations differs from the transcription
    encoder64 = load_image_encoder(path, config=tiny_config(), dtype=torch.float64)
    err64 = ((encoder64.encode(images.double()) - want).abs().max() / want.abs().max()).item()
    assert err64 <= 1e-12, err64


def test_official_key_map_round_trips_and_ignores_the_text_tower(tmp_path):
    model = random_hf_model()
    hf = model.state_dict()
    official = clip_visual_state_dict_to_official(hf)
    hand = official_state_dict()
    assert {k: v.shape for k, v in official.items()} == {
        k: v.shape for k, v in hand.items() if k.startswith("visual.") and k != "visual.head"
    }  # the map produces exactly the layout written out by hand from Wan's modules
    state_equal(clip_visual_state_dict_from_official(official), hf)
    extra = {k: v for k, v in hand.items() if not k.startswith("visual.") or k == "visual.head"}
    for name in ("clip.pth", "clip.safetensors"):
        path = tmp_path / name
        (torch.save if name.endswith(".pth") else save_file)(official | extra, path)
        loaded = load_image_encoder(path, config=tiny_config())
        state_equal(loaded.model.state_dict(), hf)
        images = random_images(2, IMAGE, IMAGE)
        pixels = preprocess_images(images, IMAGE)
        want = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(loaded.encode(images), want, atol=0, rtol=0)


def test_vit_h14_matches_wans_official_shapes():
    config = vit_h14_config()
    with torch.device("meta"):
        encoder = CLIPImageEncoder(CLIPVisionModel(config))
    assert (encoder.num_tokens, encoder.dim, encoder.image_size) == (257, 1280, 224)
    official = clip_visual_state_dict_to_official(encoder.model.state_dict())
    shapes = {k: tuple(v.shape) for k, v in official.items()}
    assert shapes["visual.patch_embedding.weight"] == (1280, 3, 14, 14)
    assert shapes["visual.cls_embedding"] == (1, 1, 1280)
    assert shapes["visual.pos_embedding"] == (1, 257, 1280)
    assert shapes["visual.transformer.31.attn.to_qkv.weight"] == (3840, 1280)
    assert shapes["visual.transformer.31.mlp.0.weight"] == (5120, 1280)
    assert "visual.transformer.32.norm1.weight" not in shapes and "visual.patch_embedding.bias" not in shapes
    assert len(shapes) == 7 + 32 * 12
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-5 and config.num_attention_heads == 16


def _official_error(tmp_path, sd) -> str:
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as info:
        load_image_encoder(path, config=tiny_config())
    return str(info.value)


def test_official_loading_is_strict_and_names_the_key(tmp_path):
    sd = official_state_dict()
    missing = {k: v for k, v in sd.items() if k != "visual.transformer.1.attn.to_qkv.weight"}
    msg = _official_error(tmp_path, missing)
    assert "missing keys (1)" in msg and "visual.transformer.1.attn.to_qkv.weight" in msg
    msg = _official_error(tmp_path, sd | {"visual.transformer.3.norm1.weight": torch.ones(DIM)})
    assert "unexpected keys (1)" in msg and "visual.transformer.3.norm1.weight" in msg
    msg = _official_error(tmp_path, sd | {"visual.pos_embedding": torch.zeros(1, 17, DIM)})
    assert f"visual.pos_embedding: [1, 17, {DIM}] vs [1, 10, {DIM}]" in msg
    msg = _official_error(tmp_path, sd | {"visual.transformer.0.attn.to_qkv.bias": torch.zeros(2 * DIM)})
    assert "visual.transformer.0.attn.to_qkv.bias" in msg
    msg = _official_error(
        tmp_path, sd | {"visual.patch_embedding.bias": torch.zeros(DIM), "logit_bias": torch.zeros(1)}
    )
    assert "unexpected keys (2)" in msg and "visual.patch_embedding.bias" in msg and "logit_bias" in msg
    # a ViT-H/14 config against the tiny file: every shape is wrong, reported before any data is read
    path = tmp_path / "tiny.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="visual.cls_embedding: \\[1, 1, 40\\] vs \\[1, 1, 1280\\]"):
        load_image_encoder(path)


def test_official_file_found_in_the_release_folder(tmp_path):
    """Wan's release folder also holds the DiT (config.json, shards): the CLIP file is picked by name."""
    torch.save(official_state_dict(), tmp_path / OFFICIAL_CLIP_FILE)
    (tmp_path / "config.json").write_text('{"_class_name": "WanModel", "model_type": "i2v", "dim": 5120}')
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, tmp_path / "diffusion_pytorch_model.safetensors")
    encoder = load_image_encoder(tmp_path, config=tiny_config())
    state_equal(encoder.model.state_dict(), clip_visual_state_dict_from_official(official_state_dict()))
    with pytest.raises(FileNotFoundError, match="no CLIP image encoder checkpoint"):
        load_image_encoder(tmp_path / "missing.pth")


def test_meta_device_validates_without_reading(tmp_path):
    path = tmp_path / "clip.pth"
    torch.save(official_state_dict(), path)
    encoder = load_image_encoder(path, config=tiny_config(), device="meta")
    assert all(t.is_meta for t in encoder.model.state_dict().values())


# ---------------------------------------------------------------------------------------------------
# The transformers / diffusers layout


def test_transformers_folder_round_trip_from_a_pipeline_root(tmp_path):
    model = random_hf_model(seed=3)
    model.save_pretrained(tmp_path / "pipe" / "image_encoder")
    for where in (tmp_path / "pipe", tmp_path / "pipe" / "image_encoder"):
        loaded = load_image_encoder(where)  # the architecture comes from config.json
        assert loaded.model.config.hidden_size == DIM and loaded.model.config.patch_size == PATCH
        state_equal(loaded.model.state_dict(), model.state_dict())
    images = random_images(2, 30, 17)
    want = model(pixel_values=preprocess_images(images, IMAGE), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(loaded.encode(images), want, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    state_equal(load_image_encoder(tmp_path / "sharded").model.state_dict(), model.state_dict())


def test_transformers_layout_with_vision_model_prefix_and_projection(tmp_path):
    """Older transformers (and the released diffusers folders) write ``vision_model.``-prefixed keys,
    and a ``CLIPVisionModelWithProjection`` adds ``visual_projection.weight``, which Wan does not use."""
    model = random_hf_model(seed=4)
    folder = tmp_path / "image_encoder"
    folder.mkdir()
    tiny_config().to_json_file(folder / "config.json")
    sd = {"vision_model." + k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd | {"visual_projection.weight": torch.zeros(OUT_DIM, DIM)}, folder / "model.safetensors")
    assert detect_clip_layout(sd) == "transformers"
    state_equal(load_image_encoder(tmp_path).model.state_dict(), model.state_dict())

    del sd["vision_model.encoder.layers.0.mlp.fc1.bias"]
    sd["vision_model.encoder.layers.7.layer_norm1.weight"] = torch.ones(DIM)
    sd["vision_model.pre_layrnorm.weight"] = torch.ones(DIM + 1)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError) as info:
        load_image_encoder(folder)
    msg = str(info.value)
    assert "missing keys (1)" in msg and "vision_model.encoder.layers.0.mlp.fc1.bias" in msg
    assert "unexpected keys (1)" in msg and "vision_model.encoder.layers.7.layer_norm1.weight" in msg
    assert f"vision_model.pre_layrnorm.weight: [{DIM + 1}] vs [{DIM}]" in msg


def test_full_clip_model_folder_loads_its_vision_tower(tmp_path):
    """A whole ``CLIPModel`` folder (config.json with a ``vision_config``; text tower, projections and logit
    scale beside the ``vision_model.`` keys): the vision tower loads, the rest is ignored by name."""
    torch.manual_seed(5)
    text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=tiny_config().to_dict()))
    full.save_pretrained(tmp_path)
    loaded = load_image_encoder(tmp_path)
    assert loaded.model.config.num_hidden_layers == LAYERS
    state_equal(loaded.model.state_dict(), full.vision_model.state_dict())


def test_unknown_layout_is_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"blocks.0.attn.q.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not a CLIP image encoder checkpoint"):
        load_image_encoder(path)


def test_tiny_image_encoder_shapes():
    encoder = tiny_image_encoder(24, num_layers=2, num_heads=3, patch_size=14, image_size=42)
    tokens = encoder.encode(random_images(2, 50, 70))
    assert tokens.shape == (2, 10, 24) and torch.isfinite(tokens).all()
    with pytest.raises(ValueError, match="num_heads"):
        tiny_image_encoder(30, num_heads=4)
