"""More bad invocations (issue 17): every setting checked before work starts, impossible sizes, seeds,
flags that do not apply, damaged files, raw system errors.

Each case runs in-process through ``cli.main`` from an empty working directory and must exit with status
2, print exactly one line ``rcm: error: ...`` naming the flag or file (a fragment is checked), no
traceback, and create nothing outside a run folder: the working directory stays empty, the shared input
files stay as they were, and the test's own folder gains nothing but run folders (``{T}/run...``).
With ``tests/test_cli_errors.py`` the suite holds at least 170 such invocations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rcm import cli
from test_cli_errors import CASES as FIRST_CASES, _check_one_line, files  # noqa: F401 (a fixture)

BIG = str(10**12)
HUGE = str(2**62)


@pytest.fixture(scope="module")
def more(files, tmp_path_factory) -> Path:
    """Damaged inputs: integer-dtype weights, broken run-folder config.json files, non-UTF-8 prompt files,
    files that are not a benchmark's JSON, a folder named like a weights file."""
    from safetensors.torch import save_file

    from rcm.models import open_state_dict

    d = tmp_path_factory.mktemp("more")
    for name, source in (("int_teacher", "teacher"), ("int_dit", "dit")):
        weights = open_state_dict(files / f"{source}.safetensors")
        save_file({k: torch.ones(v.shape, dtype=torch.int64) for k, v in weights.items()},
                  str(d / f"{name}.safetensors"), metadata=weights.metadata)  # fmt: skip
    for name, text in (("bad_json", b"{not json"), ("list_json", b"[1, 2]"), ("latin1_json", b'{"method": "r\xe9m"}'),
                       ("method_int", b'{"method": 3}')):  # fmt: skip
        run = d / name
        run.mkdir()
        (run / "student_ema.safetensors").write_bytes((files / "finished_run" / "student_ema.safetensors").read_bytes())
        (run / "config.json").write_bytes(text)
    (d / "latin1.txt").write_bytes("un caf\xe9 qui fume\n".encode("latin-1"))
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (d / "list.json").write_text("[]")
    (d / "folder.safetensors").mkdir()
    return d


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _distill(*extra: str) -> list[str]:
    return ["distill", "--teacher", "{F}/teacher.safetensors", "--out-dir", "{T}/run", "--no-report",
            "--loop.iterations", "1", *extra]  # fmt: skip


def _report(*extra: str) -> list[str]:  # the report settings are checked when the command starts
    return ["distill", "--teacher", "{F}/teacher.safetensors", "--out-dir", "{T}/run", "--loop.iterations", "1",
            *extra]  # fmt: skip


def _i2v(*extra: str) -> list[str]:
    return ["distill", "digits-i2v", "--out-dir", "{T}/run", "--loop.iterations", "1", *extra]


def _teacher(*extra: str) -> list[str]:
    return ["train-teacher", "--out-dir", "{T}/run_teacher", "--steps", "1", "--model", "digits-dit-tiny", *extra]


def _classifier(*extra: str) -> list[str]:
    return ["train-classifier", "--out", "{T}/c.safetensors", "--steps", "1", *extra]


def _i2v_teacher(*extra: str) -> list[str]:
    return ["train-i2v-teacher", "--out", "{T}/i2v.safetensors", "--steps", "1", *extra]


def _sample(kind: str, *extra: str) -> list[str]:
    return ["sample", "--checkpoint", f"{{F}}/{kind}.safetensors", "--save-path", "{T}/o.png", *extra]


def _wan(kind: str, *extra: str) -> list[str]:
    return ["sample", "wan", "--dit-path", "{F}/dit.safetensors", "--vae-path", "{F}/vae.pth",
            "--text-encoder-path", "{F}/empty.pth", "--prompt", "a cat", "--kind", kind, "--num-frames", "5",
            "--height", "32", "--width", "32", "--device", "cpu", "--save-path", "{T}/o.mp4", *extra]  # fmt: skip


