"""Every bad invocation of the CLI is one clear line and exit status 2 (issue 8, acceptance 3).

A table of bad arguments and bad files, run in-process through ``cli.main`` (fast): each must exit with
status 2 and print exactly one line, ``rcm: error: ...``, naming the problem (checked by a fragment),
never a traceback. A few run as real subprocesses, to show that nothing else reaches the terminal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcm import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Good and bad files: tiny digits models, a tiny Wan DiT, truncated / corrupt / wrong-layout /
    wrong-shape copies, placeholder VAE and umT5 files, and run folders in bad states."""
    from safetensors.torch import save_file

    from rcm.checkpoint import save_checkpoint
    from rcm.digits.model import build_model, model_metadata, save_model
    from rcm.models import save_dit
    from rcm.models.wan import WanDiT, wan_config

    d = tmp_path_factory.mktemp("files")
    digits = build_model("digits-dit-tiny")
    save_model(digits, d / "teacher.safetensors", {"kind": "teacher"})
    save_model(digits, d / "student.safetensors", {"kind": "student"})
    data = (d / "teacher.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "garbage.safetensors").write_bytes(b"\x00not a safetensors file" * 40)
    save_file({"foo": torch.zeros(3)}, str(d / "layout.safetensors"))  # no architecture, unknown keys
    meta = model_metadata(d / "teacher.safetensors")
    wider = json.dumps({**json.loads(meta["wan_config"]), "dim": 128, "ffn_dim": 256})
    save_file({k: v.contiguous() for k, v in digits.state_dict().items()}, str(d / "shapes.safetensors"),
              metadata={**meta, "wan_config": wider})  # the metadata promises a wider model than the tensors
    torch.save(digits.state_dict(), d / "teacher.pt")

    torch.manual_seed(0)
    dit = WanDiT(wan_config("wan-tiny"))
    save_dit(dit, d / "dit.safetensors")
    data = (d / "dit.safetensors").read_bytes()
    (d / "dit_truncated.safetensors").write_bytes(data[:-100])
    sd = {k: v.contiguous() for k, v in dit.state_dict().items()}
    sd["head.head.weight"] = torch.zeros(3, sd["head.head.weight"].shape[1])
    save_file(sd, str(d / "dit_shapes.safetensors"),
              metadata={"wan_config": json.dumps(dataclass_dict(dit.config))})  # fmt: skip
    torch.save({"decoder.weight": torch.zeros(1)}, d / "vae.pth")  # a readable header, never loaded
    (d / "empty.pth").write_bytes(b"")
    (d / "notes.txt").write_text("not weights")

    corrupt = d / "corrupt_run" / "checkpoints"
    save_checkpoint(corrupt, 1, {"config": {}}, keep=2)
    save_checkpoint(corrupt, 2, {"config": {}}, keep=2)
    for path in corrupt.glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:50])  # both truncated: nothing to fall back to
    save_checkpoint(d / "other_run" / "checkpoints", 3, {"config": {"fingerprint": "another run"}}, keep=2)
    (d / "finished_run").mkdir()
    save_model(digits, d / "finished_run" / "student_ema.safetensors", {"kind": "student"})
    return d


def dataclass_dict(config) -> dict:
    import dataclasses

    return dataclasses.asdict(config)


def _wan(*extra: str) -> list[str]:
    return ["sample", "wan", "--dit-path", "{F}/dit.safetensors", "--vae-path", "{F}/vae.pth",
            "--text-encoder-path", "{F}/empty.pth", "--prompt", "a cat", "--kind", "student",
            "--num-frames", "5", "--height", "32", "--width", "32", "--device", "cpu", *extra]  # fmt: skip


def _distill(*extra: str) -> list[str]:
    return ["distill", "--teacher", "{F}/teacher.safetensors", "--out-dir", "{T}/run", "--no-report",
            "--loop.iterations", "1", *extra]  # fmt: skip


def _digits(*extra: str) -> list[str]:
    return ["sample", "--save-path", "{T}/out.png", *extra]


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


