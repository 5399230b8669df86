"""The README's digits tables are what the documented commands wrote, run with today's defaults.

docs/readme_metrics/ keeps the metrics.json and config.json of the runs behind the README's two tables
(`rcm distill`, and `rcm distill --method scm && ... && rcm eval`). Every cell of each table must be the
JSON's value as the report formats it, and each run's settings must still be the defaults of
`rcm distill`: a change of a preset that moves the figures fails here until the README is regenerated."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from rcm.digits import presets
from rcm.digits.evaluate import COLUMNS
from rcm.digits.task import DigitsDistillConfig

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "docs" / "readme_metrics"
TEACHER_CACHE = ROOT / "rcm" / "assets" / "digits_teacher_metrics.json"


def readme_table(after: str) -> dict[str, list[str]]:
    """The first markdown table after the line containing ``after``: row name -> its cells."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    lines = text[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| generator |"))
    header = [c.strip() for c in lines[first].strip("|").split("|")]
    assert header[1:] == [title for _, title, _ in COLUMNS], "the README's columns are not the report's"
    rows = {}
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def cached_teacher_seconds() -> dict[str, float]:
    """s/sample of the teacher rows in the shipped cache (what a fresh clone's report shows for them), every one
    measured (teacher@50's by the README's `rcm eval`, whose scores equal the cached row's to every digit)."""
    out = {}
    for row in json.loads(TEACHER_CACHE.read_text()).values():
        out[row["name"]] = row["sec_per_sample"]
    return out


def check_table(table: dict[str, list[str]], rows: list[dict], seconds_of_cached: dict[str, float]) -> None:
    by_name = {r["name"]: r for r in rows}
    assert set(table) <= set(by_name), f"README rows the run did not write: {sorted(set(table) - set(by_name))}"
    students = {name for name in by_name if not name.startswith("teacher@")}
    assert students <= set(table), f"student rows missing from the README: {sorted(students - set(table))}"
    for row in (by_name[name] for name in table):
        cells = dict(zip([key for key, _, _ in COLUMNS], table[row["name"]]))
        for key, _, fmt in COLUMNS:
            value = row[key]
            if key == "sec_per_sample" and row.get("cached"):
                value = seconds_of_cached[row["name"]]  # the README says where a cached row's timing comes from
            assert cells[key] == format(value, fmt), f"README {row['name']} {key}: {cells[key]} vs {format(value, fmt)}"


def test_readme_default_table_is_the_documented_run():
    rows = json.loads((METRICS / "distill_rcm.metrics.json").read_text())["rows"]
    check_table(readme_table("The table it printed"), rows, cached_teacher_seconds())


def test_readme_comparison_table_is_the_documented_eval():
    rows = json.loads((METRICS / "eval.metrics.json").read_text())["rows"]
    assert not any(r.get("cached") for r in rows)  # `rcm eval` samples the teacher afresh by default
    check_table(readme_table("rcm distill --method scm && rcm distill --method dmd2"), rows, {})


@pytest.mark.parametrize("method", ["scm", "dmd2", "rcm"])
def test_readme_runs_used_todays_defaults(method):
    saved = json.loads((METRICS / f"distill_{method}.config.json").read_text())
    today = json.loads(json.dumps(dataclasses.asdict(DigitsDistillConfig(method=method)), default=str))
    for key in saved.keys() & today.keys():  # a field added since leaves the runs' figures as they were
        assert saved[key] == today[key], f"{method}: {key} was {saved[key]!r}, today {today[key]!r}: rerun the README"


@pytest.mark.parametrize("name", ["distill_rcm", "eval"])
def test_readme_runs_sampled_with_todays_mid_times(name):
    saved = json.loads((METRICS / f"{name}.metrics.json").read_text())["student_mid_times"]
    for steps, times in saved.items():
        assert tuple(times) == presets.STUDENT_MID_TIMES[int(steps)]


def test_check_table_catches_a_changed_figure():
    rows = json.loads((METRICS / "eval.metrics.json").read_text())["rows"]
    table = readme_table("rcm distill --method scm && rcm distill --method dmd2")
    table["rcm@2"] = list(table["rcm@2"])
    table["rcm@2"][6] = "1.23"  # frame FD
    with pytest.raises(AssertionError, match="rcm@2 frame_fd"):
        check_table(table, rows, {})


def test_the_shipped_teacher_rows_are_complete():
    """A fresh clone's report reads its teacher rows from the shipped cache: every number there is measured (a
    nan would print as 'nan' in a newcomer's table), and teacher@50's row is the README's `rcm eval` row."""
    eval_rows = {r["name"]: r for r in json.loads((METRICS / "eval.metrics.json").read_text())["rows"]}
    for row in json.loads(TEACHER_CACHE.read_text()).values():
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
        if row["name"] in eval_rows:  # the same scores; the timing too for teacher@50 (the others were timed apart)
            keys = [k for k in row if k != "sec_per_sample" or row["name"] == "teacher@50"]
            assert {k: row[k] for k in keys} == {k: eval_rows[row["name"]][k] for k in keys}, row["name"]
