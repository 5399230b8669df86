"""``rcm sample`` (rcm/sample.py, rcm/digits/sample.py, rcm/wan/sample.py): the Wan pipeline end to end on tiny random models (acceptance 4 of
issue 4), the digits demo's output formats, and argument validation, partly through ``cli.main``."""

import dataclasses

import imageio.v2 as iio2
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from rcm import PathArgumentError
from rcm.digits import model as demo
from rcm.digits.sample import DigitsSampleConfig, sample_digits
from rcm.media import write_video
from rcm.models import save_dit
from rcm.models.text_encoder import tiny_text_encoder
from rcm.models.vae import WanVAE, WanVAEConfig, save_vae
from rcm.models.wan import WanConfig, WanDiT
from rcm.wan.pipeline import video_size
from rcm.wan.sample import WanSampleConfig, sample_wan

# A Wan DiT that fits the tiny VAE (16 latent channels) and the tiny umT5 (width 32, 8 tokens).
TINY_WAN = WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_len=8, text_dim=32, freq_dim=32)
FRAMES, HEIGHT, WIDTH = 9, 32, 48  # latent 3 x 4 x 6, 18 tokens


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    dit = WanDiT(TINY_WAN)
    torch.nn.init.normal_(dit.head.head.weight, std=0.05)  # a non-zero velocity
    save_dit(dit, root / "student.safetensors", metadata={"kind": "student"})
    save_dit(dit, root / "teacher", layout="diffusers")  # no 'kind': a Wan teacher
    save_vae(WanVAE(WanVAEConfig.tiny()), root / "vae", layout="diffusers")
    encoder = tiny_text_encoder(32, text_len=TINY_WAN.text_len)
    encoder.model.save_pretrained(root / "umt5")
    encoder.tokenizer.save_pretrained(root / "umt5")
    return root


def wan_args(files, **kw):
    base = dict(model="wan", dit_path=files / "student.safetensors", vae_path=files / "vae",
                text_encoder_path=files / "umt5", prompt="a digit rolling down a hill", num_frames=FRAMES,
                height=HEIGHT, width=WIDTH, device="cpu")  # fmt: skip
    return WanSampleConfig(**{**base, **kw})


@pytest.fixture
def cli_main():
    from rcm import cli

    return cli.main


def _field(flag: str) -> str:
    """A flag in a pattern (``--sigma-max``) as the field a ConfigError names (``sigma_max``)."""
    import re

    return re.sub(r"--([a-z-]+)", lambda m: m[1].replace("-", "_"), flag)


def read_video(path):
    reader = iio2.get_reader(path)
    frames = [f for f in reader]
    meta = reader.get_meta_data()
    reader.close()
    return np.stack(frames), meta


# ------------------------------------------------------------------------------------------------
# Wan, end to end on the CPU


def test_wan_student_cli_writes_playable_mp4s(wan_files, tmp_path, cli_main):
    out = tmp_path / "out.mp4"
    cli_main(["sample", "wan", "--dit-path", str(wan_files / "student.safetensors"),
              "--vae-path", str(wan_files / "vae"), "--text-encoder-path", str(wan_files / "umt5"),
              "--prompt", "a cat surfing", "--num-samples", "2", "--steps", "2", "--num-frames", str(FRAMES),
              "--height", str(HEIGHT), "--width", str(WIDTH), "--seed", "3", "--device", "cpu",
              "--save-path", str(out)])  # fmt: skip
    videos = []
    for i in range(2):
        frames, meta = read_video(tmp_path / f"out_{i}.mp4")
        assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
        assert meta["fps"] == 16 and meta["codec"] == "h264"
        videos.append(frames.astype(np.float32))
    assert np.abs(videos[0] - videos[1]).mean() > 1  # seeds 3 and 4: different samples
    # sample i alone, with seed + i, is the same video (same frames: the same H.264 stream)
    again = sample_wan(wan_args(wan_files, prompt="a cat surfing", steps=2, seed=4, save_path=tmp_path / "again.mp4"))
    assert again.paths == [tmp_path / "again.mp4"] and again.kind == "student"
    assert np.array_equal(read_video(again.paths[0])[0].astype(np.float32), videos[1])


