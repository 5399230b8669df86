"""`rcm synth` (rcm/synth.py) and the latent dataset reader (rcm.data.LatentDataset / LatentBatches) on
tiny random Wan models: teacher samples, videos and existing shards as sources, resume, two ranks."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rcm import cli
from rcm.wan.data import INDEX_NAME, LatentBatches, LatentDataset, pad_embeddings
from rcm.models import save_dit
from rcm.models.text_encoder import tiny_text_encoder
from rcm.models.vae import WanVAE, WanVAEConfig, load_vae, save_vae
from rcm.models.wan import WanConfig, WanDiT
from rcm.media import write_video
from rcm.wan.synth import read_video

ROOT = Path(__file__).resolve().parents[1]
TINY = WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_len=16, text_dim=32, freq_dim=32)
PROMPTS = ["a cat", "a dog", "sun", "rain", "a red fox"]
VIDEO = ["--num-frames", "5", "--height", "16", "--width", "16"]  # latent [16, 2, 2, 2]


def make_wan_files(root: Path) -> Path:
    """A tiny teacher (text width 32, 16 tokens), a tiny VAE and a tiny umT5 of width 32, and prompts."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dit = WanDiT(TINY)
    torch.nn.init.normal_(dit.head.head.weight, std=0.05)  # a non-zero velocity
    save_dit(dit, root / "teacher.safetensors", metadata={"kind": "teacher"})
    save_vae(WanVAE(WanVAEConfig.tiny()), root / "vae", layout="diffusers")
    encoder = tiny_text_encoder(32, text_len=TINY.text_len)
    encoder.model.save_pretrained(root / "umt5")
    encoder.tokenizer.save_pretrained(root / "umt5")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def synth_args(files: Path, out: Path, *extra: str) -> list[str]:
    return ["synth", "--prompts", str(files / "prompts.txt"), "--teacher", str(files / "teacher.safetensors"),
            "--text-encoder-path", str(files / "umt5"), "--out-dir", str(out), *VIDEO, "--steps", "3",
            "--shard-size", "2", "--device", "cpu", "--threads", "1", *extra]


def shard_content(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata of a safetensors file (its bytes are not canonical: metadata order varies)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def same_content(a: Path, b: Path) -> bool:
    (ta, ma), (tb, mb) = shard_content(a), shard_content(b)
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_wan_files(tmp_path_factory.mktemp("wan"))


@pytest.fixture(scope="module")
def dataset(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "d"
    cli.main(synth_args(files, out))
    return out


def test_synth_writes_a_dataset(dataset, files):
    index = json.loads((dataset / INDEX_NAME).read_text())
    assert index["num_samples"] == 5 and index["shards"] == [f"shard_0000{i}.safetensors" for i in range(3)]
    assert index["latent_shape"] == [16, 2, 2, 2] and index["text_dim"] == 32 and index["text_len"] == 16
    assert index["settings"]["steps"] == 3 and len(index["settings"]["teacher_sha256"]) == 64
    data = LatentDataset(dataset)
    assert len(data) == 5 and data.negative is not None and data.negative.shape[1] == 32
    encoder = tiny_text_encoder(32, text_len=16)
    for i, prompt in enumerate(PROMPTS):
        latent, embed, text = data[i]
        assert text == prompt and latent.shape == (16, 2, 2, 2) and latent.dtype == torch.float32
        assert torch.isfinite(latent).all() and latent.std() > 0.1
        full = encoder.encode([prompt])[0]
        n = len(prompt.encode()) + 1  # byte tokens + EOS: the trimmed length
        assert embed.shape == (n, 32) and embed.dtype == torch.bfloat16
        torch.testing.assert_close(embed.float(), full[:n].to(torch.bfloat16).float())
        assert (full[n:] == 0).all()
    # different prompts and seeds: different latents
    assert not torch.equal(data[0][0], data[1][0])


def test_rerun_is_a_no_op_and_a_lost_shard_is_remade_identically(dataset, files, tmp_path, capsys):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(dataset, copy)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in copy.glob("shard_*")}
    capsys.readouterr()
    cli.main(synth_args(files, copy))
    assert "3 of this rank's 3 already done" in " ".join(capsys.readouterr().out.split())
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in copy.glob("shard_*")} == before
    (copy / "shard_00001.safetensors").unlink()  # as if the run died while writing it
    (copy / INDEX_NAME).unlink()
    cli.main(synth_args(files, copy))
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in copy.glob("shard_*")}
    assert after["shard_00000.safetensors"] == before["shard_00000.safetensors"]  # untouched
    assert after["shard_00001.safetensors"][0] != before["shard_00001.safetensors"][0]  # remade ...
    assert same_content(copy / "shard_00001.safetensors", dataset / "shard_00001.safetensors")  # ... identically
    assert (copy / INDEX_NAME).read_text() == (dataset / INDEX_NAME).read_text()


def test_two_ranks_write_disjoint_shards_equal_to_one_rank(dataset, files, tmp_path):
    out = tmp_path / "d2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "cli.py"), *synth_args(files, out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    text = " ".join(done.stdout.split())
    assert "rank 0/2: wrote shard_00000.safetensors, shard_00002.safetensors" in text
    assert "rank 1/2: wrote shard_00001.safetensors" in text
    for name in ("shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors",
                 "negative.safetensors"):
        assert same_content(out / name, dataset / name), name
    assert (out / INDEX_NAME).read_text() == (dataset / INDEX_NAME).read_text()


