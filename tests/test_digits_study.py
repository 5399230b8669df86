"""`rcm study` on a tiny budget: every output, one snapshot per method@steps and iteration, resuming."""

import json

import pytest
from PIL import Image

from rcm import cli


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _study(out, *extra):
    return cli.main(["study", "--out-dir", str(out), "--snapshots", "2", "4", "--batch-size", "2",
                     "--num-per-class", "2", "--num-real", "20", "--teacher-steps", "2", "--threads", "1",
                     "--device", "cpu", *extra])


def test_study_tiny_budget_writes_table_plot_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    _study(out)
    data = json.loads((out / "study.json").read_text())
    rows = data["rows"]
    names = [(r["method"], r["name"], r["iteration"]) for r in rows]
    assert names == [(m, f"{m}@{n}", it) for m in ("rcm", "dmd2", "scm") for n in (1, 2, 4) for it in (2, 4)]
    for r in rows:
        assert 0 <= r["frame_accuracy"] <= 1 and 0 <= r["switching_share"] <= 1 and r["frame_fd"] > 0
        assert r["n"] == 20
    assert [t["name"] for t in data["teacher"]] == ["teacher@2"]
    table = (out / "study.md").read_text()
    assert "rcm@2 @ 4 its" in table and "teacher@2" in table and table.count("\n") == 2 + len(rows) + 1
    png = Image.open(out / "study.png")
    assert png.size[0] >= 1000 and len(set(png.convert("RGB").getdata())) > 10  # panels with coloured lines
    for m in ("rcm", "dmd2", "scm"):  # each method is an ordinary distill run folder, run to the last snapshot
        run = out / m
        assert (run / "student_ema.safetensors").is_file()
        assert json.loads((run / "config.json").read_text())["method"] == m
        assert sorted(p.name for p in (run / "study").glob("*.json")) == ["2.json", "4.json"]
    assert "convergence study" in capsys.readouterr().out

    # a rerun resumes every finished run (no training) and rebuilds the same table from the stored snapshots
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/study/*.json")}
    _study(out)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/study/*.json")} == stamps
    assert json.loads((out / "study.json").read_text())["rows"] == rows
    assert "resumed" in capsys.readouterr().out


def test_study_rejects_bad_settings(tmp_path):
    from rcm import ConfigError
    from rcm.digits.study import StudyConfig

    with pytest.raises(ConfigError, match="snapshots"):
        StudyConfig(out_dir=tmp_path, snapshots=(4, 2))
    with pytest.raises(ConfigError, match="methods"):
        StudyConfig(out_dir=tmp_path, methods=("rcm", "sid"))
    with pytest.raises(ConfigError, match="student_steps"):
        StudyConfig(out_dir=tmp_path, student_steps=(8,))


def test_study_concurrent_processes_match_one_after_the_other(tmp_path):
    args = ["--methods", "rcm", "scm", "--snapshots", "2", "--batch-size", "2", "--num-per-class", "2",
            "--num-real", "20", "--teacher-steps", "1", "--threads", "1", "--device", "cpu"]
    cli.main(["study", "--out-dir", str(tmp_path / "a"), "--concurrent", *args])
    cli.main(["study", "--out-dir", str(tmp_path / "b"), *args])
    a, b = (json.loads((tmp_path / d / "study.json").read_text())["rows"] for d in "ab")
    assert len(a) == 6 and [{k: v for k, v in r.items() if k != "sec_per_sample"} for r in a] == \
        [{k: v for k, v in r.items() if k != "sec_per_sample"} for r in b]


def test_a_study_stopped_early_leaves_the_table_of_what_it_reached(tmp_path, monkeypatch):
    """The table, the JSON and the plot are rewritten after every scored snapshot: interrupted right after the
    first one (a lost machine, Ctrl-C), the study folder already holds that snapshot's rows and the teacher's."""
    from rcm.digits import study

    original = study.StudyTask.write_samples

    def stop_after_first_snapshot(self, ema, iteration, run_dir, console):
        original(self, ema, iteration, run_dir, console)
        if (run_dir / "study" / f"{iteration}.json").is_file():
            raise KeyboardInterrupt

    monkeypatch.setattr(study.StudyTask, "write_samples", stop_after_first_snapshot)
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as stopped:
        _study(out, "--methods", "rcm")
    assert stopped.value.code == 130
    data = json.loads((out / "study.json").read_text())
    assert [(r["name"], r["iteration"]) for r in data["rows"]] == [(f"rcm@{n}", 2) for n in (1, 2, 4)]
    assert [t["name"] for t in data["teacher"]] == ["teacher@2"]
    assert "rcm@4 @ 2 its" in (out / "study.md").read_text() and (out / "study.png").is_file()
