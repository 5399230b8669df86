"""umT5 text encoder: Wan's padding/zeroing semantics, official key conversion, loading, offload."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel  # noqa: E402

from rcm.models.text_encoder import (  # noqa: E402
    TEXT_LEN,
    WAN_NEGATIVE_PROMPT,
    UMT5TextEncoder,
    byte_tokenizer,
    clean_prompt,
    load_text_encoder,
    tiny_text_encoder,
    umt5_state_dict_from_official,
    umt5_state_dict_to_official,
    umt5_xxl_config,
)

CFG = dict(vocab_size=259, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")


def random_umt5(seed=0) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**CFG)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make every parameter (norm gains, position biases too) non-trivial
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tokenizer made locally (byte level, umT5 special tokens), saved and reloaded like a real one."""
    folder = tmp_path_factory.mktemp("tokenizer")
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(tokenizer_dir):
    return UMT5TextEncoder(random_umt5(), AutoTokenizer.from_pretrained(str(tokenizer_dir)))


PROMPTS = ["a cat", "  a red   panda\n balancing on a bamboo stem, 4k &amp; detailed ", WAN_NEGATIVE_PROMPT]


# ---------------------------------------------------------------------------------------------------
# Wan's semantics


def test_encode_shape_and_zero_padding(encoder):
    ids, mask = encoder.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (3, TEXT_LEN)
    lengths = mask.sum(1)
    for i, p in enumerate(PROMPTS):  # the real tokens: the cleaned prompt's bytes + EOS, then padding
        n = len(clean_prompt(p).encode()) + 1
        assert lengths[i] == n and ids[i, n - 1] == 1 and (ids[i, n:] == 0).all()
    out = encoder.encode(PROMPTS)
    assert out.shape == (3, TEXT_LEN, 32) and out.dtype == torch.float32
    for i in range(3):
        n = int(lengths[i])
        assert (out[i, n:] == 0).all(), "states past the prompt must be exact zeros"
        assert (out[i, :n].abs().sum(-1) > 0).all()
        # the kept states are the prompt's own: equal to encoding it unpadded
        ref = encoder.model(input_ids=ids[i : i + 1, :n]).last_hidden_state[0]
        assert torch.allclose(out[i, :n], ref, rtol=1e-5, atol=1e-5)


def test_encode_is_batch_independent_and_accepts_a_string(encoder):
    batch = encoder.encode(PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert torch.allclose(encoder.encode(p)[0], batch[i], rtol=1e-5, atol=1e-6)
    assert torch.equal(encoder(PROMPTS[0]), encoder.encode([PROMPTS[0]]))
    assert encoder.encode(PROMPTS[0], dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="prompts"):
        encoder.encode([])


def test_truncation_keeps_eos(tokenizer_dir):
    enc = UMT5TextEncoder(random_umt5(), AutoTokenizer.from_pretrained(str(tokenizer_dir)), text_len=16)
    ids, mask = enc.tokenize("x" * 100)
    assert mask.all() and ids[0, -1] == 1
    out = enc.encode(["x" * 100, "ab"])
    assert out.shape == (2, 16, 32) and (out[0].abs().sum(-1) > 0).all() and (out[1, 3:] == 0).all()


def test_clean_prompt():
    assert clean_prompt("  a \t red\n\npanda &amp;amp; co ") == "a red panda & co"
    assert clean_prompt(WAN_NEGATIVE_PROMPT) == WAN_NEGATIVE_PROMPT


def test_negative_prompt_is_wans():
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作")
    assert WAN_NEGATIVE_PROMPT.endswith("杂乱的背景，三条腿，背景人很多，倒着走")
    # sha256 of `sample_neg_prompt` in Wan2.1's wan/configs/shared_config.py (137 characters, 27 commas)
    digest = hashlib.sha256(WAN_NEGATIVE_PROMPT.encode()).hexdigest()
    assert digest == "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e"


# ---------------------------------------------------------------------------------------------------
# official key layout


def official_t5_encoder(sd, ids, mask, num_heads, num_buckets=32, max_dist=128, eps=1e-6):
    """Wan's T5Encoder forward (`wan/modules/t5.py`, shared_pos=False), written over its state dict."""

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def bucket(rel):  # bidirectional relative-position buckets
        half = num_buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
        return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))

    b, n = ids.shape
    pos = torch.arange(n)
    buckets = bucket(pos[None, :] - pos[:, None])
    x = F.embedding(ids, sd["token_embedding.weight"])
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = norm(x, p("norm1.weight"))
        q, k, v = (F.linear(h, p(f"attn.{c}.weight")).view(b, n, num_heads, -1) for c in "qkv")
        bias = p("pos_embedding.embedding.weight")[buckets].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        attn = (torch.einsum("binc,bjnc->bnij", q, k) + bias).softmax(-1)  # no 1/sqrt(d) in T5
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, n, -1), p("attn.o.weight"))
        h = norm(x, p("norm2.weight"))
        gate = F.gelu(F.linear(h, p("ffn.gate.0.weight")), approximate="tanh")
        x = x + F.linear(F.linear(h, p("ffn.fc1.weight")) * gate, p("ffn.fc2.weight"))
    return norm(x, sd["norm.weight"])