def test_video_folder_is_encoded_with_the_vae(files, tmp_path):
    videos = tmp_path / "videos"
    rng = np.random.default_rng(0)
    clips = {"b.gif": rng.integers(0, 255, (7, 24, 32, 3), dtype=np.uint8),
             "a.mp4": rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)}
    for name, frames in clips.items():
        write_video(videos / name, frames, fps=8)
    (videos / "b.txt").write_text("a gif of noise\n")
    (tmp_path / "prompts.txt").write_text("first\nsecond\n")  # by name: a.mp4 -> first (b.gif has its .txt)
    out = tmp_path / "dv"
    cli.main(["synth", "--videos", str(videos), "--prompts", str(tmp_path / "prompts.txt"), "--vae-path",
              str(files / "vae"), "--text-encoder-path", str(files / "umt5"), "--text-len", "16", "--out-dir",
              str(out), *VIDEO, "--device", "cpu"])
    data = LatentDataset(out)
    assert [data[i][2] for i in range(2)] == ["first", "a gif of noise"]
    vae = load_vae(files / "vae")
    for i, name in enumerate(sorted(clips)):
        video = read_video(videos / name, 5, 16, 16)
        assert video.shape == (3, 5, 16, 16) and video.min() >= -1 and video.max() <= 1
        torch.testing.assert_close(data[i][0], vae.encode(video[None])[0])


def _reference_tars(dataset: Path, folder: Path, text_len: int = 16) -> None:
    """The reference's webdataset layout: <key>.latent.pt, <key>.embed.pt ([text_len, D] zero-padded),
    <key>.prompt.txt; two tars."""
    data = LatentDataset(dataset)
    folder.mkdir()
    for t, idx in enumerate(([0, 1, 2], [3, 4])):
        with tarfile.open(folder / f"part-{t:03d}.tar", "w") as tar:
            for i in idx:
                latent, embed, prompt = data[i]
                padded = pad_embeddings([embed], text_len)[0].to(torch.bfloat16)
                for ext, payload in (("latent.pt", latent), ("embed.pt", padded), ("prompt.txt", prompt)):
                    buf = io.BytesIO()
                    if ext == "prompt.txt":
                        buf.write(payload.encode())
                    else:
                        torch.save(payload, buf)
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)


def test_reference_tars_are_read_directly_and_resharded(dataset, files, tmp_path):
    tars = tmp_path / "tars"
    _reference_tars(dataset, tars)
    ours, theirs = LatentDataset(dataset), LatentDataset(tars)
    assert len(theirs) == 5 and theirs.negative is None
    for i in range(5):
        a, b = ours[i], theirs[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    out = tmp_path / "resharded"
    cli.main(["synth", "--latents", str(tars), "--text-encoder-path", str(files / "umt5"), "--text-len", "16",
              "--out-dir", str(out), "--shard-size", "4", "--device", "cpu"])
    again = LatentDataset(out)
    assert len(again.shards) == 2 and torch.equal(again.negative, ours.negative)
    for i in range(5):
        assert torch.equal(again[i][0], ours[i][0]) and torch.equal(again[i][1], ours[i][1])


def test_batches_resume_exactly_and_cover_each_epoch(dataset):
    data = LatentDataset(dataset)
    a = LatentBatches(data, batch_size=2, text_len=16, seed=3)
    seen = a.indices() + a.indices()
    x0, context = next(a)
    assert x0.shape == (2, 16, 2, 2, 2) and context.shape == (2, 16, 32) and context.dtype == torch.float32
    assert sorted(seen + a._permutation(0)[4:].tolist()) == list(range(5))  # epoch 0 is a permutation
    state = a.state_dict()
    later = [next(a) for _ in range(4)]  # crosses into epoch 2
    b = LatentBatches(data, batch_size=2, text_len=16, seed=3)
    b.load_state_dict(state)
    for (x, c), (y, d) in zip(later, [next(b) for _ in range(4)]):
        assert torch.equal(x, y) and torch.equal(c, d)
    # two data-parallel ranks split the global batch of one rank with batch 2 x 2
    whole = LatentBatches(data, batch_size=4, text_len=16, seed=3).indices()
    r0 = LatentBatches(data, batch_size=2, text_len=16, seed=3, rank=0, world=2).indices()
    r1 = LatentBatches(data, batch_size=2, text_len=16, seed=3, rank=1, world=2).indices()
    assert sorted(r0 + r1) == sorted(whole) and not set(r0) & set(r1)
    assert LatentBatches(data, 1, 16, max_frames=1).__next__()[0].shape[2] == 1


@pytest.mark.parametrize("change, fragment", [
    (lambda f, t: ["--prompts", str(t / "missing.txt")], "--prompts: no such file"),
    (lambda f, t: ["--prompts", str(t / "empty.txt")], "holds no prompts"),
    (lambda f, t: ["--num-frames", "8"], "--num-frames: must be 1 + 4k"),
    (lambda f, t: ["--height", "40"], "--height: must be a positive multiple of 16"),
    (lambda f, t: ["--text-encoder-path", str(t / "wide")], "its width 64 != the teacher's text_dim 32"),
    (lambda f, t: ["--videos", str(t)], "give one source"),
    (lambda f, t: ["--steps", "0"], "--steps: must be >= 1"),
])  # fmt: skip
def test_bad_input_is_one_line_exit_2(files, tmp_path, capsys, change, fragment):
    (tmp_path / "empty.txt").write_text("\n \n")
    wide = tiny_text_encoder(64, text_len=16)
    wide.model.save_pretrained(tmp_path / "wide")
    wide.tokenizer.save_pretrained(tmp_path / "wide")
    args = synth_args(files, tmp_path / "out")
    extra = change(files, tmp_path)
    for flag, value in zip(extra[::2], extra[1::2]):  # replace a flag's value, or add the flag
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if "--videos" in extra:
        args += ["--latents", str(tmp_path)]
    capsys.readouterr()  # the setup's own output
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert fragment in err, err
    assert not (tmp_path / "out" / INDEX_NAME).exists()