def _synth(*extra: str) -> list[str]:
    return ["synth", "--out-dir", "{T}/run_data", "--prompts", "{F}/notes.txt", "--teacher", "{F}/dit.safetensors",
            "--text-encoder-path", "{F}/empty.pth", "--num-frames", "5", "--height", "32", "--width", "32",
            "--device", "cpu", *extra]  # fmt: skip


def _step(*extra: str) -> list[str]:
    return ["bench", "step", "--model", "wan-tiny", "--device", "cpu", "--num-frames", "5", "--height", "32",
            "--width", "32", *extra]  # fmt: skip


def _bench_sample(*extra: str) -> list[str]:
    return ["bench", "sample", "--model", "wan-tiny", "--device", "cpu", "--num-frames", "5", "--height", "32",
            "--width", "32", *extra]  # fmt: skip


def _eval(*extra: str) -> list[str]:
    return ["eval", "--runs", "{F}/finished_run", "--out-dir", "{T}/run_eval", *extra]


CASES = [
    # seeds: negative, or past torch's 2^64 (and the 2^62 headroom for offsets)
    ("distill seed 2^63", _distill("--loop.seed", str(2**63)), "--loop.seed: must be an integer in 0..2^62"),
    ("distill seed -1", _distill("--loop.seed", "-1"), "--loop.seed"),
    ("sample seed 2^64", _sample("teacher", "--seed", str(2**64)), "--seed: must be an integer in 0..2^62"),
    ("sample seed 2^63", _sample("student", "--seed", str(2**63)), "--seed"),
    ("sample seed -5", _sample("student", "--seed", "-5"), "--seed"),
    ("teacher seed -1", _teacher("--seed", "-1"), "--seed"),
    ("teacher seed 2^63", _teacher("--seed", str(2**63)), "--seed"),
    ("classifier seed -1", _classifier("--seed", "-1"), "--seed"),
    ("study seed 2^63", ["study", "--seed", str(2**63)], "--seed"),
    ("i2v teacher seed -1", _i2v_teacher("--seed", "-1"), "--seed"),
    ("synth seed -1", _synth("--seed", "-1"), "--seed"),
    ("bench step seed -1", _step("--seed", "-1"), "--seed"),
    ("bench sample seed 2^63", _bench_sample("--seed", str(2**63)), "--seed"),
    ("eval report seed -1", _eval("--report-settings.seed", "-1"), "--report-settings.seed"),
    ("distill report seed -1", _report("--report-settings.seed", "-1"), "--report-settings.seed"),
    ("i2v report seed -1", _i2v("--i2v-report.seed", "-1"), "--i2v-report.seed"),
    # impossible sizes: refused before any allocation, naming the flag
    ("distill batch 10^12", _distill("--batch-size", BIG), "--batch-size: must be in 1.."),
    ("distill batch 2^30", _distill("--batch-size", str(2**30)), ("--batch-size:", "memory")),
    ("distill batch 2^62", _distill("--batch-size", HUGE), "--batch-size"),
    ("distill iterations 2^62", _distill("--loop.iterations", HUGE), "--loop.iterations: must be in 0..1,000,000,000"),
    ("distill iterations 10^21", _distill("--loop.iterations", str(10**21)), "--loop.iterations"),
    ("distill checkpoint_every 2^62", _distill("--loop.checkpoint-every", HUGE), "--loop.checkpoint-every"),
    ("report num_per_class 10^12", _report("--report-settings.num-per-class", BIG), "--report-settings.num-per-class"),
    ("report num_real 10^13", _report("--report-settings.num-real", str(10**13)), "--report-settings.num-real"),
    ("report teacher steps 2^62", _report("--report-settings.teacher-steps", HUGE), "--report-settings.teacher-steps"),
    ("sample num_samples 10^12", _sample("teacher", "--num-samples", BIG), "--num-samples"),
    ("sample num_samples 2^30", _sample("student", "--num-samples", str(2**30)), ("--num-samples:", "memory")),
    ("sample teacher steps 2^62", _sample("teacher", "--steps", HUGE), "--steps: must be in 1..10,000"),
    ("sample fps 10^9", _sample("student", "--fps", str(10**9)), "--fps"),
    ("sample labels vs num_samples", _sample("student", "--labels", "1", "2", "--num-samples", "3"), "--num-samples"),
    ("teacher batch 10^12", _teacher("--batch-size", BIG), "--batch-size"),
    ("teacher batch 2^30", _teacher("--batch-size", str(2**30)), ("--batch-size:", "memory")),
    ("teacher steps 2^62", _teacher("--steps", HUGE), "--steps: must be in 0..1,000,000,000"),
    ("teacher canvas 10^6", _teacher("--spec.size", str(10**6)), "--spec.size"),
    ("teacher frames 10^7", _teacher("--spec.frames", str(10**7)), "--spec.frames"),
    ("classifier batch 10^12", _classifier("--batch-size", BIG), "--batch-size"),
    ("classifier num_test 10^12", _classifier("--num-test", BIG), "--num-test"),
    ("classifier steps 2^62", _classifier("--steps", HUGE), "--steps"),
    ("study batch 10^12", ["study", "--batch-size", BIG], "--batch-size"),
    ("study snapshots 2^62", ["study", "--snapshots", "10", HUGE], "--snapshots"),
    ("study num_per_class 10^12", ["study", "--num-per-class", BIG], "--num-per-class"),
    ("study num_per_class 1", ["study", "--num-per-class", "1"], "--num-per-class: must be >= 2"),
    ("sample save path is a folder", _sample("teacher", "--steps", "1", "--save-path", "{T}"), "is a folder"),
    ("i2v teacher batch 10^12", _i2v_teacher("--batch-size", BIG), "--batch-size"),
    ("i2v teacher steps 2^62", _i2v_teacher("--steps", HUGE), "--steps"),
    ("i2v report clips 10^12", _i2v("--i2v-report.num-clips", BIG), "--i2v-report.num-clips"),
    ("bench step batch 10^12", _step("--batch-size", BIG), "--batch-size"),
    ("bench step 16M pixels high", _replace(_replace(_step(), "--height", "16000000"), "--width", "16000000"),
     ("--height:", "memory")),
    ("bench step frames", _replace(_step(), "--num-frames", "4000001"), "--num-frames"),
    ("bench step repeats 10^9", _step("--repeats", str(10**9)), "--repeats"),
    ("bench sample 16M pixels", _replace(_replace(_bench_sample(), "--height", "16000000"), "--width", "16000000"),
     "--height"),
    ("bench sample teacher steps 2^62", _bench_sample("--teacher-steps", HUGE), "--teacher-steps"),
    ("bench attention huge shape", ["bench", "attention", "--shapes", "1000,1000,1000000,128"], ("--shapes:", "memory")),
    ("wan 160k pixels high", _replace(_replace(_wan("student"), "--height", "160000"), "--width", "160000"),
     ("--height:", "memory")),
    ("wan num_samples 10^12", _wan("student", "--num-samples", BIG), "--num-samples"),
    ("wan num_samples 0", _wan("student", "--num-samples", "0"), "--num-samples"),
    ("synth batch 10^12", _synth("--batch-size", BIG), "--batch-size"),
    ("synth steps 2^62", _synth("--steps", HUGE), "--steps"),
    ("synth 1.6M pixels high", _replace(_replace(_synth(), "--height", "1600000"), "--width", "1600000"), "--height"),
    ("distill threads 10^5", _distill("--threads", "100000"), "--threads"),
    ("teacher threads 10^5", _teacher("--threads", "100000"), "--threads"),
    ("study threads 10^6", ["study", "--threads", str(10**6)], "--threads"),
    ("synth threads 10^6", _synth("--threads", str(10**6)), "--threads"),
    # settings checked when the command starts, not after training
    ("report num_real -5", _report("--report-settings.num-real", "-5"), "--report-settings.num-real: must be >= 20"),
    ("report 5 student steps, no mid-times", _report("--report-settings.student-steps", "5"),
     "--report-settings.student-steps"),
    ("report too few mid-times", _report("--report-settings.student-steps", "4", "--report-settings.mid-times", "1.0"),
     "--report-settings.mid-times"),
    ("report mid-time past pi/2", _report("--report-settings.mid-times", "2.0", "1.0", "0.5"),
     "--report-settings.mid-times"),
    ("report sigma_max 0", _report("--report-settings.sigma-max", "0"), "--report-settings.sigma-max"),
    ("report num_per_class 0", _report("--report-settings.num-per-class", "0"), "--report-settings.num-per-class"),
    ("report num_per_class 1", _report("--report-settings.num-per-class", "1"),
     "--report-settings.num-per-class: must be >= 2"),  # diversity needs two clips of a digit: refused up front
    ("report teacher steps 0", _report("--report-settings.teacher-steps", "0"), "--report-settings.teacher-steps"),
    ("teacher warmup -1", _teacher("--warmup", "-1"), "--warmup: must be >= 0, got -1"),
    ("teacher lr -1", _teacher("--lr", "-1"), "--lr"),
    ("teacher lr nan", _teacher("--lr", "nan"), "--lr"),
    ("teacher min_lr_ratio 2", _teacher("--min-lr-ratio", "2"), "--min-lr-ratio"),
    ("teacher weight decay -1", _teacher("--weight-decay", "-1"), "--weight-decay"),
    ("teacher betas 1.0", _teacher("--betas", "0.9", "1.0"), "--betas"),
    ("teacher grad clip 0", _teacher("--grad-clip", "0"), "--grad-clip"),
    ("teacher ema decay 1", _teacher("--ema-decay", "1"), "--ema-decay"),
    ("teacher rho_std 0", _teacher("--rho-std", "0"), "--rho-std"),
    ("teacher keep 0", _teacher("--keep-checkpoints", "0"), "--keep-checkpoints"),
    ("teacher export suffix", _teacher("--export", "{T}/t.pt"), "--export"),
    ("teacher speeds", _teacher("--spec.min-speed", "2"), "--spec.min-speed"),
    ("teacher unknown model", _replace(_teacher(), "--model", "nope"), "--model: unknown demo model"),
    ("classifier lr 0", _classifier("--lr", "0"), "--lr"),
    ("classifier weight decay -1", _classifier("--weight-decay", "-1"), "--weight-decay"),
    ("classifier out suffix", _replace(_classifier(), "--out", "{T}/c.pt"), "--out"),
    ("classifier width 0", _classifier("--width", "0"), "--width"),
    ("study lr 0", ["study", "--lr", "0"], "--lr"),
    ("i2v teacher out suffix", _replace(_i2v_teacher(), "--out", "{T}/x.pt"), "--out"),
    ("i2v teacher missing T2V teacher", _i2v_teacher("--teacher", "{T}/nope.safetensors"), "--teacher: no file"),
    ("i2v teacher dropout 1", _i2v_teacher("--label-dropout", "1"), "--label-dropout"),
    ("i2v report 5 student steps", _i2v("--i2v-report.student-steps", "5"), "--i2v-report.student-steps"),
    ("i2v report sigma_max 0", _i2v("--i2v-report.sigma-max", "0"), "--i2v-report.sigma-max"),
    ("i2v report teacher steps 0", _i2v("--i2v-report.teacher-steps", "0"), "--i2v-report.teacher-steps"),
    ("eval guidance -1", _eval("--guidance", "-1"), "--guidance"),
    ("distill ema nan", _distill("--ema-sigma-rel", "nan"), "--ema-sigma-rel"),
    ("distill sample_every -1", _distill("--sample-every", "-1"), "--sample-every"),
    ("distill keep 0", _distill("--loop.keep-checkpoints", "0"), "--loop.keep-checkpoints"),
    ("bench sample guidance -1", _bench_sample("--guidance", "-1"), "--guidance"),
    ("bench step height alone", ["bench", "step", "--model", "wan-tiny", "--device", "cpu", "--height", "32"],
     "give both --height and --width"),
    # a flag that does not apply to the checkpoint's kind is an error, never ignored
    ("teacher given steps 0", _sample("teacher", "--steps", "0"), "--steps: must be in 1..10,000 for a teacher"),
    ("student given steps 10", _sample("student", "--steps", "10"), "--steps: must be in 1..4 for a student, got 10"),
    ("student given sampler", _sample("student", "--sampler", "euler"), "--sampler"),
    ("student given guidance", _sample("student", "--guidance", "3"), "--guidance"),
    ("student given shift", _sample("student", "--shift", "2"), "--shift"),
    ("forced teacher steps 0", _sample("student", "--kind", "teacher", "--steps", "0"), "--steps"),
    ("wan teacher given steps 0", _wan("teacher", "--steps", "0"), "--steps: must be in 1..10,000"),
    ("wan student given steps", _wan("student", "--steps", "10"), "--steps: must be in 1..4"),
    # bench step --compare: read before benchmarking
    ("compare not JSON", _step("--compare", "{F}/notes.txt"), ("--compare:", "notes.txt")),
    ("compare missing", _step("--compare", "{T}/nope.json"), "--compare: no file"),
    ("compare not a results file", _step("--compare", "{M}/list.json"), ("--compare:", "list.json")),
    ("compare a folder", _step("--compare", "{F}"), "--compare"),
    # files: the file named in one line
    ("export out suffix", ["export", "--checkpoint", "{F}/corrupt_run/checkpoints", "--out", "{T}/x.pt"], "--out"),
    ("export out a folder", ["export", "--checkpoint", "{F}/corrupt_run/checkpoints", "--out", "{M}/folder.safetensors"],
     ("--out:", "folder.safetensors")),
    ("export checkpoint missing", ["export", "--checkpoint", "{T}/nope"], "--checkpoint: no such file"),
    ("distill integer teacher", _replace(_distill(), "--teacher", "{M}/int_teacher.safetensors"),
     ("int_teacher.safetensors", "not floating point")),
    ("sample integer teacher", _sample("teacher", "--checkpoint", "{M}/int_teacher.safetensors"), "int_teacher.safetensors"),
    ("eval integer teacher", _eval("--teacher", "{M}/int_teacher.safetensors"), "int_teacher.safetensors"),
    ("wan integer DiT", _replace(_wan("student"), "--dit-path", "{M}/int_dit.safetensors"), "int_dit.safetensors"),
    ("eval config.json not JSON", ["eval", "--runs", "{M}/bad_json"], ("--runs:", "bad_json/config.json")),
    ("eval config.json a list", ["eval", "--runs", "{M}/list_json"], ("--runs:", "list_json/config.json")),
    ("eval config.json not UTF-8", ["eval", "--runs", "{M}/latin1_json"], "latin1_json/config.json"),
    ("eval config.json method a number", ["eval", "--runs", "{M}/method_int"], "method_int/config.json"),
    ("synth prompts not UTF-8", _replace(_synth(), "--prompts", "{M}/latin1.txt"), ("--prompts:", "latin1.txt is not UTF-8")),
    ("synth jsonl not UTF-8", _replace(_synth(), "--prompts", "{M}/latin1.jsonl"), "latin1.jsonl is not UTF-8"),
    # raw system errors: a sentence naming the path, never "[Errno 17]"
    ("distill out-dir under a file", _replace(_distill(), "--out-dir", "{F}/notes.txt/run"), "notes.txt"),
    ("teacher out-dir under a file", _replace(_teacher(), "--out-dir", "{F}/notes.txt/t"),
     "{F}/notes.txt"),
    ("classifier out under a file", _classifier("--num-test", "1", "--batch-size", "2", "--width", "1", "--out",
                                                "{F}/notes.txt/c.safetensors"), "{F}/notes.txt"),
    ("sample save path under a file", _sample("teacher", "--steps", "1", "--num-samples", "1", "--save-path",
                                              "{F}/notes.txt/o.png"), "{F}/notes.txt"),
]


