"""``rcm.pipeline`` (load + generate, the one implementation of sampling), model cards read by it and by
`rcm sample`, one ``--steps`` per kind, and no `rcm sample` flag silently ignored."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rcm import cli
import rcm.pipeline
from rcm import ConfigError
from rcm.digits import model as demo
from rcm.digits import presets
from rcm.digits.sample import DigitsSampleConfig
from rcm.wan.sample import WanSampleConfig
from test_sample import FRAMES, HEIGHT, WIDTH, digits_files, wan_files  # noqa: F401 (fixtures)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_pipeline_snippet_runs(tmp_path, monkeypatch, capsys):
    """The README's sampling snippet, exactly as written, on a tiny student where `rcm distill` puts it."""
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
                   if "rcm.pipeline.load" in b)
    monkeypatch.chdir(tmp_path)
    demo.save_model(demo.build_model("digits-dit-tiny", seed=0), tmp_path / "runs/digits-rcm/student_ema.safetensors",
                    {"kind": "student", "method": "rcm"})
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.split() == ["student", "(3,", "1,", "8,", "16,", "16)", "(1,", "1,", "8,", "16,",
                                               "16)"]  # fmt: skip


def _cli_npz(path, out, *flags) -> np.ndarray:
    cli.main(["sample", "--checkpoint", str(path), "--labels", "3", "1", "--save-path", str(out), *flags])
    return np.load(out)["clips"]


def test_pipeline_is_what_rcm_sample_writes(digits_files, tmp_path):
    for name, steps in (("student", 2), ("teacher", 3)):
        pipe = rcm.pipeline.load(digits_files / f"{name}.safetensors")
        assert pipe.kind == name and pipe.family == "digits" and pipe.card is None
        clips = pipe.generate([3, 1], steps=steps, seed=5)
        assert clips.shape == (2, 1, 8, 16, 16) and clips.dtype == torch.float32 and clips.abs().max() <= 1
        written = _cli_npz(digits_files / f"{name}.safetensors", tmp_path / f"{name}.npz", "--steps", str(steps),
                           "--seed", "5")  # fmt: skip
        assert np.array_equal(written, ((clips[:, 0] + 1) / 2).numpy())  # the CLI's .npz holds [0, 1]
    assert pipe.generate(num_samples=3, steps=1).shape[0] == 3
    with pytest.raises(ConfigError, match="^steps: must be in 1..4 for a student, got 5"):
        rcm.pipeline.load(digits_files / "student.safetensors").generate([1], steps=5)
    with pytest.raises(ConfigError, match="^steps: must be in 1..10,000 for a teacher, got 0"):
        rcm.pipeline.load(digits_files / "teacher.safetensors").generate([1], steps=0)
    with pytest.raises(ConfigError, match="^guidance: applies to a teacher"):
        rcm.pipeline.load(digits_files / "student.safetensors").generate([1], guidance=3.0)
    with pytest.raises(ConfigError, match="^vae_path: applies to Wan"):
        rcm.pipeline.load(digits_files / "student.safetensors", vae_path="x")
    with pytest.raises(ConfigError, match="^labels"):
        rcm.pipeline.load(digits_files / "student.safetensors").generate([10])


