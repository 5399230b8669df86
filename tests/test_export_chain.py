"""Outputs chain: `rcm export` of a digits run's checkpoint writes a file `rcm sample` accepts (the checkpoint
carries the network's architecture, recorded by the task at the start of the run), and `rcm eval --runs` scores
student files beside run folders."""

import json

import pytest

from rcm import cli
from rcm.digits.model import load_model


def test_distill_export_sample_eval(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cli.main(["distill", "--out-dir", str(run), "--loop.iterations", "2", "--batch-size", "2", "--no-report",
              "--loop.checkpoint-every", "1"])
    exported = tmp_path / "x.safetensors"
    cli.main(["export", "--checkpoint", str(run / "checkpoints"), "--out", str(exported), "--dtype", "float32"])
    student = load_model(exported)  # the architecture came with the checkpoint
    reference = load_model(run / "student_ema.safetensors")
    assert student.config == reference.config and student.num_classes == reference.num_classes
    for (name, a), (_, b) in zip(sorted(student.state_dict().items()), sorted(reference.state_dict().items())):
        assert a.equal(b), name  # the newest checkpoint's EMA is the exported student
    cli.main(["sample", "--checkpoint", str(exported), "--save-path", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 0
    # eval: the exported file (named by its stem) beside the run's own student file (named by its method)
    small = ["--report-settings.num-per-class", "2", "--report-settings.num-real", "20",
             "--report-settings.teacher-steps", "1", "--report-settings.student-steps", "1", "--device", "cpu"]
    cli.main(["eval", "--runs", str(exported), str(run / "student_ema.safetensors"), "--out-dir",
              str(tmp_path / "eval"), *small])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [r["name"] for r in metrics["rows"]] == ["teacher@1", "x@1", "rcm@1"]
    assert all(r["n"] == 20 and 0 <= r["frame_accuracy"] <= 1 for r in metrics["rows"])
    assert "| x@1 |" in (tmp_path / "eval" / "metrics.md").read_text()
    for name in ("samples.png", "samples.gif", "samples.mp4"):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def test_eval_names_a_file_that_is_not_a_digits_student(tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    from rcm.digits.model import TEACHER_PATH

    files = {"wan.safetensors": {"wan_config": "{}", "kind": "student"},  # a Wan DiT's export: no classes
             "critic.safetensors": {"wan_config": "{}", "num_classes": "10", "kind": "teacher"}}
    for name, meta in files.items():
        save_file({"w": torch.zeros(1)}, str(tmp_path / name), metadata=meta)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 3)
    (tmp_path / "notes.txt").write_text("x")
    for entry, fragment in (("wan.safetensors", "is not a digits student"), ("critic.safetensors", "is a digits teacher"),
                            ("broken.safetensors", "not a readable safetensors file"),
                            ("notes.txt", "give a run folder or a digits student .safetensors file"),
                            ("missing.safetensors", "no file at"), (str(TEACHER_PATH), "is a digits teacher")):
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "--runs", str(tmp_path / entry), "--out-dir", str(tmp_path / "eval")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("rcm: error: --runs: ") and fragment in err, err
    assert not (tmp_path / "eval").exists()


def test_cards_of_the_distilled_and_the_exported_student(tmp_path, monkeypatch):
    """The run's exported EMA student and `rcm export`'s file each get a model card beside them: teacher,
    method, iterations and the sampler settings the digits report evaluates with."""
    from rcm.checkpoint.card import read_card
    from rcm.digits import presets
    from rcm.digits.model import TEACHER_PATH

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cli.main(["distill", "--out-dir", str(run), "--loop.iterations", "2", "--batch-size", "2", "--no-report",
              "--loop.checkpoint-every", "1"])
    card = json.loads((run / "student_ema.card.json").read_text())
    assert card["format"] == "rcm-model-card" and card["kind"] == "student" and card["family"] == "digits"
    assert card["method"] == "rcm" and card["iterations"] == 2 and card["teacher"] == str(TEACHER_PATH)
    assert card["sampling"]["steps"] == 4 and card["sampling"]["sigma_max"] == presets.STUDENT_SIGMA_MAX
    assert card["sampling"]["mid_times"] == {str(n): list(t) for n, t in presets.STUDENT_MID_TIMES.items()}
    assert card["metrics"] == {}  # --no-report: nothing measured

    # a metrics.json of the run (as the report writes it): its rows of this method go on the export's card
    rows = [{"name": "rcm@2", "frame_acc": 0.5}, {"name": "teacher@4", "frame_acc": 0.9}]
    (run / "metrics.json").write_text(json.dumps({"rows": rows}))
    exported = tmp_path / "x.safetensors"
    cli.main(["export", "--checkpoint", str(run / "checkpoints"), "--out", str(exported)])
    card = read_card(exported)
    assert (tmp_path / "x.card.json").is_file() and card["iterations"] == 2 and card["method"] == "rcm"
    assert card["family"] == "digits" and card["sampling"]["sigma_max"] == presets.STUDENT_SIGMA_MAX
    assert card["teacher"] == str(TEACHER_PATH) and card["network"] == "ema"
    assert card["metrics"] == {"rcm@2": rows[0]}
    cli.main(["export", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "f.safetensors"),
              "--model", "fake_score"])
    assert not (tmp_path / "f.card.json").exists()  # a fake score is no student
