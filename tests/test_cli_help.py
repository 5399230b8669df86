"""Help that tells the truth (issue 20): every default `--help` shows is the one the command runs with, per
application (the digits demo and each Wan preset have their own), and no description quotes another number
as if it were the default."""

from __future__ import annotations

import dataclasses
import re

import pytest

from rcm import cli

HELP_COMMANDS = [("distill", "digits"), ("distill", "digits-i2v"), ("distill", "wan2.1-t2v-1.3b"),
                 ("distill", "wan2.1-t2v-14b"), ("eval", None), ("study", None), ("train-teacher", None)]


def _config(name: str, sub: str | None):
    command = cli._commands()[name]
    return command.commands[sub].config if sub else command.config


def _defaults(config, prefix: str = "") -> dict[str, object]:
    """Every leaf field of a config (a dataclass type or instance) by its flag, with the value it runs with."""
    cls = config if isinstance(config, type) else type(config)
    out = {}
    for f in dataclasses.fields(cls):
        if not isinstance(config, type):
            value = getattr(config, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue  # required: no default to show
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out |= _defaults(value, f"{prefix}{f.name}.")
        else:
            out[cli._flag(prefix + f.name)] = value
    return out


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


def _help_blocks(argv, capsys, monkeypatch) -> dict[str, str]:
    """`rcm ... --help` as {flag: its description}, read from tyro's one-column layout."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    lines = [line.strip("│ ").rstrip() for line in capsys.readouterr().out.splitlines()]
    blocks, flag = {}, None
    for line in lines:
        match = re.match(r"(--[\w.-]+)", line)
        if match:
            flag = match.group(1)
            parts = re.split(r"\s{2,}", line, maxsplit=1)  # a short layout puts the description beside the flag
            blocks[flag] = " " + parts[1] if len(parts) == 2 else ""
        elif flag and line and not line.startswith(("─", "╭", "╰")):
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return blocks


@pytest.mark.parametrize("name, sub", HELP_COMMANDS, ids=[" ".join(filter(None, c)) for c in HELP_COMMANDS])
def test_help_shows_the_defaults_the_command_runs_with(name, sub, capsys, monkeypatch):
    defaults = _defaults(_config(name, sub))
    blocks = _help_blocks([name, sub] if sub else [name], capsys, monkeypatch)
    checked = 0
    for flag, text in blocks.items():
        if flag not in defaults:
            continue
        shown = re.search(r"\((?:default|fixed to): ((?:(?!\((?:default|fixed to):).)*)\)\s*$", text)
        assert shown, (flag, text)
        assert " ".join(shown.group(1).split()) == _shown(defaults[flag]), (flag, text, defaults[flag])
        # a number in parentheses in the description must be the default, not another application's value
        for number in re.findall(r"\((-?\d[\d.e+-]*)\)", text[: shown.start()]):
            assert float(number) == float(defaults[flag]), (flag, text)
        checked += 1
    assert checked >= min(10, len(defaults)), sorted(blocks)


@pytest.mark.parametrize("name, sub", HELP_COMMANDS, ids=[" ".join(filter(None, c)) for c in HELP_COMMANDS])
def test_no_description_names_a_field_with_another_value(name, sub, capsys, monkeypatch):
    """A group's text ("guidance: teacher CFG weight (5)") must not quote a value the command does not use."""
    by_name: dict[str, set] = {}
    for flag, value in _defaults(_config(name, sub)).items():
        by_name.setdefault(flag.split(".")[-1][2:] if "." not in flag else flag.split(".")[-1], set()).add(value)
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        cli.main([name, sub, "--help"] if sub else [name, "--help"])
    text = " ".join(line.strip("│ ") for line in capsys.readouterr().out.splitlines())
    for field, values in by_name.items():
        spelled = field.replace("-", "_")
        for number in re.findall(rf"\b{re.escape(spelled)}: [^()]*?\((-?\d[\d.e+-]*)[;)]", text):
            numeric = {float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)}
            assert float(number) in numeric, (field, number, values)


def test_distill_help_quotes_no_wan_number_as_the_digits_default(capsys, monkeypatch):
    blocks = _help_blocks(["distill", "digits"], capsys, monkeypatch)
    assert "(default: 2.0)" in blocks["--loss.scm.guidance"] and "(5)" not in blocks["--loss.scm.guidance"]
    assert "(default: 100)" in blocks["--loss.scm.tangent-warmup"]


