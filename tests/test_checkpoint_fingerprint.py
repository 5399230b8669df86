"""Run fingerprints (rcm.checkpoint.fingerprint): short mismatch lines, paths compared by content."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from rcm.checkpoint.fingerprint import (
    differences,
    flag_name,
    flatten,
    mismatch_message,
    settings_record,
)


@dataclasses.dataclass
class SCM:
    guidance: float = 2.0
    tangent_warmup: int = 100


@dataclasses.dataclass
class Loss:
    scm: SCM = dataclasses.field(default_factory=SCM)
    sizes: tuple[int, ...] = (1, 2)


@dataclasses.dataclass
class Config:
    teacher: Path = Path("teacher.safetensors")
    batch_size: int = 4
    loss: Loss = dataclasses.field(default_factory=Loss)
    threads: int = 1


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def teacher(tmp_path) -> Path:
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "teacher.safetensors"
    path.write_bytes(os.urandom(10_000))
    return path


def _saved(config: Config) -> dict:
    return json.loads(json.dumps(settings_record(dataclasses.asdict(config))))  # through config.json


def test_flat_dotted_names_and_flag_spelling(teacher):
    record = settings_record(dataclasses.asdict(Config(teacher=teacher)))
    assert list(record) == ["teacher", "batch_size", "loss.scm.guidance", "loss.scm.tangent_warmup", "loss.sizes",
                            "threads"]
    assert record["loss.sizes"] == [1, 2] and record["teacher"]["path"] == str(teacher)
    assert flag_name("loss.scm.tangent_warmup") == "--loss.scm.tangent-warmup"
    assert flatten({"a": {"b": {}}, "c": 1}) == {"a.b": {}, "c": 1}


def test_the_same_settings_agree_after_a_json_round_trip(teacher):
    config = Config(teacher=teacher)
    assert mismatch_message(_saved(config), settings_record(dataclasses.asdict(config))) is None


def test_one_differing_field_is_named_briefly(teacher):
    saved = _saved(Config(teacher=teacher))
    now = settings_record(dataclasses.asdict(Config(teacher=teacher, loss=Loss(scm=SCM(guidance=3.0)))))
    assert mismatch_message(saved, now) == "--loss.scm.guidance: 2.0 (saved) vs 3.0 (now)"


def test_many_differences_are_cut_at_the_limit(teacher):
    saved = _saved(Config(teacher=teacher))
    now = settings_record(dataclasses.asdict(Config(teacher=teacher, batch_size=8, threads=4,
                                                    loss=Loss(scm=SCM(3.0, 7), sizes=(3,)))))
    now["new_field"] = "x" * 1000
    del saved["threads"], now["threads"]
    saved["old_field"] = True
    message = mismatch_message(saved, now, limit=5)
    assert message == ("--batch-size: 4 (saved) vs 8 (now); --loss.scm.guidance: 2.0 (saved) vs 3.0 (now); "
                       "--loss.scm.tangent-warmup: 100 (saved) vs 7 (now); --loss.sizes: [1, 2] (saved) vs [3] (now); "
                       f"--new-field: not set (saved) vs {'x' * 47}… (now); and 1 more")
    assert [d[0] for d in differences(saved, now)][-1] == "old_field"
    assert len(message) < 400


def test_paths_compare_by_content_not_spelling(teacher, tmp_path):
    saved = _saved(Config(teacher=teacher))
    through_dotdot = tmp_path / "models" / ".." / "models" / "teacher.safetensors"
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(teacher, copy)
    for spelling in (through_dotdot, copy):
        assert mismatch_message(saved, settings_record(dataclasses.asdict(Config(teacher=spelling)))) is None
    teacher.write_bytes(os.urandom(10_000))  # same name and size, other weights
    message = mismatch_message(saved, settings_record(dataclasses.asdict(Config(teacher=teacher))))
    now = settings_record({"teacher": teacher})["teacher"]["sha256"]
    shown = str(teacher) if len(str(teacher)) <= 80 else "…" + str(teacher)[-79:]  # long: the front is cut
    assert message == (f"--teacher: {shown} [sha256 {saved['teacher']['sha256'][:12]}] (saved) vs "
                       f"{shown} [sha256 {now[:12]}] (now)")


def test_long_paths_keep_their_name_and_digest(tmp_path):
    deep = tmp_path.joinpath(*["folder"] * 12)
    deep.mkdir(parents=True)
    (deep / "teacher.pt").write_bytes(b"a")
    (deep / "other.pt").write_bytes(b"b")
    message = mismatch_message(settings_record({"teacher": deep / "teacher.pt"}),
                               settings_record({"teacher": deep / "other.pt"}))
    assert "folder/teacher.pt [sha256 " in message and "folder/other.pt [sha256 " in message and "…" in message


def test_a_record_from_before_content_digests_compares_the_spelling(teacher):
    now = settings_record({"teacher": teacher, "seed": 0})
    assert mismatch_message({"teacher": str(teacher), "seed": 0}, now) is None
    assert mismatch_message({"teacher": "/old/teacher.pt", "seed": 0}, now).startswith(
        "--teacher: /old/teacher.pt (saved) vs ")


def test_a_missing_path_is_an_error_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match=f"--teacher: {tmp_path / 'gone.pt'} does not exist"):
        settings_record({"teacher": tmp_path / "gone.pt"})
