"""`rcm sample wan... --image` (rcm/wan/sample.py, rcm/wan/pipeline.py) on tiny random I2V models: Wan2.1
I2V-14B style (y + CLIP tokens), Wan2.2 TI2V-5B style (frame replacement with the Wan2.2 VAE) and a
two-expert I2V-A14B-style folder, sampled to MP4 through the CLI; the given frame kept exact; the experts
dispatched by time; the image fitted (cover + centre crop); one-line errors naming the flag."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from rcm import cli
from rcm.models import load_wan_model
from rcm.models.vae import load_vae
from rcm.models.wan_image import wan_image_condition
from rcm.wan.pipeline import read_image, sample_wan_latent
from tests.i2v_files import BOUNDARY, make_i2v_files

FRAMES, HEIGHT, WIDTH = 9, 32, 64  # Wan2.1 VAE: latent 3 x 4 x 8; Wan2.2 VAE: 3 x 2 x 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_i2v_files(tmp_path_factory.mktemp("i2v"))


def sample_args(files, dit, out, *extra, vae="vae"):
    return ["sample", "wan", "--dit-path", str(files / dit), "--vae-path", str(files / vae),
            "--text-encoder-path", str(files / "umt5"), "--prompt", "a digit rolling", "--num-frames", str(FRAMES),
            "--height", str(HEIGHT), "--width", str(WIDTH), "--device", "cpu", "--save-path", str(out), *extra]


def frames_of(path):
    return iio.imread(path, index=None)


def run_cli(args, capsys):
    """cli.main: the exit status (0 when it returned) and stderr."""
    try:
        cli.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("dit, extra", [
    ("i2v", ["--kind", "teacher", "--steps", "2", "--guidance", "3", "--sampler", "euler",
             "--image-encoder-path", "clip"]),
    ("i2v_student.safetensors", ["--steps", "2", "--image-encoder-path", "clip"]),
    ("experts", ["--steps", "3"]),
    ("experts_student", ["--steps", "4"]),
])  # fmt: skip
def test_i2v_and_two_expert_models_sample_to_mp4(files, tmp_path, capsys, dit, extra):
    extra = [str(files / e) if e == "clip" else e for e in extra]
    out = tmp_path / "out.mp4"
    code, err = run_cli(sample_args(files, dit, out, "--image", str(files / "first.png"), *extra), capsys)
    assert code == 0, err
    assert frames_of(out).shape == (FRAMES, HEIGHT, WIDTH, 3)


def test_ti2v_samples_with_and_without_an_image(files, tmp_path, capsys):
    for extra in (["--image", str(files / "first.png")], []):  # TI2V also does text-only
        out = tmp_path / f"ti2v{len(extra)}.mp4"
        code, err = run_cli(sample_args(files, "ti2v.safetensors", out, "--steps", "2", "--guidance", "1", *extra,
                                        vae="vae22"), capsys)
        assert code == 0, err
        assert frames_of(out).shape == (FRAMES, HEIGHT, WIDTH, 3)


def test_ti2v_given_frame_is_exact_in_every_sampler(files):
    """Frame replacement: the first latent frame of the output is the image's latent, bit for bit (fp32)."""
    dit = load_wan_model(files / "ti2v.safetensors")
    vae = load_vae(files / "vae22")
    image = read_image(files / "first.png", HEIGHT, WIDTH)
    condition = wan_image_condition(dit.config, vae, image, FRAMES)
    given = condition.latent[:, :, :1]
    assert given.abs().max() > 0
    assert torch.equal(given, vae.encode(image[:, :, None]))  # the image alone encodes to latent frame 0
    noise = torch.randn(1, 48, 3, HEIGHT // 16, WIDTH // 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 8, 32)
    for kwargs in (dict(kind="student", steps=3), dict(kind="teacher", steps=3, guidance=1.0),
                   dict(kind="teacher", steps=2, sampler="euler", guidance=2.0, negative_context=torch.zeros(1, 8, 32))):
        out = sample_wan_latent(dit, context, noise, generator=torch.Generator().manual_seed(1), condition=condition,
                                **kwargs)
        assert torch.equal(out[:, :, :1], given), kwargs
        assert (out[:, :, 1:] - noise[:, :, 1:]).abs().max() > 1e-3  # the rest is generated


def test_two_expert_student_steps_go_to_the_expert_of_their_time(files):
    """4 student steps at TrigFlow times (atan 80, 1.5, 1.4, 1.0): RF times .99, .934, .853, .609; with the
    boundary 0.9 the high-noise expert runs the first two, the low-noise one the last two."""
    experts = load_wan_model(files / "experts_student")
    assert experts.boundary == BOUNDARY
    calls = []
    experts.high_noise.register_forward_hook(lambda *a: calls.append("high"))
    experts.low_noise.register_forward_hook(lambda *a: calls.append("low"))
    vae = load_vae(files / "vae")
    condition = wan_image_condition(experts.config, vae, read_image(files / "first.png", HEIGHT, WIDTH), FRAMES)
    noise = torch.randn(1, 16, 3, HEIGHT // 8, WIDTH // 8)
    sample_wan_latent(experts, torch.randn(1, 8, 32), noise, kind="student", steps=4,
                      generator=torch.Generator().manual_seed(0), condition=condition)
    assert calls == ["high", "high", "low", "low"]


def test_image_is_scaled_to_cover_and_centre_cropped(tmp_path):
    """A 20 x 80 image (red left half, blue right half) into 32 x 32: scaled by 1.6 and its middle 20
    columns kept, so the output is half red, half blue; grey and RGBA images read as RGB."""
    pixels = np.zeros((20, 80, 3), np.uint8)
    pixels[:, :40, 0] = 255
    pixels[:, 40:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png", 32, 32)
    assert image.shape == (1, 3, 32, 32) and image.dtype == torch.float32
    assert torch.allclose(image[0, :, :, :14].mean((1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=1e-4)
    assert torch.allclose(image[0, :, :, 18:].mean((1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=1e-4)
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([pixels, np.full((20, 80), 255, np.uint8)])).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "grey.png", 16, 16).shape == (1, 3, 16, 16)
    assert torch.equal(read_image(tmp_path / "rgba.png", 32, 32), image)


@pytest.mark.parametrize("dit, extra, vae, message", [
    ("t2v.safetensors", ["--image", "first.png"], "vae", "--image: this DiT is text-to-video"),
    ("i2v", [], "vae", "--image: is required: this DiT is image-to-video"),
    ("i2v", ["--image", "first.png"], "vae", "--image-encoder-path: is required"),
    ("experts", ["--image", "first.png", "--image-encoder-path", "clip"], "vae", "--image-encoder-path: only Wan2.1"),
    ("experts", ["--image", "missing.png"], "vae", "--image: no such"),
    ("experts", ["--image", "not_an_image.png"], "vae", "--image: cannot read"),
    ("i2v", ["--image", "first.png", "--image-encoder-path", "umt5"], "vae", "--image-encoder-path:"),
])  # fmt: skip
def test_bad_image_arguments_are_one_line_exit_2(files, tmp_path, capsys, dit, extra, vae, message):
    (files / "not_an_image.png").write_text("this is text")
    extra = [str(files / e) if e.endswith((".png", "clip", "umt5")) else e for e in extra]
    code, err = run_cli(sample_args(files, dit, tmp_path / "x.mp4", *extra, vae=vae), capsys)
    assert code == 2 and err.startswith(f"rcm: error: {message}") and "\n" not in err, err
    assert not (tmp_path / "x.mp4").exists()


def test_named_two_expert_model_needs_the_expert_folder(files, tmp_path, capsys):
    args = sample_args(files, "i2v_student.safetensors", tmp_path / "x.mp4", "--image", str(files / "first.png"))
    args[1] = "wan2.2-i2v-a14b"
    code, err = run_cli(args, capsys)
    assert code == 2 and err.startswith("rcm: error: --dit-path: wan2.2-i2v-a14b is two experts"), err