def _seconds(args: list[str], cwd=None) -> float:
    """The best of three wall times of ``python <args>`` (the least disturbed by other jobs)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=cwd or Path(__file__).resolve().parents[1], check=True,
                       capture_output=True, timeout=300)
        best = min(best, time.perf_counter() - start)
    return best


def _every_command() -> list[list[str]]:
    """Every command, and every subcommand of a group, as the words that name it."""
    out = []
    for name, command in cli._commands().items():
        out.append([name])
        out += [[name, sub] for sub in getattr(command, "commands", {})]
    return out


def test_no_help_imports_torch():
    """Every command's help is built from torch-free config modules: torch is what made help take seconds.
    The command code (which imports torch) is imported only after the arguments are parsed."""
    import json
    import subprocess
    import sys

    driver = """
import contextlib, io, json, sys
from rcm import cli
bad = []
for words in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cli.main([*words, "--help"])
        except SystemExit as e:
            assert e.code == 0, (words, e.code)
    assert "usage" in out.getvalue().lower(), words
    heavy = [m for m in ("torch", "triton", "transformers", "numpy", "sklearn") if m in sys.modules]
    if heavy:
        bad.append((words, heavy))
print(json.dumps(bad))
"""
    commands = _every_command()
    assert len(commands) >= 25  # 10 commands, the distill / sample / bench subcommands
    proc = subprocess.run([sys.executable, "-c", driver, json.dumps(commands)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_help_is_quick():
    """Help within a few bare interpreter starts (`python -c pass`), so well under 2 s on the 2-core machine:
    `rcm --help` imports nothing of the package, a command's help its config (tyro and plain dataclasses)."""
    bare = _seconds(["-c", "pass"])
    assert _seconds(["-m", "rcm", "--help"]) < 5 * bare + 0.3
    for command in (["distill"], ["distill", "digits"], ["eval"], ["sample", "wan2.1-t2v-1.3b"], ["bench", "step"]):
        assert _seconds(["-m", "rcm", *command, "--help"]) < 10 * bare + 0.5, command


def test_the_entry_point_is_in_the_package(tmp_path):
    """The installed command is rcm.cli:main and installs no top-level module: outside the checkout `cli` is
    not importable (a name other packages use), while `python -m rcm` works; the checkout's cli.py (the
    design card's place) runs the same command line."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["rcm"] == "rcm.cli:main"
    assert "py-modules" not in project.get("tool", {}).get("setuptools", {})
    elsewhere = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('cli'))"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert elsewhere.stdout.strip() == "None", elsewhere.stdout
    via_package = subprocess.run([sys.executable, "-m", "rcm", "--help"], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=120)
    via_checkout = subprocess.run([sys.executable, str(root / "cli.py"), "--help"], cwd=root, capture_output=True,
                                  text=True, timeout=120)
    assert via_package.returncode == 0 and via_package.stdout == via_checkout.stdout
    assert "rcm distill" in via_package.stdout


def test_a_reader_that_stops_early_gets_no_traceback():
    """`rcm --help | head -1`: the pipe closes under the writer; no BrokenPipeError traceback, SIGPIPE's status."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-m", "rcm", "distill", "digits", "--help"], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # the reader leaves before the (long) help is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_top_level_help_names_every_command():
    """`rcm --help` is written by hand (it imports nothing): every command and subcommand must be in it, on its
    command's lines (``rcm sample wan2.1-t2v-1.3b | ... | wan`` and their continuation lines)."""
    import re

    named: dict[str, set[str]] = {}
    command = None
    for line in cli.__doc__.splitlines():
        if line.startswith("    rcm "):
            words = re.findall(r"[\w.-]+", line[len("    rcm "):].split("   ")[0])  # before the description
            command = words[0]
            named.setdefault(command, set()).update(words[1:])
        elif command and line.startswith(" " * 15 + "|"):
            named[command].update(re.findall(r"[\w.-]+", line))
    for words in _every_command():
        assert words[0] in named, words
        if len(words) == 2:
            assert words[1] in named[words[0]], (words, sorted(named[words[0]]))