def test_wan_teacher_with_cfg_writes_a_gif(wan_files, tmp_path):
    result = sample_wan(wan_args(wan_files, dit_path=wan_files / "teacher", sampler="euler", steps=2, guidance=3.0,
                             num_frames=5, save_path=tmp_path / "t.gif"))  # fmt: skip
    assert result.kind == "teacher"  # diffusers file without a 'kind': a teacher
    assert len(result.extra["step_seconds"]) == 2 and result.dit_seconds_per_step > 0
    frames = iio.imread(result.paths[0], index=None)
    assert frames.shape[:3] == (5, HEIGHT, WIDTH)


@pytest.mark.parametrize("change, arg", [
    (dict(dit_path="missing.safetensors"), "--dit-path"),
    (dict(vae_path=None), "--vae-path"),
    (dict(text_encoder_path="nowhere/umt5"), "--text-encoder-path"),
    (dict(prompt="  "), "--prompt"),
    (dict(num_frames=8), "--num-frames"),
    (dict(steps=5), "--steps"),
    (dict(steps=0), "--steps"),
    (dict(sigma_max=0.0), "--sigma-max"),
    (dict(sigma_max=-80.0), "--sigma-max"),
    (dict(kind="teacher", guidance=-1.0), "--guidance"),
    (dict(kind="teacher", steps=0), "--steps"),
    (dict(kind="teacher", shift=0.0), "--shift"),
    (dict(height=None, width=None, resolution="1080p"), "--resolution"),
    (dict(height=None, width=None, aspect_ratio="4:3"), "--aspect-ratio"),
    (dict(height=40), "--height"),
    (dict(width=None), "--width"),
    (dict(save_path="out.avi"), "--save-path"),
    (dict(num_samples=0), "--num-samples"),
    (dict(vae_chunk_size=0), "--vae-chunk-size"),
    (dict(model="wan2.1-t2v-1.3b"), "(?s)--dit-path: .*shape mismatches"),  # the named architecture, a tiny file
])  # fmt: skip
def test_wan_bad_arguments_name_the_argument(wan_files, change, arg):
    change = {k: (wan_files / v if k.endswith("_path") and isinstance(v, str) and k != "save_path" else v)
              for k, v in change.items()}
    with pytest.raises(ValueError, match=_field(arg)):
        sample_wan(dataclasses.replace(wan_args(wan_files), **change))


def test_missing_path_is_also_file_not_found(wan_files):
    with pytest.raises(FileNotFoundError, match="vae_path"):
        sample_wan(wan_args(wan_files, vae_path=wan_files / "nope"))
    assert issubclass(PathArgumentError, ValueError)


