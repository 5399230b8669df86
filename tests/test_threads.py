"""CPU threads (issue 20): every command that computes takes --threads; the digits commands default to one
thread (fast on a busy machine as on an idle one, README), and a run records the count it ran with."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rcm import cli
from rcm.digits import presets


def _configs():
    for name, command in cli._commands().items():
        for sub, cmd in (command.commands.items() if isinstance(command, cli.Group) else [("", command)]):
            yield f"{name} {sub}".strip(), cmd.config


COMPUTING = {"distill digits", "distill digits-i2v", "distill wan", "sample digits", "sample wan", "synth", "eval",
             "study", "train-teacher", "train-i2v-teacher", "train-classifier"}


def test_every_computing_command_takes_threads():
    configs = dict(_configs())
    for name in COMPUTING:
        fields = {f.name: f for f in dataclasses.fields(configs[name])}
        assert "threads" in fields, name
        if name.split()[-1].startswith("digits") or name in ("eval", "study", "train-teacher", "train-i2v-teacher",
                                                             "train-classifier"):
            assert fields["threads"].default == presets.THREADS == 1, name


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_sample_sets_threads_and_checks_them(tmp_path, restore_threads, capsys):
    torch.set_num_threads(2)
    cli.main(["sample", "--steps", "1", "--num-samples", "1", "--save-path", str(tmp_path / "a.png")])
    assert torch.get_num_threads() == 1  # the digits default
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--threads", "100000", "--save-path", str(tmp_path / "b.png")])
    assert exit_info.value.code == 2 and "--threads: must be in 0.." in capsys.readouterr().err


def test_the_fingerprint_records_the_effective_count(restore_threads):
    from rcm.digits.task import DigitsDistillConfig
    from rcm.train.driver import start_run

    cfg = DigitsDistillConfig(report=False)
    start_run(cfg)
    assert cfg.threads == 1 and cfg.fingerprint()["threads"] == torch.get_num_threads() == 1
