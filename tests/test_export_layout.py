"""`rcm export --layout rcm|official|diffusers` (issue 20): a tiny random Wan DiT checkpoint, exported in each
layout, loads again with our loader (and diffusers'), every tensor equal to the checkpoint's; two experts
likewise; a DCP checkpoint keeps the recorded architecture; the digits DiT takes --layout rcm only."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from rcm import cli
from rcm.checkpoint.local import save_checkpoint
from rcm.digits.model import build_model
from rcm.digits.task import DigitsTask
from rcm.models import WanDiT, WanExperts, dit_metadata, load_dit, load_wan_experts
from rcm.wan.task import WanTask
from rcm.models.wan_layouts import dit_state_dict_to_diffusers, infer_wan_config, wan_config_from_json
from tests.test_synth import TINY

CFG = dataclasses.replace(TINY, ffn_dim=192)  # no named config of these widths: the shapes alone would say 1 head


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # every tensor distinct: a swapped or dropped key cannot pass
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def _checkpoint(folder, ema: torch.nn.Module, network: dict, student: torch.nn.Module | None = None):
    """A single-process checkpoint as the training loop writes it: the train state and the run's record."""
    train = {"ema": ema.state_dict(), "student": (student or ema).state_dict(), "iteration": 3}
    save_checkpoint(folder, 3, {"train": train, "task": {}, "config": {"fingerprint": "x", "network": network}})
    return folder


def _tensors(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _export(tmp_path, checkpoint, layout, *extra):
    out = tmp_path / ("out.safetensors" if layout == "rcm" else "out")
    cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--layout", layout, *extra])
    return out


def test_the_architecture_is_not_in_the_shapes():
    assert infer_wan_config({k: tuple(v.shape) for k, v in WanDiT(CFG).state_dict().items()}).num_heads != 2


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    """A tiny Wan DiT's checkpoint with the architecture the Wan task records (fp32 EMA, a distinct live student)."""
    root = tmp_path_factory.mktemp("wan_ckpt")
    ema, student = _random(WanDiT(CFG), 0), _random(WanDiT(CFG), 1)
    network = WanTask.network_metadata(None, ema)  # the task's own hook (it uses nothing of the task)
    return _checkpoint(root / "checkpoints", ema, network, student), ema.state_dict()


@pytest.mark.parametrize("layout", ["rcm", "official", "diffusers"])
def test_each_layout_loads_back_with_every_tensor_equal(wan_run, tmp_path, layout):
    checkpoint, source = wan_run
    out = _export(tmp_path, checkpoint, layout, "--dtype", "keep")
    assert out.is_file() == (layout == "rcm") and out.is_dir() == (layout != "rcm")
    model = load_dit(out)  # our loader, each layout
    assert model.config == CFG  # the recorded architecture, heads included
    loaded = model.state_dict()
    assert loaded.keys() == source.keys()
    for k, v in source.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert dit_metadata(out)["kind"] == "student"  # `rcm sample` samples it as a student
    if layout == "rcm":
        tensors, meta = _tensors(out)
        assert tensors.keys() == source.keys() and json.loads(meta["wan_config"])["num_heads"] == 2
        return
    config = json.loads((out / "config.json").read_text())
    tensors, meta = _tensors(out / "diffusion_pytorch_model.safetensors")
    assert meta["layout"] == layout
    if layout == "official":
        assert config["_class_name"] == "WanModel" and wan_config_from_json(config) == CFG
        assert tensors.keys() == source.keys()  # the original Wan names are ours
    else:
        assert config["_class_name"] == "WanTransformer3DModel"
        assert dataclasses.replace(wan_config_from_json(config), text_len=CFG.text_len) == CFG  # diffusers has no text_len
        assert tensors.keys() == dit_state_dict_to_diffusers(source).keys()
        assert "blocks.0.attn1.to_q.weight" in tensors and "blocks.0.self_attn.q.weight" not in tensors


def test_diffusers_reads_the_diffusers_folder(wan_run, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    checkpoint, source = wan_run
    out = _export(tmp_path, checkpoint, "diffusers", "--dtype", "float32")
    # from_pretrained's steps, without `accelerate` (which it needs for this model): its config.json, then the
    # weights file into that model, strictly
    model = diffusers.WanTransformer3DModel.from_config(json.loads((out / "config.json").read_text()))
    tensors, _ = _tensors(out / "diffusion_pytorch_model.safetensors")
    model.load_state_dict(tensors, strict=True)
    theirs, expected = model.state_dict(), dit_state_dict_to_diffusers(source)
    assert theirs.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(theirs[k], v), k


def test_bfloat16_and_the_live_student(wan_run, tmp_path):
    checkpoint, _ = wan_run
    student = torch.load(checkpoint / "step_00000003.pt", weights_only=True)["train"]["student"]
    out = _export(tmp_path, checkpoint, "diffusers", "--model", "student")  # dtype: bfloat16 by default
    tensors, _ = _tensors(out / "diffusion_pytorch_model.safetensors")
    for k, v in dit_state_dict_to_diffusers(student).items():
        assert tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], v.to(torch.bfloat16)), k
    loaded = load_dit(out, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in student.items())