def test_cli_bad_path_exits_2_with_one_line(wan_files, tmp_path, cli_main, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["sample", "wan", "--dit-path", str(tmp_path / "nope.safetensors"),
                  "--vae-path", str(wan_files / "vae"), "--text-encoder-path", str(wan_files / "umt5"),
                  "--prompt", "x"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rcm: error: --dit-path") and "\n" not in err


def test_video_sizes_are_wans():
    assert video_size("480p", "16:9") == (480, 832) and video_size("720p", "9:16") == (1280, 720)
    assert video_size("480p", "1:1") == (624, 624)
    for h, w in [video_size(r, a) for r in ("480p", "720p") for a in ("16:9", "9:16", "1:1")]:
        assert h % 16 == 0 and w % 16 == 0


def test_write_video_round_trip(tmp_path):
    frames = np.zeros((4, 16, 32, 3), dtype=np.uint8)
    frames[:, :, :16] = 255
    read, _ = read_video(write_video(tmp_path / "v.mp4", frames, fps=8))
    assert read.shape == frames.shape and np.abs(read.astype(int) - frames).mean() < 8
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "v.mp4", frames.astype(np.float32))
    with pytest.raises(ValueError, match=".webm"):
        write_video(tmp_path / "v.webm", frames)


# ------------------------------------------------------------------------------------------------
# Digits demo


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    model = demo.build_model("digits-dit-tiny", seed=0)
    demo.save_model(model, root / "student.safetensors", {"kind": "student", "method": "rcm"})
    demo.save_model(model, root / "teacher.safetensors", {"recipe": {"steps": 1}})
    demo.save_model(model, root / "unknown.safetensors")
    return root


def test_digits_student_every_format(digits_files, tmp_path, cli_main):
    spec = demo.DEMO_SPEC
    cli_main(["sample", "--checkpoint", str(digits_files / "student.safetensors"), "--labels", "3", "1", "4",
              "--steps", "2", "--save-path", str(tmp_path / "s.npz")])  # fmt: skip
    data = np.load(tmp_path / "s.npz")
    assert data["clips"].shape == (3, spec.frames, spec.size, spec.size) and data["clips"].dtype == np.float32
    assert 0 <= data["clips"].min() and data["clips"].max() <= 1
    assert data["labels"].tolist() == [3, 1, 4]
    args = dict(checkpoint=digits_files / "student.safetensors", num_samples=4, steps=1)
    png = sample_digits(DigitsSampleConfig(**args, save_path=tmp_path / "s.png")).paths[0]
    img = iio.imread(png)
    assert img.ndim == 2 and img.shape[0] > 4 * spec.size and img.shape[1] > spec.frames * spec.size
    gif = iio.imread(sample_digits(DigitsSampleConfig(**args, save_path=tmp_path / "s.gif")).paths[0], index=None)
    assert gif.shape[0] == spec.frames
    mp4, _ = read_video(sample_digits(DigitsSampleConfig(**args, save_path=tmp_path / "s.mp4")).paths[0])
    assert mp4.shape[0] == spec.frames and mp4.shape[1] % 16 == 0 and mp4.shape[2] % 16 == 0
    assert mp4.shape[2] >= 4 * 4 * spec.size  # 4 clips side by side, pixels x4


def test_digits_teacher_and_kind_inference(digits_files, tmp_path):
    result = sample_digits(DigitsSampleConfig(checkpoint=digits_files / "teacher.safetensors", num_samples=2, steps=2,
                                 sampler="euler", save_path=tmp_path / "t.npz"))  # fmt: skip
    assert result.kind == "teacher"
    assert np.load(result.paths[0])["clips"].shape[0] == 2
    with pytest.raises(ValueError, match="--kind"):
        sample_digits(DigitsSampleConfig(checkpoint=digits_files / "unknown.safetensors", save_path=tmp_path / "u.npz"))
    forced = sample_digits(DigitsSampleConfig(checkpoint=digits_files / "unknown.safetensors", kind="student", steps=1,
                                 num_samples=1, save_path=tmp_path / "u.npz"))  # fmt: skip
    assert forced.kind == "student"


@pytest.mark.parametrize("change, arg", [
    (dict(checkpoint="nope.safetensors"), "--checkpoint"),
    (dict(labels=(3, 12)), "--labels"),
    (dict(labels=(1, 2), num_samples=3), "--num-samples"),
    (dict(steps=7), "--steps"),
    (dict(sigma_max=float("nan")), "--sigma-max"),
    (dict(save_path="x.jpg"), "--save-path"),
    (dict(kind="teacher", guidance=-0.5), "--guidance"),
])  # fmt: skip
def test_digits_bad_arguments(digits_files, tmp_path, change, arg):
    cfg = DigitsSampleConfig(checkpoint=digits_files / "student.safetensors", save_path=tmp_path / "x.png")
    if change.get("checkpoint"):
        change["checkpoint"] = tmp_path / change["checkpoint"]
    with pytest.raises(ValueError, match=_field(arg)):
        sample_digits(dataclasses.replace(cfg, **change))


def test_wan_compiled_sampling_matches_eager(wan_files, tmp_path):
    """--compile (inductor, block by block) gives the eager video."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs cached by an earlier test of the same shapes would not count as new
    eager = sample_wan(wan_args(wan_files, steps=2, save_path=tmp_path / "eager.mp4"))
    graphs = counters["stats"]["unique_graphs"]
    compiled = sample_wan(wan_args(wan_files, steps=2, save_path=tmp_path / "compiled.mp4", compile=True))
    assert counters["stats"]["unique_graphs"] > graphs  # the blocks really ran compiled
    a, b = (read_video(r.paths[0])[0].astype(np.float32) for r in (eager, compiled))
    assert a.shape == b.shape and a.std() > 0
    assert np.abs(a - b).mean() < 0.5  # the same latents up to float rounding, through a lossy codec


def test_save_path_under_a_file_is_refused_before_any_work(tmp_path):
    from rcm import ConfigError
    from rcm.sample import SampleSettings

    (tmp_path / "notes.txt").write_text("x")
    settings = SampleSettings(save_path=tmp_path / "notes.txt" / "deeper" / "o.png")
    with pytest.raises(ConfigError, match="notes.txt is a file"):
        settings.save_path_or("samples.png", (".png",), "test")
    assert SampleSettings(save_path=tmp_path / "new" / "o.png").save_path_or("s.png", (".png",), "t").name == "o.png"
