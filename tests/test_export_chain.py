"""Outputs chain: `rcm export` of a digits run's checkpoint writes a file `rcm sample` accepts
(the checkpoint carries the network's architecture, recorded by the task at the start of the run)."""

import json

import cli
from rcm.digits.model import load_model


def test_export_then_sample(tmp_path, monkeypatch):
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
