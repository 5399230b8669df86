"""Image-to-video data and distillation on tiny random Wan models (docs/i2v.md): `rcm synth --images` for
each family (what a shard stores, checked against the conditioning rebuilt from the image), then `rcm
distill wan` for a few rCM iterations on an I2V-14B-style teacher, a TI2V-style teacher (the given frame
exact in the student's samples) and a two-expert teacher (a two-expert student folder that `rcm sample`
reads), through the CLI."""

import json

import imageio.v3 as iio
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rcm import cli
from rcm.models import load_wan_model
from rcm.models.image_encoder import load_image_encoder
from rcm.models.vae import load_vae
from rcm.models.wan_image import wan_image_condition
from rcm.wan.data import LatentBatches, LatentDataset
from rcm.wan.pipeline import read_image
from tests.i2v_files import make_i2v_files, write_image

PROMPTS = ["a cat", "a dog", "rain"]
FRAMES, SIZE = 5, 32  # Wan2.1 VAE latent 2 x 4 x 4 (16 tokens); Wan2.2 VAE 2 x 2 x 2


def synth_args(files, out, teacher, vae="vae", *extra):
    return ["synth", "--prompts", str(files / "prompts.txt"), "--images", str(files / "images"), "--teacher",
            str(files / teacher), "--vae-path", str(files / vae), "--text-encoder-path", str(files / "umt5"),
            "--out-dir", str(out), "--num-frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE),
            "--steps", "2", "--guidance", "3", "--shard-size", "2", "--device", "cpu", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v_distill")
    files = make_i2v_files(root / "files")
    (files / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (files / "images").mkdir()
    for i in range(len(PROMPTS)):
        write_image(files / "images" / f"{i:02d}.png", 24 + 8 * i, 48, seed=10 + i)  # sizes differ: all fitted
    data = {"i2v": root / "data_i2v", "ti2v": root / "data_ti2v", "experts": root / "data_experts"}
    cli.main(synth_args(files, data["i2v"], "i2v", "vae", "--image-encoder-path", str(files / "clip")))
    cli.main(synth_args(files, data["ti2v"], "ti2v.safetensors", "vae22"))
    cli.main(synth_args(files, data["experts"], "experts"))
    return files, data


def shard(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_synth_stores_each_families_conditioning(i2v):
    files, data = i2v
    vae, vae22 = load_vae(files / "vae"), load_vae(files / "vae22")
    clip = load_image_encoder(files / "clip")
    images = [read_image(files / "images" / f"{i:02d}.png", SIZE, SIZE) for i in range(len(PROMPTS))]
    for name, teacher, v, encoder in (("i2v", "i2v", vae, clip), ("experts", "experts", vae, None)):
        index = json.loads((data[name] / "index.json").read_text())
        assert index["i2v"] == "channels" and index["num_samples"] == 3
        rows = [shard(data[name] / s) for s in index["shards"]]
        y = torch.cat([r["y"] for r in rows])
        assert y.shape == (3, 20, 2, 4, 4) and ("image_context" in rows[0]) == (encoder is not None)
        assert torch.cat([r["images"] for r in rows]).dtype == torch.uint8
        config = load_wan_model(files / teacher, device="meta").config
        for i, image in enumerate(images):  # y (and the CLIP tokens) as the sampler built them from the image
            expected = wan_image_condition(config, v, image, FRAMES, image_encoder=encoder).inputs
            assert torch.equal(y[i : i + 1], expected["y"])
            if encoder is not None:
                tokens = torch.cat([r["image_context"] for r in rows])[i : i + 1]
                assert torch.equal(tokens, expected["image_context"].to(torch.bfloat16))
    index = json.loads((data["ti2v"] / "index.json").read_text())
    assert index["i2v"] == "frame" and index["latent_shape"] == [48, 2, 2, 2]
    latents = torch.cat([shard(data["ti2v"] / s)["latents"] for s in index["shards"]])
    for i, image in enumerate(images):  # frame replacement: the latent's first frame is the image's, exactly
        assert torch.equal(latents[i, :, :1], vae22.encode(image[:, :, None])[0])


def test_batches_carry_the_conditioning(i2v):
    _, data = i2v
    x0, context, inputs = next(LatentBatches(LatentDataset(data["i2v"]), 2, 8, seed=0))
    assert x0.shape == (2, 16, 2, 4, 4) and context.shape == (2, 8, 32)
    assert inputs["y"].shape == (2, 20, 2, 4, 4) and inputs["image_context"].shape == (2, 5, 32)
    assert len(next(LatentBatches(LatentDataset(data["ti2v"]), 2, 8, seed=0))[2]) == 0  # frame: x0 itself


def distill_args(files, teacher, data, out, *extra):
    return ["distill", "wan", "--teacher", str(files / teacher), "--data", str(data), "--out-dir", str(out),
            "--loop.iterations", "3", "--loop.checkpoint-every", "3", "--loop.log-every", "1",
            "--loss.scm.tangent-warmup", "1", "--loss.student-update-freq", "2", "--sample-every", "0",
            "--num-sample-prompts", "2", "--sample-steps", "1", "2", "--device", "cpu", "--threads", "1", *extra]


def _finite_logs(run):
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in logs] == ["student", "student", "critic"]
    assert all(torch.isfinite(torch.tensor(v)) for e in logs for k, v in e.items() if k.startswith("loss_"))
    return logs


def test_distill_i2v_and_ti2v(i2v, tmp_path):
    files, data = i2v
    run = tmp_path / "i2v"
    cli.main(distill_args(files, "i2v", data["i2v"], run))
    assert "loss_dmd" in _finite_logs(run)[1]
    student = load_file(run / "student_ema.safetensors")
    assert "img_emb.proj.1.weight" in student and student["patch_embedding.weight"].shape[1] == 36
    # TI2V: the EMA student's samples of the dataset's first prompts keep their given frame exactly
    run = tmp_path / "ti2v"
    cli.main(distill_args(files, "ti2v.safetensors", data["ti2v"], run))
    _finite_logs(run)
    samples = load_file(run / "samples" / "iter_00000003.safetensors")
    latents = LatentDataset(data["ti2v"])
    for steps in ("1step", "2step"):
        for i in range(2):
            assert torch.equal(samples[steps][i, :, 0], latents[i][0][:, 0].float()), (steps, i)
            assert not torch.equal(samples[steps][i, :, 1], latents[i][0][:, 1].float())


def test_distill_two_experts_exports_a_two_expert_student_that_samples(i2v, tmp_path):
    files, data = i2v
    run = tmp_path / "experts"
    cli.main(distill_args(files, "experts", data["experts"], run))
    _finite_logs(run)
    student = load_wan_model(run / "student_ema")  # high_noise_model/ + low_noise_model/, the boundary kept
    teacher = load_wan_model(files / "experts")
    assert student.boundary == teacher.boundary == 0.9
    for expert in ("high_noise", "low_noise"):  # each student expert starts from its own teacher expert
        s, t = getattr(student, expert).state_dict(), getattr(teacher, expert).state_dict()
        assert any(not torch.equal(s[k], t[k].to(s[k].dtype)) for k in s)
        other = getattr(teacher, "low_noise" if expert == "high_noise" else "high_noise").state_dict()
        k = "blocks.0.self_attn.q.weight"
        assert (s[k].float() - t[k]).abs().max() < (s[k].float() - other[k]).abs().max()
    out = tmp_path / "video.mp4"
    cli.main(["sample", "wan", "--dit-path", str(run / "student_ema"), "--vae-path", str(files / "vae"),
              "--text-encoder-path", str(files / "umt5"), "--prompt", "a cat", "--image", str(files / "first.png"),
              "--steps", "4", "--num-frames", "9", "--height", "32", "--width", "64", "--device", "cpu",
              "--save-path", str(out)])
    assert iio.imread(out, index=None).shape == (9, 32, 64, 3)


@pytest.mark.parametrize("teacher, dataset, message", [
    ("i2v", "experts", "CLIP image tokens"),
    ("experts", "ti2v", "latents with 48 channels"),
    ("t2v.safetensors", "experts", "image channels"),
])
def test_teacher_and_dataset_must_agree(i2v, tmp_path, capsys, teacher, dataset, message):
    files, data = i2v
    with pytest.raises(SystemExit) as e:
        cli.main(distill_args(files, teacher, data[dataset], tmp_path / "bad"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--data" in err and message in err, err


def test_synth_videos_first_frame_is_the_given_image(i2v, tmp_path, capsys):
    """`rcm synth --videos --first-frame`: each video's first frame (as read and fitted) conditions it, the
    way the teacher takes it; --first-frame needs the teacher; a T2V dataset keeps its settings hash."""
    from rcm.media import write_video
    from rcm.wan.synth import read_video

    files, _ = i2v
    videos = tmp_path / "videos"
    videos.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        write_video(videos / f"v{i}.mp4", (torch.rand(FRAMES, 40, 40, 3, generator=g) * 255).to(torch.uint8), fps=8)
    (files / "video_prompts.txt").write_text("one\ntwo\n")
    base = ["synth", "--videos", str(videos), "--prompts", str(files / "video_prompts.txt"), "--vae-path",
            str(files / "vae"), "--text-encoder-path", str(files / "umt5"), "--num-frames", str(FRAMES),
            "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu", "--threads", "1"]
    cli.main([*base, "--teacher", str(files / "experts"), "--first-frame", "--out-dir", str(tmp_path / "d")])
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["i2v"] == "channels" and index["settings"]["i2v"] == "channels"
    y = shard(tmp_path / "d" / index["shards"][0])["y"]
    config, vae = load_wan_model(files / "experts", device="meta").config, load_vae(files / "vae")
    for i in range(2):
        first = read_video(videos / f"v{i}.mp4", FRAMES, SIZE, SIZE)[None, :, 0]
        assert torch.equal(y[i : i + 1], wan_image_condition(config, vae, first, FRAMES).inputs["y"])
    with pytest.raises(SystemExit):
        cli.main([*base, "--first-frame", "--out-dir", str(tmp_path / "e")])
    assert "--teacher: is required with --first-frame" in capsys.readouterr().err
    cli.main([*base, "--out-dir", str(tmp_path / "t2v")])  # text to video: no i2v in the settings (old hashes hold)
    t2v = json.loads((tmp_path / "t2v" / "index.json").read_text())
    assert t2v["i2v"] is None and "i2v" not in t2v["settings"] and "first_frame" not in t2v["settings"]
