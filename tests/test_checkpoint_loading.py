"""Wan DiT checkpoints (rcm/models/weights.py, wan_layouts.py, wan_loading.py): key layouts, diffusers
parity, every file layout, the real 1.3B / 14B architectures, and clear errors for bad files.

How the big architectures are tested cheaply: the loader checks the complete key and shape set from
the file *headers* before reading any tensor, and ``device="meta"`` stops there. So the tests write
checkpoints of the real 1.3B and 14B key/shape sets without real data:
* safetensors: a genuine header followed by a *sparse* data region (``truncate`` to the full size:
  28 GB for 14B in bf16, no disk blocks), valid for safetensors, zeros when read;
* ``torch.save`` files (``.pth``, rCM ``.pt``): every tensor a stride-0 view of one scalar (a few KB),
  loaded memory-mapped, shapes intact.
Each is loaded with ``device="meta"`` and the architecture inferred from the files. Every layout is
also loaded for real at a tiny size; the 1.3B official file is loaded for real in bf16 by an opt-in
test (RCM_SLOW=1: 2.8 GB read and copied, 10-30 s on 2 shared cores) and by the GPU run of
``scripts/device_wan_sample.sh`` (a random 1.3B checkpoint written, loaded and sampled).
"""

import dataclasses
import json
import math
import os

import pytest
import torch

from rcm.models import (
    LazyTensor,
    detect_dit_layout,
    dit_state_dict_from_diffusers,
    dit_state_dict_to_diffusers,
    infer_wan_config,
    load_dit,
    load_state_dict_strict,
    open_state_dict,
    read_dit_config,
    read_state_dict,
    save_dit,
    wan_config_from_json,
    wan_config_to_diffusers,
)
from rcm.models.wan import WAN_CONFIGS, WanDiT, wan_config

TINY = wan_config("wan-tiny")


def random_model(cfg=TINY, seed=0) -> WanDiT:
    """Every parameter random (the head too), so a wrong key mapping changes the output."""
    model = WanDiT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return model


def inputs(cfg=TINY, b=2, t=2, h=8, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_dim, t, h, w, generator=g)
    c = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g)
    return x, torch.tensor([37.5, 912.25][:b]), c


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k].to(sa[k].dtype)), k


def meta_shapes(cfg) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanDiT(cfg).state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Header-only / lazily written files of any size


def write_sparse_safetensors(path, shapes: dict, metadata: dict | None = None, dtype="BF16"):
    """A valid safetensors file of these shapes whose data region is a hole (reads as zeros)."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = math.prod(shape) * 2
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def write_sparse_shards(folder, shapes: dict, num_shards: int):
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(shapes)
    per = math.ceil(len(keys) / num_shards)
    weight_map = {}
    for i in range(num_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = keys[i * per : (i + 1) * per]
        write_sparse_safetensors(folder / name, {k: shapes[k] for k in part})
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def stride0_state_dict(shapes: dict, dtype=torch.bfloat16) -> dict:
    """Tensors of the right shapes that cost one element each when saved (stride-0 views)."""
    one = torch.zeros((), dtype=dtype)
    return {k: one.expand(shape) for k, shape in shapes.items()}


def rcm_shapes(cfg, prefix="net.") -> dict:
    """The rCM release's keys: ``net.``-prefixed, patch embedding flattened to [dim, 64]."""
    shapes = {prefix + k: v for k, v in meta_shapes(cfg).items()}
    p = shapes[prefix + "patch_embedding.weight"]
    shapes[prefix + "patch_embedding.weight"] = (p[0], math.prod(p[1:]))
    return shapes


# ------------------------------------------------------------------------------------------------
# Key layouts


@pytest.mark.parametrize("name", ["wan-tiny", "wan-tiny-i2v", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b",
                                  "wan2.2-ti2v-5b", "wan2.2-i2v-a14b"])
