"""`rcm distill wan...` end to end on a tiny random Wan (acceptance 1 and 3 of issue 6): synth → distill →
stop → resume bit-identically → export → `rcm sample` writes an MP4; every §5.1 default in --help."""

import json
import re

import imageio.v3 as iio
import pytest
import torch
from safetensors.torch import load_file

from rcm import cli
from rcm.wan.config import WAN_DISTILL_PRESETS, wan_defaults_table
from tests.test_synth import make_wan_files, synth_args


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    files = make_wan_files(root / "files")
    cli.main(synth_args(files, root / "data"))
    return files, root / "data"


def distill_args(files, data, out, iterations, *extra):
    return ["distill", "wan", "--teacher", str(files / "teacher.safetensors"), "--data", str(data), "--out-dir",
            str(out), "--loop.iterations", str(iterations), "--loop.checkpoint-every", "2", "--loop.log-every", "1",
            "--loss.scm.tangent-warmup", "1", "--loss.student-update-freq", "2", "--sample-every", "2",
            "--num-sample-prompts", "1", "--sample-steps", "1", "2", "--device", "cpu", "--threads", "1", *extra]


def _logs(run):
    drop = ("seconds", "seconds_per_iteration")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "log.jsonl").read_text().splitlines()]


def test_distill_resumes_exactly_exports_and_samples(wan, tmp_path):
    files, data = wan
    cli.main(distill_args(files, data, tmp_path / "straight", 5, "--vae-path", str(files / "vae")))
    cli.main(distill_args(files, data, tmp_path / "stopped", 3))  # a run that stopped after iteration 3 ...
    cli.main(distill_args(files, data, tmp_path / "stopped", 5))  # ... resumed from its last checkpoint
    a, b = tmp_path / "straight", tmp_path / "stopped"
    logs = _logs(a)
    assert [e["phase"] for e in logs] == ["student", "student", "critic", "student", "critic"]
    assert "loss_dmd" in logs[1] and "loss_critic" in logs[2] and all("seconds_per_iteration" in json.loads(x)
                                                                      for x in (a / "log.jsonl").read_text().splitlines())
    assert logs == _logs(b)
    sa, sb = load_file(a / "student_ema.safetensors"), load_file(b / "student_ema.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    teacher = load_file(files / "teacher.safetensors")
    assert all(sa[k].dtype == torch.bfloat16 for k in sa)
    assert any(not torch.equal(sa[k], teacher[k].to(torch.bfloat16)) for k in sa)  # it trained
    # periodic samples: latents at iterations 2, 4 and the end, MP4s with the VAE
    samples = a / "samples"
    for k in (2, 4, 5):
        latents = load_file(samples / f"iter_{k:08d}.safetensors")
        assert set(latents) == {"1step", "2step"} and latents["1step"].shape == (1, 16, 2, 2, 2)
        for n in (1, 2):
            frames = iio.imread(samples / f"iter_{k:08d}_{n}step_0.mp4", index=None, plugin="FFMPEG")
            assert frames.shape == (5, 16, 16, 3)
    assert not list(b.glob("samples/*.mp4"))  # no VAE: latents only
    # TensorBoard (a default sink): each video's middle frame as an image at each sampling iteration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(a / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"samples/1step_0", "samples/2step_0"}
    assert [(i.step, i.width, i.height) for i in events.Images("samples/2step_0")] == [(k, 16, 16) for k in (2, 4, 5)]
    assert "loss/dmd" in events.Tags()["scalars"]
    # the export samples with `rcm sample`, found to be a student from its metadata
    out = tmp_path / "video.mp4"
    cli.main(["sample", "wan", "--dit-path", str(a / "student_ema.safetensors"), "--vae-path",
              str(files / "vae"), "--text-encoder-path", str(files / "umt5"), "--prompt", "a cat", "--steps", "2",
              "--num-frames", "9", "--height", "16", "--width", "32", "--device", "cpu", "--save-path", str(out)])
    frames = iio.imread(out, index=None, plugin="FFMPEG")
    assert frames.shape == (9, 16, 32, 3) and frames.std() > 0
    # its model card: the teacher, the run, the sampler settings of its samples; the pipeline's defaults
    import rcm.pipeline

    card = json.loads((a / "student_ema.card.json").read_text())
    assert card["family"] == "wan" and card["method"] == "rcm" and card["iterations"] == 5
    assert card["teacher"] == str(files / "teacher.safetensors") and card["metrics"] == {}
    assert card["sampling"]["steps"] == 2 and card["sampling"]["evaluated_steps"] == [1, 2]
    assert card["sampling"]["mid_times"]["4"] == [1.5, 1.4, 1.0]
    pipe = rcm.pipeline.load(a / "student_ema.safetensors", vae_path=files / "vae", text_encoder_path=files / "umt5")
    assert pipe.kind == "student" and pipe.sampling() == (2, card["sampling"]["sigma_max"])


def test_help_shows_every_reference_default_for_each_size(capsys):
    """docs/method.md §5.1, each value as the help prints it (the table is rendered from the presets)."""
    expected = {
        "wan2.1-t2v-1.3b": ["2e-06 / 4e-07", "(0, 0.999), 0.01, 1e-08", "100 steps", "100 / 1",
                            "LogNormal(0.7, 1.6) / UniformShift(5)", "5 / 5", "| 1000 |", "| 5 |", "| 4 |", "| 20 |",
                            "| 80 |", "sigma_rel 0.1", "100,000, 500", "4 / 1", "off"],
        "wan2.1-t2v-14b": ["1e-06 / 1e-07", "(0, 0.999), 0.01, 1e-08", "100 steps", "100 / 1",
                           "LogNormal(1.5, 1.6) / UniformShift(5)", "5 / 5", "| 0 |", "| 10 |", "| 4 |", "| 21 |",
                           "| 200 |", "sigma_rel 0.1", "100,000, 250", "32 / 8", "off"],
    }
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows[0] == "| | wan2.1-t2v-1.3b | wan2.1-t2v-14b |"
    for column, (size, values) in enumerate(expected.items(), start=1):
        cells = " ".join("| " + line.strip("|").split("|")[column].strip() + " |" for line in rows[2:])
        for value in values:
            assert value.strip("| ") in cells, (size, value)
    # each size's own help prints its defaults as the values it runs with
    for size, flags in {"wan2.1-t2v-1.3b": {"--loop.checkpoint-every": "500", "--sigma-max": "80.0",
                                             "--max-latent-frames": "20", "--loss.student-update-freq": "5",
                                             "--loss.scm.tangent-warmup": "1000"},
                        "wan2.1-t2v-14b": {"--loop.checkpoint-every": "250", "--sigma-max": "200.0",
                                            "--max-latent-frames": "21", "--loss.student-update-freq": "10",
                                            "--loss.scm.tangent-warmup": "0"}}.items():
        with pytest.raises(SystemExit):
            cli.main(["distill", size, "--help"])
        text = " ".join(capsys.readouterr().out.replace("│", " ").split())
        for flag, value in flags.items():
            assert re.search(re.escape(flag) + r" \S+ .*?\(default: " + re.escape(value) + r"\)", text), (size, flag)
    assert WAN_DISTILL_PRESETS["wan2.1-t2v-14b"].student_optim.lr == 1e-6  # the table and the runs share presets
    assert wan_defaults_table() in open("docs/distill_wan.md").read()  # the docs' table is the generated one


def test_no_arguments_is_still_the_digits_demo():
    from rcm.digits.task import DigitsDistillConfig, distill_digits

    cfg, run = cli._parse_group(cli._commands()["distill"], ["--method", "scm", "--batch-size", "4"], "rcm distill")
    assert isinstance(cfg, DigitsDistillConfig) and run is distill_digits
    assert cfg.method == "scm" and cfg.batch_size == 4
    assert '"wan"' not in cfg.fingerprint()


@pytest.mark.parametrize("argv, fragment", [
    (lambda f, d, t: ["distill", "wan2.1-t2v-1.3b", "--teacher", str(f / "teacher.safetensors"), "--data", str(d)],
     "--teacher: not a wan2.1-t2v-1.3b checkpoint"),
    (lambda f, d, t: ["distill", "wan", "--teacher", str(f / "teacher.safetensors")], "--data: is required"),
    (lambda f, d, t: ["distill", "wan", "--teacher", str(f / "teacher.safetensors"), "--data", str(t)],
     "no index.json"),
    (lambda f, d, t: ["distill", "--batch-size", "3", "wan", "--teacher", str(f / "teacher.safetensors"), "--data",
                      str(d)], "unrecognized arguments: wan"),  # digits options, then a model name
    (lambda f, d, t: ["distill", "wan", "--teacher", str(t / "nope.safetensors"), "--data", str(d)],
     "--teacher: no such file"),
])  # fmt: skip
def test_bad_input_is_one_line_exit_2(wan, tmp_path, capsys, argv, fragment):
    files, data = wan
    with pytest.raises(SystemExit) as e:
        cli.main(argv(files, data, tmp_path))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_compiled_run_matches_eager(wan, tmp_path):
    """--compile (inductor, each block) gives the eager run's losses; resuming may switch it on or off."""
    files, data = wan
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs cached by an earlier test of the same shapes would not count as new
    cli.main(distill_args(files, data, tmp_path / "eager", 3))
    graphs = counters["stats"]["unique_graphs"]
    cli.main(distill_args(files, data, tmp_path / "compiled", 3, "--compile"))
    assert counters["stats"]["unique_graphs"] > graphs  # the blocks really ran compiled
    eager, compiled = _logs(tmp_path / "eager"), _logs(tmp_path / "compiled")
    assert [e["phase"] for e in compiled] == ["student", "student", "critic"]
    for e, c in zip(eager, compiled):
        for key in (k for k in e if k.startswith("loss_")):
            assert c[key] == pytest.approx(e[key], rel=1e-4), key


def _torchrun(args, timeout=300):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "cli.py"), *args]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_torchrun_cp2_matches_one_process_and_its_dcp_checkpoint_exports_and_samples(wan, tmp_path):
    """2 processes with context parallelism (CP=2: both ranks see the same sample), the models built on the
    meta device and filled from rank 0, train like one process and resume exactly; the DCP checkpoint they
    write exports in one process (`rcm export`) and samples."""
    files, data = wan
    _torchrun(distill_args(files, data, tmp_path / "cp2", 3, "--parallel.cp", "2"))
    cli.main(distill_args(files, data, tmp_path / "one", 3))
    cp2, one = _logs(tmp_path / "cp2"), _logs(tmp_path / "one")
    assert [e["phase"] for e in cp2] == ["student", "student", "critic"]
    for a, b in zip(cp2, one):
        for key in (k for k in b if k.startswith("loss_")):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key  # fp32: CP changes the order of sums
    assert (tmp_path / "cp2/checkpoints/step_00000003/.metadata").is_file()  # DCP, written by 2 ranks
    _torchrun(distill_args(files, data, tmp_path / "cp2_resumed", 2, "--parallel.cp", "2"))  # stopped after 2 ...
    _torchrun(distill_args(files, data, tmp_path / "cp2_resumed", 3, "--parallel.cp", "2"))  # ... and resumed
    assert _logs(tmp_path / "cp2_resumed") == cp2

    exported = {}
    for name in ("cp2", "one"):  # a DCP folder and a single-process checkpoint: the same command
        out = tmp_path / f"{name}.safetensors"
        cli.main(["export", "--checkpoint", str(tmp_path / name / "checkpoints"), "--out", str(out),
                  "--dtype", "float32"])
        exported[name] = load_file(out)
    assert exported["cp2"].keys() == exported["one"].keys()
    for k, v in exported["one"].items():
        torch.testing.assert_close(exported["cp2"][k], v, rtol=1e-4, atol=1e-6)
    video = tmp_path / "cp2.mp4"
    cli.main(["sample", "wan", "--dit-path", str(tmp_path / "cp2.safetensors"), "--vae-path",
              str(files / "vae"), "--text-encoder-path", str(files / "umt5"), "--prompt", "a cat", "--steps", "2",
              "--num-frames", "5", "--height", "16", "--width", "32", "--device", "cpu", "--save-path", str(video)])
    assert iio.imread(video, index=None, plugin="FFMPEG").shape == (5, 16, 32, 3)


def test_export_errors(tmp_path, capsys):
    for argv, fragment in (
        (["export", "--checkpoint", str(tmp_path / "missing")], "no such file"),
        (["export", "--checkpoint", str(tmp_path)], "no complete checkpoint"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err