CASES = [
    # the command line itself
    ("unknown command", ["nosuch"], "unknown command 'nosuch'"),
    ("group without subcommand", ["bench"], "a subcommand is needed; choose from attention, step, sample"),
    ("unknown subcommand", ["bench", "nosuch"], "unknown subcommand 'nosuch'"),
    ("unknown flag", ["distill", "--bogus"], "unrecognized arguments: --bogus"),
    ("flag without value", ["sample", "--steps"], "--steps"),
    ("not an integer", ["distill", "--batch-size", "abc"], "--batch-size"),
    ("unknown method", ["distill", "--method", "gan"], "invalid choice 'gan'"),
    # distill: paths
    ("distill teacher missing", _replace(_distill(), "--teacher", "{T}/nope.safetensors"), "--teacher: no file"),
    ("distill teacher is a folder", _replace(_distill(), "--teacher", "{F}"), "--teacher: no file"),
    ("distill teacher wrong layout", _replace(_distill(), "--teacher", "{F}/layout.safetensors"), "wan_config"),
    pytest.param("distill teacher truncated", _replace(_distill(), "--teacher", "{F}/truncated.safetensors"),
                 "truncated"),
    pytest.param("distill teacher corrupt", _replace(_distill(), "--teacher", "{F}/garbage.safetensors"),
                 "garbage.safetensors"),
    pytest.param("distill teacher not safetensors", _replace(_distill(), "--teacher", "{F}/teacher.pt"),
                 "teacher.pt"),
    pytest.param("distill teacher wrong shapes", _replace(_distill(), "--teacher", "{F}/shapes.safetensors"),
                 "shape"),
    ("distill out-dir is a file", _replace(_distill(), "--out-dir", "{F}/notes.txt"), "notes.txt"),
    ("distill resume from corrupt checkpoints", _replace(_distill(), "--out-dir", "{F}/corrupt_run"),
     "no readable checkpoint"),
    ("distill resume another run", _replace(_distill(), "--out-dir", "{F}/other_run"), "different settings"),
    ("distill no-resume over a run", _replace(_distill("--no-resume"), "--out-dir", "{F}/other_run"),
     "already holds a run"),
    # distill: values
    ("distill negative batch", _distill("--batch-size", "-3"), "--batch-size: must be >= 1, got -3"),
    ("distill negative iterations", _distill("--loop.iterations", "-1"), "--loop.iterations: must be >= 0, got -1"),
    ("distill checkpoint_every 0", _distill("--loop.checkpoint-every", "0"),
     "--loop.checkpoint-every: must be >= 1, got 0"),
    ("distill max_nonfinite 0", _distill("--loop.max-nonfinite-steps", "0"),
     "--loop.max-nonfinite-steps: must be >= 1, got 0"),
    pytest.param("distill log_every 0", _distill("--loop.log-every", "0", "--method", "scm", "--batch-size", "1"),
                 "--loop.log-every: must be >= 1"),
    ("distill negative lr", _distill("--student-optim.lr", "-1"), "--student-optim.lr: must be a positive number"),
    ("distill betas", _distill("--critic-optim.betas", "0.9", "1.5"), "--critic-optim.betas: must lie in [0, 1)"),
    ("distill negative guidance", _distill("--loss.scm.guidance", "-1"), "guidance"),
    ("distill zero rollout steps", _distill("--loss.dmd.max-simulation-steps", "0"), "max_simulation_steps"),
    ("distill student_update_freq 0", _distill("--loss.student-update-freq", "0"), "student_update_freq"),
    ("distill ema 0", _distill("--ema-sigma-rel", "0"), "--ema-sigma-rel: must be > 0"),
    ("distill threads", _distill("--threads", "-1"), "--threads"),
    ("distill unknown model", _distill("--model", "wan"), "invalid choice 'wan'"),
    # sample, digits
    ("digits checkpoint missing", _digits("--checkpoint", "{T}/nope.safetensors"), "--checkpoint: no such file"),
    ("digits checkpoint truncated", _digits("--checkpoint", "{F}/truncated.safetensors"), "(truncated)"),
    ("digits checkpoint corrupt", _digits("--checkpoint", "{F}/garbage.safetensors"), "--checkpoint: could not read"),
    ("digits checkpoint wrong layout", _digits("--checkpoint", "{F}/layout.safetensors", "--kind", "student"),
     "wan_config"),
    ("digits checkpoint wrong shapes", _digits("--checkpoint", "{F}/shapes.safetensors"), "shape"),
    ("digits checkpoint not safetensors", _digits("--checkpoint", "{F}/teacher.pt"), "must be a .safetensors"),
    ("digits checkpoint unknown kind", _digits("--checkpoint", "{F}/layout.safetensors"), "--kind"),
    ("student 0 steps", _digits("--checkpoint", "{F}/student.safetensors", "--steps", "0"), "--steps"),
    ("student 5 steps", _digits("--checkpoint", "{F}/student.safetensors", "--steps", "5"), "in 1..4 for a student, got 5"),
    ("sigma_max 0", _digits("--checkpoint", "{F}/student.safetensors", "--sigma-max", "0"), "--sigma-max"),
    ("sigma_max negative", _digits("--checkpoint", "{F}/teacher.safetensors", "--sigma-max", "-5"), "--sigma-max"),
    ("sigma_max nan", _digits("--checkpoint", "{F}/student.safetensors", "--sigma-max", "nan"), "--sigma-max"),
    ("negative guidance", _digits("--checkpoint", "{F}/teacher.safetensors", "--guidance", "-1"), "--guidance"),
    ("teacher 0 steps", _digits("--checkpoint", "{F}/teacher.safetensors", "--steps", "0"), "--steps: must be in 1..10,000 for a teacher, got 0"),
    ("shift 0", _digits("--checkpoint", "{F}/teacher.safetensors", "--shift", "0"), "--shift"),
    ("label 11", _digits("--checkpoint", "{F}/student.safetensors", "--labels", "11"), "--labels"),
    ("digits save path", ["sample", "--checkpoint", "{F}/student.safetensors", "--save-path", "{T}/x.txt"],
     "--save-path"),
    ("digits with a prompt", _digits("--checkpoint", "{F}/student.safetensors", "--prompt", "a cat"),
     "unrecognized arguments: --prompt"),  # a Wan option: `rcm sample wan...`
    ("digits with an unknown device", ["sample", "--device", "tpu"], "invalid choice 'tpu'"),  # digits: auto|cpu|cuda
    ("unknown device", _wan("--device", "tpu"), "invalid choice 'tpu'"),
    ("unknown sampler", ["sample", "--sampler", "ddim"], "invalid choice 'ddim'"),
    # sample, Wan
    ("wan without dit", ["sample", "wan", "--prompt", "x"], "--dit-path: is required"),
    ("wan dit missing", _replace(_wan(), "--dit-path", "{T}/nope.safetensors"), "--dit-path: no such file"),
    ("wan vae missing", _replace(_wan(), "--vae-path", "{T}/nope.pth"), "--vae-path: no such file"),
    ("wan umt5 missing", _replace(_wan(), "--text-encoder-path", "{T}/nope.pth"), "--text-encoder-path: no such"),
    ("wan tokenizer missing", _wan("--tokenizer-path", "{T}/nope"), "--tokenizer-path: no such"),
    ("wan no prompt", _replace(_wan(), "--prompt", " "), "--prompt: is required"),
    ("wan frames not 1+4k", _replace(_wan(), "--num-frames", "80"), "--num-frames: must be 1 + 4k"),
    ("wan zero frames", _replace(_wan(), "--num-frames", "0"), "--num-frames"),
    ("wan resolution", _wan("--resolution", "1080p"), "invalid choice '1080p'"),
    ("wan aspect ratio", _wan("--aspect-ratio", "4:3"), "invalid choice '4:3'"),
    ("wan height not a multiple", _replace(_wan(), "--height", "100"), "--height: must be a positive multiple"),
    ("wan height alone", ["sample", "wan", "--dit-path", "{F}/dit.safetensors", "--vae-path",
                          "{F}/vae.pth", "--text-encoder-path", "{F}/empty.pth", "--prompt", "x", "--height", "480"],
     "give both --height and --width"),
    ("wan student 5 steps", _wan("--steps", "5"), "--steps"),
    ("wan negative seed", _wan("--seed", "-1"), "--seed"),
    ("wan vae chunk 0", _wan("--vae-chunk-size", "0"), "--vae-chunk-size"),
    ("wan save path", _wan("--save-path", "{T}/x.png"), "--save-path: must end in .mp4, .gif"),
    ("wan dit truncated", _replace(_wan(), "--dit-path", "{F}/dit_truncated.safetensors"), "(truncated)"),
    ("wan dit not weights", _replace(_wan(), "--dit-path", "{F}/notes.txt"), "not a checkpoint file"),
    ("wan dit wrong layout", _replace(_wan(), "--dit-path", "{F}/layout.safetensors"), "not a Wan2.1 DiT"),
    ("wan dit wrong shapes", _replace(_wan(), "--dit-path", "{F}/dit_shapes.safetensors"), "shape mismatches"),
    ("wan dit another model", ["sample", "wan2.1-t2v-1.3b", *_wan()[2:]], "does not match the model"),
    ("wan dit truncated, kind auto", _replace(_replace(_wan(), "--dit-path", "{F}/dit_truncated.safetensors"),
                                              "--kind", "auto"), "--dit-path: could not read"),
    ("wan vae corrupt", _replace(_wan(), "--vae-path", "{F}/empty.pth"), "--vae-path: could not read"),
    ("wan umt5 corrupt", _wan(), "--text-encoder-path: could not read"),
    # eval, train-teacher, train-classifier, bench
    ("eval run missing", ["eval", "--runs", "{T}/nope"], "--runs"),
    ("eval teacher missing", ["eval", "--runs", "{F}/finished_run", "--teacher", "{T}/nope.safetensors"],
     "--teacher: no file"),
    ("teacher model", ["train-teacher", "--model", "foo", "--out-dir", "{T}/t"], "unknown demo model 'foo'"),
    ("teacher negative steps", ["train-teacher", "--steps", "-1", "--out-dir", "{T}/t"], "--steps: must be >= 0"),
    ("teacher clip frames", ["train-teacher", "--spec.frames", "0", "--out-dir", "{T}/t"], "--spec.frames: must be >= 1"),
    ("teacher dropout", ["train-teacher", "--label-dropout", "1.5", "--out-dir", "{T}/t"], "--label-dropout"),
    pytest.param("classifier batch 0", ["train-classifier", "--batch-size", "0", "--steps", "1", "--out", "{T}/c.pt"],
                 "batch"),
    ("bench dtype", ["bench", "attention", "--dtype", "fp64"], "invalid choice 'fp64'"),
    ("bench shapes", ["bench", "attention", "--shapes", "1,2,3"], "--shapes: '1,2,3' is not B,H,L,D"),
]
if torch.cuda.is_available():
    CASES = [c for c in CASES if "cuda" not in str(c)]