def test_key_conversion_round_trip_official_diffusers_ours(name):
    diffusers = pytest.importorskip("diffusers")
    cfg = wan_config(name)
    with torch.device("meta"):
        ours = WanDiT(cfg).state_dict()  # our names ARE the official names
        theirs = diffusers.WanTransformer3DModel(**wan_config_to_diffusers(cfg)).state_dict()
    converted = dit_state_dict_to_diffusers(ours)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    back = dit_state_dict_from_diffusers(theirs)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    again = dit_state_dict_from_diffusers(converted)
    assert list(again) == list(ours) and all(again[k] is ours[k] for k in ours)  # same tensors, same order
    assert detect_dit_layout(ours) == "official" and detect_dit_layout(theirs) == "diffusers"
    assert detect_dit_layout({"net." + k: v for k, v in ours.items()}) == "rcm"
    with pytest.raises(ValueError, match="not a Wan2.1 DiT"):
        detect_dit_layout({"encoder.conv1.weight": None})


def test_config_json_round_trips():
    for cfg in WAN_CONFIGS.values():  # diffusers configs carry no text_len nor image_len: Wan's 512 and 257
        assert wan_config_from_json(wan_config_to_diffusers(cfg)) == dataclasses.replace(cfg, text_len=512, image_len=257)
        assert wan_config_from_json(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg  # save_dit's metadata
    official = {"_class_name": "WanModel", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256,
                "in_dim": 16, "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16, "text_len": 512}
    assert wan_config_from_json(official) == WAN_CONFIGS["wan2.1-t2v-1.3b"]
    i2v = {**official, "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "in_dim": 36, "model_type": "i2v"}
    assert wan_config_from_json(i2v) == WAN_CONFIGS["wan2.2-i2v-a14b"]  # CLIP or not: from the keys (img_emb)
    with pytest.raises(ValueError, match="model_type 'flf2v'"):
        wan_config_from_json({**official, "model_type": "flf2v"})
    with pytest.raises(ValueError, match="added_kv_proj_dim"):  # image tokens without their keys/values
        wan_config_from_json({**wan_config_to_diffusers(TINY), "image_dim": 1280})
    with pytest.raises(ValueError, match="pos_embed_seq_len"):  # first-last-frame model
        wan_config_from_json({**wan_config_to_diffusers(WAN_CONFIGS["wan2.1-i2v-14b"]), "pos_embed_seq_len": 514})


# ------------------------------------------------------------------------------------------------
# Parity with diffusers' implementation (the same random weights converted both ways)


def test_parity_with_diffusers_both_directions(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    x, t, c = inputs()
    # ours -> diffusers
    ours = random_model()
    ref = diffusers.WanTransformer3DModel(**wan_config_to_diffusers(TINY)).eval()
    ref.load_state_dict(dit_state_dict_to_diffusers(ours.state_dict()), strict=True)
    with torch.no_grad():
        a, b = ours(x, t, c), ref(x, t, c).sample
    assert a.abs().max() > 0.1 and rel(a, b) <= 1e-5, rel(a, b)
    # diffusers -> ours, through a real diffusers folder (its own config.json and safetensors)
    torch.manual_seed(3)
    ref = diffusers.WanTransformer3DModel(**wan_config_to_diffusers(TINY)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = load_dit(tmp_path / "pipe", config=TINY)  # pipeline root -> transformer/
    with torch.no_grad():
        a, b = loaded(x, t, c), ref(x, t, c).sample
    assert a.abs().max() > 0.1 and rel(a, b) <= 1e-5, rel(a, b)
    # without the config: heads from the named config of the same width, text_len from diffusers' default
    assert read_dit_config(tmp_path / "pipe").num_heads == TINY.num_heads


# ------------------------------------------------------------------------------------------------
# Every layout, real (tiny) weights


def test_load_every_layout_tiny(tmp_path):
    model = random_model()
    sd = model.state_dict()
    save_dit(model, tmp_path / "single.safetensors")
    save_dit(model, tmp_path / "sharded", max_shard_bytes=100_000)
    save_dit(model, tmp_path / "diffusers", layout="diffusers")
    torch.save(dict(sd), tmp_path / "official.pth")
    rcm = {"net." + k: v for k, v in sd.items()}
    rcm["net.patch_embedding.weight"] = sd["patch_embedding.weight"].flatten(1)
    rcm["net_ema." + "blocks.0._checkpoint_wrapped_module.modulation"] = sd["blocks.0.modulation"] + 1
    rcm.update({"net_ema." + k: v + 1 for k, v in sd.items() if k != "blocks.0.modulation"})
    rcm["fake_score.head.head.bias"] = torch.zeros(3)  # other networks of a training checkpoint are skipped
    torch.save(rcm, tmp_path / "rcm.pt")
    shards = list((tmp_path / "sharded").glob("*-of-*.safetensors"))
    assert len(shards) > 2
    for path in ["single.safetensors", "sharded", "sharded/diffusion_pytorch_model.safetensors.index.json",
                 "diffusers", "official.pth"]:
        assert_same_weights(model, load_dit(tmp_path / path))
    assert read_dit_config(tmp_path / "official.pth") == TINY  # from the shapes alone
    assert_same_weights(model, load_dit(tmp_path / "rcm.pt", ema=False))
    ema = load_dit(tmp_path / "rcm.pt")  # net_ema preferred, as the reference
    assert torch.equal(ema.blocks[0].modulation, sd["blocks.0.modulation"] + 1)
    assert torch.equal(ema.head.head.weight, sd["head.head.weight"] + 1)
    bf16 = load_dit(tmp_path / "single.safetensors", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert all(not p.is_meta for p in bf16.parameters())
    # the loaded model owns its memory: overwriting the file it came from is safe
    loaded = load_dit(tmp_path / "single.safetensors")
    save_dit(random_model(seed=5), tmp_path / "single.safetensors")
    assert_same_weights(model, loaded)


def test_meta_load_reads_no_data(tmp_path, monkeypatch):
    save_dit(random_model(), tmp_path / "m.safetensors")
    calls = []
    monkeypatch.setattr(LazyTensor, "load", lambda self: calls.append(1))
    model = load_dit(tmp_path / "m.safetensors", device="meta")
    assert not calls and all(p.is_meta for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# The real architectures


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_real_architectures_in_every_layout(tmp_path, name):
    cfg = wan_config(name)
    shapes = meta_shapes(cfg)
    files = {
        "official single": write_sparse_safetensors(tmp_path / "model.safetensors", shapes),
        "official sharded": write_sparse_shards(tmp_path / "official", shapes, num_shards=6),
        "diffusers": tmp_path / "pipe",
        "official .pth": tmp_path / "model.pth",
        "rcm .pt": tmp_path / "rcm.pt",
    }
    folder = tmp_path / "pipe" / "transformer"
    folder.mkdir(parents=True)
    write_sparse_safetensors(folder / "diffusion_pytorch_model.safetensors", dit_state_dict_to_diffusers(shapes))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                    **wan_config_to_diffusers(cfg)}))
    torch.save(stride0_state_dict(shapes), files["official .pth"])
    torch.save(stride0_state_dict(rcm_shapes(cfg)), files["rcm .pt"])
    assert os.path.getsize(files["rcm .pt"]) < 2**20  # stride-0: no data
    for what, path in files.items():
        assert read_dit_config(path) == cfg, what  # inferred: shapes / config.json
        model = load_dit(path, device="meta")
        assert model.config == cfg, what
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == shapes, what
        assert all(p.dtype == torch.float32 for p in model.parameters())
    # the other size's config against this file: every mismatch listed
    other = wan_config("wan2.1-t2v-14b" if name == "wan2.1-t2v-1.3b" else "wan2.1-t2v-1.3b")
    with pytest.raises(ValueError, match=r"(?s)(missing|unexpected) keys.*shape mismatches \(\d+, file vs model\)"):
        load_dit(files["official sharded"], config=other, device="meta")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RCM_SLOW"), reason="reads and copies 2.8 GB: 10-30 s on 2 shared cores; RCM_SLOW=1")
def test_real_1p3b_official_file_loads_for_real(tmp_path):
    cfg = wan_config("wan2.1-t2v-1.3b")
    path = write_sparse_safetensors(tmp_path / "model.safetensors", meta_shapes(cfg))
    model = load_dit(path, dtype=torch.bfloat16)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) > 1.4e9
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params)
    assert model.blocks[29].ffn[2].weight.shape == (1536, 8960) and not model.blocks[29].ffn[2].weight.any()
    del model, params


# ------------------------------------------------------------------------------------------------
# Bad files


def test_bad_checkpoints_list_every_problem_in_one_error(tmp_path):
    sd = dict(random_model().state_dict())
    del sd["blocks.1.cross_attn.norm_k.weight"]
    sd["blocks.1.extra.weight"] = torch.zeros(1)
    sd["head.head.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"(?s)Wan DiT \(official layout\) checkpoint .*bad\.pth does not match.*"
                                         r"missing keys \(1\):\s+blocks\.1\.cross_attn\.norm_k\.weight.*"
                                         r"unexpected keys \(1\):\s+blocks\.1\.extra\.weight.*"
                                         r"shape mismatches \(1, file vs model\):\s+head\.head\.bias: \[7\] vs \[16\]"):
        load_dit(tmp_path / "bad.pth", config=TINY)
    # named as in the file: diffusers names for a diffusers file, net. names for an rCM file
    d = dit_state_dict_to_diffusers(random_model().state_dict())
    del d["blocks.0.attn2.to_out.0.weight"]
    torch.save(d, tmp_path / "d.pth")
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\):\s+blocks\.0\.attn2\.to_out\.0\.weight"):
        load_dit(tmp_path / "d.pth", config=TINY)
    r = {"net." + k: v for k, v in random_model().state_dict().items()}
    r["net.blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    r["stray"] = torch.zeros(1)
    torch.save(r, tmp_path / "r.pt")
    with pytest.raises(ValueError, match=r"(?s)unexpected keys \(1\):\s+stray.*net\.blocks\.0\.ffn\.0\.weight: \[3, 3\]"):
        load_dit(tmp_path / "r.pt", config=TINY)
    with pytest.raises(ValueError, match="no 'net_ema.' weights"):
        load_dit(tmp_path / "r.pt", config=TINY, ema=True)


def test_truncated_corrupt_and_missing_files(tmp_path):
    model = random_model()
    save_dit(model, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    for name, cut in [("half.safetensors", data[: len(data) // 2]), ("head.safetensors", data[:100]),
                      ("tiny.safetensors", data[:5]), ("last.safetensors", data[:-1])]:
        (tmp_path / name).write_bytes(cut)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_dit(tmp_path / name)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_dit(tmp_path / "junk.safetensors")
    torch.save(dict(model.state_dict()), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_dit(tmp_path / "cut.pth")
    # sharded: a missing shard, an index that disagrees with its shards
    save_dit(model, tmp_path / "sh", max_shard_bytes=100_000)
    index = tmp_path / "sh" / "diffusion_pytorch_model.safetensors.index.json"
    wm = json.loads(index.read_text())
    wm["weight_map"]["blocks.9.extra"] = next(iter(wm["weight_map"].values()))
    index.write_text(json.dumps(wm))
    with pytest.raises(ValueError, match=r"index and its shards disagree on 1 keys \(blocks\.9\.extra\)"):
        load_dit(tmp_path / "sh")
    next((tmp_path / "sh").glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shard .*00002.* is missing"):
        load_dit(tmp_path / "sh")
    with pytest.raises(FileNotFoundError):
        load_dit(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected diffusion_pytorch_model.safetensors"):
        load_dit(tmp_path / "empty")
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="not a Wan2.1 DiT"):
        load_dit(tmp_path / "vae.pth")
    torch.save({"w": torch.zeros(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="not tensors"):
        load_dit(tmp_path / "mixed.pt")


def test_generic_helpers(tmp_path):
    """open_state_dict is lazy, read_state_dict eager; load_state_dict_strict takes either."""
    model = random_model()
    save_dit(model, tmp_path / "m.safetensors")
    lazy = open_state_dict(tmp_path / "m.safetensors")
    assert isinstance(lazy["head.head.weight"], LazyTensor) and lazy["head.head.weight"].shape == (16, 128)
    assert json.loads(lazy.metadata["wan_config"])["dim"] == 128
    eager = read_state_dict(tmp_path / "m.safetensors")
    assert torch.equal(eager["head.head.weight"], model.head.head.weight)
    for sd in (lazy, eager):
        with torch.device("meta"):
            target = WanDiT(TINY)
        load_state_dict_strict(target, sd, what="Wan DiT", source="test", dtype=torch.float64)
        assert target.head.head.weight.dtype == torch.float64
    assert infer_wan_config({k: v.shape for k, v in lazy.items()}) == TINY
