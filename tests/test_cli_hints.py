"""One-line errors keep the way out (issue 20): an unknown flag names the flags it may have meant (tyro's
"Perhaps you meant" survives the one-line error), and a hint names the exact command that fixes it."""

from __future__ import annotations

import pytest

from rcm import cli


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, meant", [
    (["distill", "--iterations", "3"], "--loop.iterations"),  # the nested flag of a bare name
    (["distill", "--loop.iteratons", "3"], "--loop.iterations"),  # a misspelling
    (["distill", "digits", "--no-reprt"], "--no-report"),
    (["eval", "--report-settings.num-rel", "30"], "--report-settings.num-real"),
    (["train-teacher", "--step", "3"], "--steps"),
], ids=["nested", "misspelt", "subcommand boolean", "eval nested", "train-teacher"])  # fmt: skip
def test_unknown_flag_suggests(argv, meant, capsys):
    err = _error(argv, capsys)
    assert "unrecognized arguments" in err and f"perhaps you meant: {meant}" in err, err


def test_no_suggestion_for_nothing_alike(capsys):
    assert "perhaps" not in _error(["distill", "--zzzzqqq"], capsys)


def test_suggestions_come_from_the_config():
    flags = cli._known_flags(cli._commands()["distill"].commands["digits"].config)
    assert {"--loop.iterations", "--student-optim.lr", "--report", "--no-report", "--threads"} <= set(flags)


@pytest.mark.parametrize("runs, command", [
    ("runs/digits-scm", "rcm distill --method scm"),
    ("runs/digits-rcm", "rcm distill"),
    ("elsewhere/digits-dmd2", "rcm distill --method dmd2 --out-dir elsewhere/digits-dmd2"),
    ("mine", "rcm distill --out-dir mine"),
])  # fmt: skip
def test_eval_names_the_distill_command_of_a_missing_run(runs, command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert f"(run `{command}` first)" in _error(["eval", "--runs", runs], capsys)
