"""The README's notebook snippet runs as written, and its two commands are what CI runs."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_loss_snippet_runs(capsys):
    snippet = next(b for b in _blocks("python") if "scm_loss" in b)
    exec(compile(snippet, "README.md", "exec"), {})
    out = capsys.readouterr().out
    sCM, DMD, grad = (float(v) for v in re.findall(r"sCM (\S+)  DMD (\S+)  \|grad\| (\S+)", out)[0])
    assert sCM > 0 and DMD > 0 and grad > 0


def test_ci_runs_the_readme_test_command():
    commands = [b.strip() for b in _blocks("bash") if "pytest" in b]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands and commands[0] in ci