else:
    CASES.append(("wan cuda without a GPU", _replace(_wan(), "--device", "cuda"),
                  "--device: cuda was asked for but no CUDA device"))


def _ids(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def _fill(argv: list[str], files: Path, tmp_path: Path) -> list[str]:
    return [a.replace("{F}", str(files)).replace("{T}", str(tmp_path)) for a in argv]


def _check_one_line(err: str, fragment: str | tuple[str, ...]) -> None:
    """One line `rcm: error: ...` holding `fragment` (or one of several, where a message may be reworded)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("rcm: error: "), lines[0]
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert any(f in lines[0] for f in fragments), f"{fragment!r} not in {lines[0]!r}"


def test_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name, argv, fragment", CASES, ids=[_ids(c) for c in CASES])
def test_bad_invocation(name, argv, fragment, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_fill(argv, files, tmp_path))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    _check_one_line(err, fragment)


def test_debug_shows_the_exception(files, tmp_path):
    from rcm import PathArgumentError

    with pytest.raises(PathArgumentError, match="checkpoint"):
        cli.main(["sample", "--checkpoint", str(tmp_path / "nope.safetensors"), "--debug"])


def test_help_is_not_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--help"])  # the models to distill
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "digits" in out and "wan2.1-t2v-14b" in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "digits", "--help"])  # the digits demo's options
    assert exit_info.value.code == 0 and "--batch-size" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "--checkpoint", "{F}/truncated.safetensors", "--save-path", "{T}/x.png"], "(truncated)"),
    (["distill", "--teacher", "{F}/teacher.safetensors", "--out-dir", "{F}/corrupt_run", "--no-report"],
     "no readable checkpoint"),
    (["distill", "--loop.iterations", "-5"], "--loop.iterations: must be >= 0, got -5"),
], ids=["truncated checkpoint", "corrupt resume", "parse error"])  # fmt: skip
def test_real_process_prints_one_line(argv, fragment, files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rcm", *_fill(argv, files, tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    _check_one_line(proc.stderr, fragment)
    assert proc.stdout == ""


def test_a_finished_command_releases_the_process_group(tmp_path):
    """Under torchrun a command's process group is destroyed when it succeeds (left to interpreter
    shutdown, gloo's threads can abort a finished run) and kept when it fails (a peer may still be in a
    collective)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit):
            cli.main(["sample", "--save-path", str(tmp_path / "out.txt")])  # unsupported suffix
        assert dist.is_initialized()
        cli.main(["sample", "--save-path", str(tmp_path / "out.png"), "--steps", "2", "--num-samples", "1"])
        assert (tmp_path / "out.png").is_file() and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