def test_wan_pipeline_returns_the_videos_rcm_sample_writes(wan_files, tmp_path):
    from rcm.wan.sample import sample_wan

    pipe = rcm.pipeline.load(wan_files / "student.safetensors", vae_path=wan_files / "vae",
                             text_encoder_path=wan_files / "umt5")  # fmt: skip
    assert pipe.family == "wan" and pipe.kind == "student"
    videos = pipe.generate("a cat", steps=2, seed=1, num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    assert videos.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and videos.dtype == torch.uint8
    assert pipe.last_run["steps"] == 2 and len(pipe.last_run["step_seconds"]) == 2
    cfg = WanSampleConfig(model="wan", dit_path=wan_files / "student.safetensors", vae_path=wan_files / "vae",
                          text_encoder_path=wan_files / "umt5", prompt="a cat", num_frames=FRAMES, height=HEIGHT,
                          width=WIDTH, device="cpu", steps=2, seed=1, save_path=tmp_path / "o.gif")  # fmt: skip
    import imageio.v3 as iio

    written = iio.imread(sample_wan(cfg).paths[0], index=None)[..., :3]
    assert written.shape == tuple(videos.shape[1:])
    assert np.abs(written.astype(np.float32) - videos[0].numpy()).mean() < 8  # GIF palette quantization


# ------------------------------------------------------------------------------------------------
# Model cards


def _student_with_card(root: Path, name: str, card: str | None) -> Path:
    path = root / f"{name}.safetensors"
    demo.save_model(demo.build_model("digits-dit-tiny", seed=0), path, {"kind": "student", "method": "rcm"})
    if card is not None:
        (root / f"{name}.card.json").write_text(card)
    return path


def test_rcm_sample_takes_its_defaults_from_the_card(tmp_path):
    from rcm.checkpoint.card import write_card

    plain = _student_with_card(tmp_path, "plain", None)
    carded = _student_with_card(tmp_path, "carded", None)
    write_card(carded, family="digits", teacher="t", method="rcm", iterations=3,
               sampling={"steps": 2, "sigma_max": 3.0, "mid_times": {2: (0.5,)}})  # fmt: skip
    assert rcm.pipeline.load(carded).sampling() == (2, 3.0)
    assert rcm.pipeline.load(plain).sampling() == (4, presets.STUDENT_SIGMA_MAX)
    no_card = _cli_npz(plain, tmp_path / "a.npz")
    with_card = _cli_npz(carded, tmp_path / "b.npz")
    assert np.abs(no_card - with_card).mean() > 1e-3  # 2 steps from σ_max 3 through t = 0.5, not 4 from 80
    same_as_card = _cli_npz(plain, tmp_path / "c.npz", "--steps", "2", "--sigma-max", "3")
    explicit = rcm.pipeline.load(plain).generate([3, 1], steps=2, sigma_max=3.0, mid_times=(0.5,))
    assert np.array_equal(with_card, ((explicit[:, 0] + 1) / 2).numpy())  # the card's mid-times were used
    assert not np.array_equal(same_as_card, with_card)  # ... and they are not the presets' (0.8)
    flags_win = _cli_npz(carded, tmp_path / "d.npz", "--steps", "4", "--sigma-max", str(presets.STUDENT_SIGMA_MAX))
    assert np.array_equal(flags_win, no_card)  # explicit flags override the card


def test_a_card_that_is_not_json_is_an_error_naming_it(tmp_path, capsys):
    path = _student_with_card(tmp_path, "broken", "{not json")
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--checkpoint", str(path), "--save-path", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("rcm: error: --checkpoint:") and "broken.card.json" in err
    assert "\n" not in err
    with pytest.raises(ConfigError, match="broken.card.json: not a valid model card"):
        rcm.pipeline.load(path)
    odd = _student_with_card(tmp_path, "odd", json.dumps({"kind": "student", "sampling": {"steps": 9}}))
    with pytest.raises(ConfigError, match=r"^steps: must be in 1..4 for a student, got 9 \(the model card's"):
        rcm.pipeline.load(odd).generate([1])
    assert rcm.pipeline.load(odd).generate([1], steps=1).shape[0] == 1  # an explicit value needs no card's


# ------------------------------------------------------------------------------------------------
# No flag silently ignored: every `rcm sample` flag that does not apply to a kind is an error


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


WAN_ONLY = sorted({f.name for f in dataclasses.fields(WanSampleConfig)} - {f.name for f in dataclasses.fields(DigitsSampleConfig)})
DIGITS_ONLY = sorted({f.name for f in dataclasses.fields(DigitsSampleConfig)} - {f.name for f in dataclasses.fields(WanSampleConfig)})
VALUES = {"labels": ["1"], "checkpoint": ["x.safetensors"], "model": ["wan"], "compile": [], "num_frames": ["5"],
          "height": ["32"], "width": ["32"], "vae_chunk_size": ["1"], "resolution": ["480p"], "aspect_ratio": ["1:1"]}
TEACHER_ONLY = {"sampler": "euler", "guidance": "3", "shift": "2"}
# every other flag applies to both kinds (checked here so that a new flag has to be placed in one list)
SHARED = {"kind", "save_path", "seed", "num_samples", "steps", "sigma_max", "fps", "threads", "device"}


def test_the_walk_covers_every_flag():
    fields = {f.name for f in dataclasses.fields(WanSampleConfig)} | {f.name for f in dataclasses.fields(DigitsSampleConfig)}
    wan_placed = {"dit_path", "vae_path", "text_encoder_path", "tokenizer_path", "prompt", "negative_prompt", "image",
                  "image_encoder_path", "resolution", "aspect_ratio", "height", "width", "num_frames",
                  "vae_chunk_size", "compile", "model"}  # fmt: skip
    assert fields == SHARED | set(TEACHER_ONLY) | set(WAN_ONLY) | set(DIGITS_ONLY) and set(WAN_ONLY) == wan_placed


def _expect_usage_error(argv, capsys, flag):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("rcm: error:") and flag in err.splitlines()[0], err


@pytest.mark.parametrize("field", WAN_ONLY)
def test_digits_refuses_every_wan_flag(field, digits_files, tmp_path, capsys):
    value = VALUES.get(field, ["x"])
    _expect_usage_error(["sample", "--checkpoint", str(digits_files / "student.safetensors"), "--save-path",
                         str(tmp_path / "o.png"), _flag(field), *value], capsys, _flag(field))  # fmt: skip


@pytest.mark.parametrize("field", DIGITS_ONLY)
def test_wan_refuses_every_digits_flag(field, wan_files, tmp_path, capsys):
    _expect_usage_error([*_wan_argv(wan_files, tmp_path, "student"), _flag(field), *VALUES.get(field, ["x"])],
                        capsys, _flag(field))


def _wan_argv(files, tmp_path, name):
    return ["sample", "wan", "--dit-path", str(files / name), "--vae-path", str(files / "vae"), "--text-encoder-path",
            str(files / "umt5"), "--prompt", "a cat", "--num-frames", str(FRAMES), "--device", "cpu",
            "--save-path", str(tmp_path / "o.mp4")]  # fmt: skip


@pytest.mark.parametrize("app", ["digits", "wan"])
@pytest.mark.parametrize("field", sorted(TEACHER_ONLY))
def test_a_student_refuses_every_teacher_flag(app, field, digits_files, wan_files, tmp_path, capsys):
    if app == "digits":
        argv = ["sample", "--checkpoint", str(digits_files / "student.safetensors"), "--save-path", str(tmp_path / "o.png")]
    else:
        argv = [*_wan_argv(wan_files, tmp_path, "student.safetensors"), "--height", str(HEIGHT), "--width", str(WIDTH)]
    _expect_usage_error([*argv, _flag(field), TEACHER_ONLY[field]], capsys, f"{_flag(field)}: applies to a teacher")


@pytest.mark.parametrize("name, extra, flag", [
    ("student.safetensors", ["--steps", "5"], "--steps: must be in 1..4 for a student"),
    ("teacher", ["--steps", "10001"], "--steps: must be in 1..10,000 for a teacher"),
    ("student.safetensors", ["--negative-prompt", "blurry", "--height", str(HEIGHT), "--width", str(WIDTH)],
     "--negative-prompt: applies to a guided teacher"),
    ("teacher", ["--negative-prompt", "blurry", "--guidance", "1", "--height", str(HEIGHT), "--width", str(WIDTH)],
     "--negative-prompt: applies to a guided teacher"),
    ("student.safetensors", ["--resolution", "480p", "--height", str(HEIGHT), "--width", str(WIDTH)], "--resolution"),
    ("student.safetensors", ["--aspect-ratio", "1:1", "--height", str(HEIGHT), "--width", str(WIDTH)], "--aspect-ratio"),
    ("student.safetensors", ["--image", "{T}/i.png", "--height", str(HEIGHT), "--width", str(WIDTH)], "--image"),
])  # fmt: skip
def test_wan_flags_that_do_not_apply(name, extra, flag, wan_files, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    extra = [e.replace("{T}", str(tmp_path)) for e in extra]
    _expect_usage_error([*_wan_argv(wan_files, tmp_path, name), *extra], capsys, flag)


@pytest.mark.parametrize("suffix", [".png", ".npz"])
def test_digits_fps_without_a_video_is_an_error(suffix, digits_files, tmp_path, capsys):
    _expect_usage_error(["sample", "--checkpoint", str(digits_files / "teacher.safetensors"), "--save-path",
                         str(tmp_path / f"o{suffix}"), "--fps", "4"], capsys, "--fps: applies to a .gif or .mp4")


def test_help_shows_the_codes_guidance_defaults(capsys):
    from rcm.wan import presets as wan_presets

    with pytest.raises(SystemExit):
        cli.main(["sample", "digits", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("│ ", "")
    assert f"Wan {wan_presets.GUIDANCE:g}, digits {presets.TEACHER_GUIDANCE:g})" in text
    assert presets.TEACHER_GUIDANCE == 2.0


def test_wan_pipeline_takes_its_defaults_from_the_card(wan_files, tmp_path):
    import shutil

    from rcm.checkpoint.card import write_card

    plain, carded = tmp_path / "plain.safetensors", tmp_path / "carded.safetensors"
    for path in (plain, carded):
        shutil.copy(wan_files / "student.safetensors", path)
    write_card(carded, family="wan", teacher=None, method="rcm", iterations=1,
               sampling={"steps": 1, "sigma_max": 3.0, "mid_times": {}})  # fmt: skip
    load = lambda p: rcm.pipeline.load(p, vae_path=wan_files / "vae", text_encoder_path=wan_files / "umt5")  # noqa: E731
    size = dict(num_frames=5, height=HEIGHT, width=WIDTH)
    by_card = load(carded).generate("a cat", **size)
    assert torch.equal(by_card, load(plain).generate("a cat", steps=1, sigma_max=3.0, **size))
    assert not torch.equal(by_card, load(plain).generate("a cat", **size))  # 4 steps from 80: another video
    assert torch.equal(load(carded).generate("a cat", steps=4, sigma_max=80.0, **size), load(plain).generate("a cat", **size))


def test_digits_gif_plays_at_the_fps_asked_for(digits_files, tmp_path, capsys):
    """--fps is honoured, not capped at the clips' natural 8; a GIF past 50 fps (browsers slow delays under
    20 ms to 100 ms) is refused, naming --fps."""
    from PIL import Image

    gif = tmp_path / "o.gif"
    cli.main(["sample", "--checkpoint", str(digits_files / "teacher.safetensors"), "--save-path", str(gif),
              "--steps", "1", "--num-samples", "2", "--fps", "20", "--device", "cpu"])
    assert Image.open(gif).info["duration"] == 50  # ms per frame: 20 fps
    _expect_usage_error(["sample", "--checkpoint", str(digits_files / "teacher.safetensors"), "--save-path",
                         str(tmp_path / "fast.gif"), "--fps", "60"], capsys, "--fps: a GIF plays at most 50")


def test_wan_pipeline_keep_loaded_loads_once_and_gives_the_same_videos(wan_files, monkeypatch):
    """keep_loaded: the text encoder, VAE and DiT are loaded by the first generate only, and every call gives
    exactly the videos of a pipeline that loads and frees them each time."""
    import rcm.models
    import rcm.models.text_encoder
    import rcm.models.vae

    loads = {"text": 0, "vae": 0, "dit": 0}

    def counted(module, name, key, real_only=False):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            if not (real_only and str(kwargs.get("device")) == "meta"):  # the header check of __init__
                loads[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(rcm.models.text_encoder, "load_text_encoder", "text")
    counted(rcm.models.vae, "load_vae", "vae")
    counted(rcm.models, "load_wan_model", "dit", real_only=True)
    kwargs = dict(vae_path=wan_files / "vae", text_encoder_path=wan_files / "umt5")
    size = dict(steps=2, num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    held = rcm.pipeline.load(wan_files / "student.safetensors", keep_loaded=True, **kwargs)
    first, second = held.generate("a cat", seed=1, **size), held.generate("a dog", seed=2, **size)
    assert loads == {"text": 1, "vae": 1, "dit": 1}
    fresh = rcm.pipeline.load(wan_files / "student.safetensors", **kwargs)
    assert torch.equal(first, fresh.generate("a cat", seed=1, **size))
    assert torch.equal(second, fresh.generate("a dog", seed=2, **size))
    assert loads == {"text": 3, "vae": 3, "dit": 3}