def test_a_folder_export_replaces_an_earlier_one_and_refuses_other_folders(wan_run, tmp_path, capsys):
    checkpoint, source = wan_run
    out = _export(tmp_path, checkpoint, "official", "--dtype", "keep")
    (out / "config.json").write_text("{}")  # damaged: the re-export writes it anew
    _export(tmp_path, checkpoint, "official", "--dtype", "keep", "--model", "student")
    _export(tmp_path, checkpoint, "official", "--dtype", "keep")
    assert all(torch.equal(v, source[k]) for k, v in load_dit(out).state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.card.json"]  # the card; no temporaries, no lock
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for argv, fragment in (
        (["--out", str(mine), "--layout", "official"], "notes.txt"),
        (["--out", str(tmp_path / "x.safetensors"), "--layout", "diffusers"], "writes a folder"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(["export", "--checkpoint", str(checkpoint), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("rcm: error: --out: ") and fragment in err, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_two_experts(tmp_path, layout):
    experts = WanExperts(_random(WanDiT(CFG), 2), _random(WanDiT(CFG), 3), boundary=0.8)
    checkpoint = _checkpoint(tmp_path / "checkpoints", experts, WanTask.network_metadata(None, experts))
    out = _export(tmp_path, checkpoint, layout, "--dtype", "keep")
    loaded = load_wan_experts(out)
    assert loaded.boundary == 0.8 and loaded.config == CFG
    for k, v in experts.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_a_dcp_checkpoint_keeps_the_recorded_architecture(tmp_path):
    """A DCP folder as ``save_train_state`` writes it (the models, and the ranks' object holding the record)."""
    import torch.distributed.checkpoint as dcp

    from rcm.checkpoint.dcp import _to_bytes

    ema = _random(WanDiT(CFG), 4)
    extra = {"task": {}, "config": {"fingerprint": "x", "network": WanTask.network_metadata(None, ema)}}
    ranks = _to_bytes({"dp_size": 1, "states": {0: {"generator": None, "torch_rng": None, "extra": extra}}})
    dcp.save({"ema": ema.state_dict(), "ranks": ranks}, checkpoint_id=str(tmp_path / "step_00000001"), no_dist=True)
    out = _export(tmp_path, tmp_path / "step_00000001", "diffusers", "--dtype", "keep")
    model = load_dit(out)
    assert model.config == CFG  # from the record; the shapes alone would give one head
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_digits_dit_takes_the_rcm_layout_only(tmp_path, capsys):
    digits = build_model("digits-dit-tiny")
    recorded = _checkpoint(tmp_path / "recorded", digits, DigitsTask.network_metadata(None, digits))  # as a run records
    unrecorded = _checkpoint(tmp_path / "unrecorded", digits, {})  # refused from its keys
    for checkpoint, fragment in ((recorded, "digits demo's class-conditioned DiT"),
                                 (unrecorded, "is not one (cannot infer the Wan config")):
        for layout in ("diffusers", "official"):
            with pytest.raises(SystemExit) as e:
                cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                          "--layout", layout])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.startswith("rcm: error: --layout: ") and fragment in err, err
            assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    out = _export(tmp_path, recorded, "rcm", "--dtype", "keep")  # rcm: as before
    tensors, meta = _tensors(out)
    assert meta["num_classes"] == "10" and all(torch.equal(v, digits.state_dict()[k]) for k, v in tensors.items())