def test_official_key_conversion_round_trip_and_semantics(encoder):
    hf = encoder.model.state_dict()
    official = umt5_state_dict_to_official(hf)
    assert "token_embedding.weight" in official and "norm.weight" in official
    assert {"blocks.1.ffn.gate.0.weight", "blocks.1.ffn.fc1.weight", "blocks.1.pos_embedding.embedding.weight",
            "blocks.0.attn.o.weight", "blocks.0.norm2.weight"} <= set(official)  # fmt: skip
    assert len(official) == len(hf) - 1  # the tied embedding appears once
    back = umt5_state_dict_from_official(official)
    assert set(back) == set(hf) and all(back[k] is hf[k] or torch.equal(back[k], hf[k]) for k in hf)
    assert umt5_state_dict_to_official(back).keys() == official.keys()
    # the renamed weights mean the same thing: Wan's forward over the official dict == transformers'
    ids, mask = encoder.tokenize(PROMPTS[:2])
    ids, mask = ids[:, :80], mask[:, :80]
    ref = official_t5_encoder(official, ids, mask, num_heads=4)
    out = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert torch.allclose(out[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_xxl_config_matches_wan():
    cfg = umt5_xxl_config()
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    official = umt5_state_dict_to_official(model.state_dict())
    assert official["token_embedding.weight"].shape == (256384, 4096)
    assert official["blocks.23.ffn.fc1.weight"].shape == (10240, 4096)
    assert official["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert len([k for k in official if k.startswith("blocks.")]) == 24 * 10
    assert cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act


# ---------------------------------------------------------------------------------------------------
# loading


def test_load_official_pth(tmp_path, encoder, tokenizer_dir):
    official = {k: v.clone() for k, v in umt5_state_dict_to_official(encoder.model.state_dict()).items()}
    (tmp_path / "google").mkdir()
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp_path / "google" / "umt5-xxl")
    torch.save(official, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    # the tokenizer is found where the Wan2.1 release keeps it (google/umt5-xxl beside the .pth)
    loaded = load_text_encoder(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", config=UMT5Config(**CFG))
    assert loaded.model.shared.weight is loaded.model.encoder.embed_tokens.weight
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert torch.equal(loaded.encode(PROMPTS), encoder.encode(PROMPTS))
    bf16 = load_text_encoder(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", config=UMT5Config(**CFG),
                             dtype=torch.bfloat16, tokenizer_path=tokenizer_dir)  # fmt: skip
    assert bf16.dtype == torch.bfloat16 and bf16.encode(PROMPTS[0]).dtype == torch.bfloat16


def test_bad_official_files(tmp_path, encoder, tokenizer_dir):
    def load(sd, name="t5.pth"):
        torch.save(sd, tmp_path / name)
        return load_text_encoder(tmp_path / name, config=UMT5Config(**CFG), tokenizer_path=tokenizer_dir)

    def official():
        return {k: v.clone() for k, v in umt5_state_dict_to_official(encoder.model.state_dict()).items()}

    sd = official()
    del sd["blocks.1.ffn.fc1.weight"]
    sd["blocks.1.extra.weight"] = torch.zeros(1)
    sd["norm.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\):\s+blocks\.1\.ffn\.fc1\.weight.*"
                                         r"unexpected keys \(1\):\s+blocks\.1\.extra\.weight.*"
                                         r"shape mismatches.*norm\.weight: \[5\] vs \[32\]"):  # fmt: skip
        load(sd)
    torch.save(official(), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_text_encoder(tmp_path / "cut.pth", config=UMT5Config(**CFG), tokenizer_path=tokenizer_dir)
    with pytest.raises(ValueError, match="not Wan's umT5"):
        load({"foo": torch.zeros(1)}, "foreign.pth")
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        load_text_encoder(tmp_path / "ok.pth", config=UMT5Config(**CFG))


def test_load_transformers_folder_and_pipeline_root(tmp_path, encoder, tokenizer_dir):
    root = tmp_path / "pipeline"
    encoder.model.save_pretrained(root / "text_encoder")
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(root / "tokenizer")
    for path in (root, root / "text_encoder"):
        loaded = load_text_encoder(path)
        assert torch.equal(loaded.encode(PROMPTS), encoder.encode(PROMPTS))
    # a key missing
    from safetensors.torch import load_file, save_file

    weights = root / "text_encoder" / "model.safetensors"
    good = load_file(weights)
    save_file({k: v for k, v in good.items() if k != "encoder.final_layer_norm.weight"}, weights)
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder\.final_layer_norm\.weight"):
        load_text_encoder(root)
    # a file cut short
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="umT5"):
        load_text_encoder(root)


# ---------------------------------------------------------------------------------------------------
# offload and the tiny stand-in


def test_offload_context_manager(encoder):
    with encoder.on("cpu") as enc:
        assert enc is encoder and encoder.device.type == "cpu"
        out = enc.encode("a cat")
    assert encoder.device == encoder.offload_device and out.shape == (1, TEXT_LEN, 32)
    with pytest.raises(RuntimeError, match="boom"):
        with encoder.on("cpu"):
            raise RuntimeError("boom")
    assert encoder.offload() is encoder


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_frees_the_gpu():
    enc = tiny_text_encoder(64)
    with enc.on("cuda"):
        out = enc.encode(PROMPTS)
        assert out.device.type == "cuda" and torch.cuda.memory_allocated() > 0
    assert enc.device.type == "cpu"


def test_tiny_text_encoder():
    enc = tiny_text_encoder(32, text_len=8, seed=1)
    out = enc.encode(["ab", WAN_NEGATIVE_PROMPT])
    assert out.shape == (2, 8, 32) and (out[0, 3:] == 0).all() and (out[1].abs().sum(-1) > 0).all()
    assert torch.equal(tiny_text_encoder(32, text_len=8, seed=1).encode("ab"), enc.encode("ab"))