def _fill(argv, files: Path, more: Path, tmp: Path) -> list[str]:
    return [a.replace("{F}", str(files)).replace("{M}", str(more)).replace("{T}", str(tmp)) for a in argv]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime: what a bad invocation must leave alone."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            stat = path.lstat()
            out[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return out


def _ids(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def test_at_least_170_bad_invocations_in_all():
    names = [_ids(c) for c in CASES] + [_ids(c) for c in FIRST_CASES]
    assert len(set(names)) == len(names)  # distinct ids
    assert len(names) >= 170, len(names)


@pytest.mark.parametrize("name, argv, fragment", CASES, ids=[_ids(c) for c in CASES])
def test_bad_invocation(name, argv, fragment, files, more, tmp_path, capsys, monkeypatch):
    cwd, work = tmp_path / "cwd", tmp_path / "work"
    cwd.mkdir(), work.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # digests: not the user's cache
    inputs = {"files": _tree(files), "more": _tree(more)}
    args = _fill(argv, files, more, work)
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    _check_one_line(err, tuple(f.replace("{F}", str(files)) for f in fragments))
    assert all(f.replace("{F}", str(files)) in err for f in fragments), err
    assert "[Errno" not in err and ".tmp" not in err and "Config(" not in err, err  # no raw errors, temp names, configs
    assert list(cwd.iterdir()) == [], "a bad invocation wrote into the working directory"
    assert {"files": _tree(files), "more": _tree(more)} == inputs, "a bad invocation touched the input files"
    outside = [p for p in work.iterdir() if not p.name.startswith("run")]
    assert outside == [], f"files outside the run folder: {outside}"


def test_a_temporary_name_is_shown_as_the_output_it_stands_for():
    err = FileExistsError(17, "File exists", "/data/.out.mp4.tmp-1a2b3c4d-42-0a1b2c3d-abcdef")
    assert cli._user_error_line(err) == "cannot create /data/out.mp4: a file or folder of that name is in the way"
    full = OSError(28, "No space left on device", "/data/student_ema.safetensors")
    assert cli._user_error_line(full) == "/data/student_ema.safetensors: No space left on device"


def test_out_of_memory_inside_a_run_names_the_flag():
    """What no estimate caught: torch's allocator error inside ``out_of_memory_as`` names the flag."""
    from rcm import ConfigError, out_of_memory_as

    with pytest.raises(ConfigError) as info, out_of_memory_as("batch_size", "lower --batch-size"):
        torch.empty(2**62, dtype=torch.uint8)
    assert info.value.field == "batch_size" and "out of memory" in info.value.message
    with pytest.raises(ZeroDivisionError), out_of_memory_as("batch_size"):  # anything else passes through
        1 / 0


def test_bench_step_compare_fails_before_benchmarking(files, tmp_path, monkeypatch):
    """The check runs when the benchmark starts, before any network is built or timed (not in the config: it
    would import the benchmark's code, and `rcm bench step --help` must not)."""
    from rcm import ConfigError
    from rcm.bench import step
    from rcm.bench.config import BenchStepConfig

    def no_network(*args, **kwargs):
        raise AssertionError("a network was built before --compare was checked")

    monkeypatch.setattr(step, "random_dit", no_network)
    (tmp_path / "r.json").write_text(json.dumps({"modes": {}}))
    with pytest.raises(AssertionError, match="network was built"):  # a good file: the benchmark goes on
        step.bench_step(BenchStepConfig(model="wan-tiny", device="cpu", num_frames=5, height=32, width=32,
                                        compare=tmp_path / "r.json"))
    with pytest.raises(ConfigError, match="compare"):
        step.bench_step(BenchStepConfig(model="wan-tiny", device="cpu", num_frames=5, height=32, width=32,
                                        compare=files / "notes.txt"))