"""Checksum manifests (rcm.checkpoint.manifest) on real torch.save and DCP checkpoints: flipped bytes,
truncation, lost and added files, old checkpoints without a manifest, and the fallback to the last good one."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from rcm.checkpoint import list_checkpoints, save_checkpoint
from rcm.checkpoint.manifest import (
    checkpoint_files,
    discard_manifest,
    hash_entries,
    manifest_path,
    newest_intact,
    verify,
    write_manifest,
)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"train": {"student": {"w": torch.randn(67, 33, generator=g)}},
            "optim": {"exp_avg": torch.randn(1000, generator=g), "step": torch.tensor(seed)}}


def _flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _dcp_checkpoint(folder: Path, seed: int) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is uninitialized": one process on purpose
        dcp.save(_state(seed), checkpoint_id=folder)
    return folder


def test_a_file_checkpoint_flipped_or_truncated_is_corrupt_by_name(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1))
    written = write_manifest(path)
    assert written == manifest_path(path) == tmp_path / "step_00000001.pt.sha256.json"
    assert verify(path).status == "ok"
    size = path.stat().st_size
    _flip(path, size // 2)  # 64 bytes inside the tensor data: torch.load does not notice
    loaded = torch.load(path, weights_only=True)
    assert not (torch.equal(loaded["optim"]["exp_avg"], _state(1)["optim"]["exp_avg"])
                and torch.equal(loaded["train"]["student"]["w"], _state(1)["train"]["student"]["w"]))
    result = verify(path)
    assert result.status == "corrupt" and result.problems == ["step_00000001.pt digest mismatch"]
    assert result.message == f"checkpoint {path} is corrupt: step_00000001.pt digest mismatch"
    assert verify(path, digests=False).status == "ok"  # sizes only: a flip is invisible there
    _flip(path, size // 2)  # flipped back
    assert verify(path).status == "ok"
    path.write_bytes(path.read_bytes()[: size - 100])
    assert verify(path).problems == [f"step_00000001.pt has {size - 100} bytes, expected {size}"]
    assert verify(path, digests=False).status == "corrupt"


def test_a_checkpoint_without_manifest_is_unverified_not_corrupt(tmp_path):
    path = save_checkpoint(tmp_path, 3, _state(3))
    assert verify(path).status == "ok"  # the checkpointer writes the manifest itself
    discard_manifest(path)  # as a run of an earlier version left it
    result = verify(path)
    assert result.status == "unverified" and result.problems == []
    assert "has no checksum manifest" in result.message
    write_manifest(path)
    discard_manifest(path)
    assert verify(path).status == "unverified" and not manifest_path(path).exists()


def test_an_unreadable_manifest_or_missing_checkpoint_is_corrupt(tmp_path):
    path = save_checkpoint(tmp_path, 4, _state(4))
    write_manifest(path)
    record = json.loads(manifest_path(path).read_text())
    for bad in ("{truncated", "[]", json.dumps({**record, "format": 99}),
                json.dumps({**record, "files": {".": {"size": "12"}}})):
        manifest_path(path).write_text(bad)
        assert verify(path).problems == ["its checksum manifest step_00000004.pt.sha256.json is unreadable"]
    manifest_path(path).write_text(json.dumps(record))
    path.unlink()
    assert verify(path).problems == ["it does not exist"]
    assert verify(tmp_path / "never_written.pt").problems == ["it does not exist"]


def test_a_dcp_folder_reports_the_damaged_shard_and_lost_or_added_files(tmp_path):
    folder = _dcp_checkpoint(tmp_path / "step_00000002", 2)
    files = checkpoint_files(folder)
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files)
    write_manifest(folder)
    assert manifest_path(folder) == tmp_path / "step_00000002.sha256.json"
    assert verify(folder).status == "ok"
    shard = next(folder / f for f in files if f.endswith(".distcp"))
    _flip(shard, shard.stat().st_size // 3)
    assert verify(folder).problems == [f"{shard.name} digest mismatch"]
    (folder / ".metadata").unlink()
    (folder / "stray.bin").write_bytes(b"")
    assert verify(folder).problems == [".metadata is missing", "stray.bin is not in the manifest",
                                       f"{shard.name} digest mismatch"]


def test_rank_split_hashing_equals_one_pass(tmp_path):
    folder = _dcp_checkpoint(tmp_path / "step_00000005", 5)
    (folder / "sub").mkdir()
    (folder / "sub" / "empty").write_bytes(b"")  # awkward: a zero-byte file in a subfolder
    files = checkpoint_files(folder)
    merged = {}
    for rank in range(3):
        merged.update(hash_entries(folder, files[rank::3]))
    assert merged == hash_entries(folder)
    write_manifest(folder, merged)
    assert verify(folder).status == "ok"
    with pytest.raises(ValueError, match="no entries for sub/empty"):
        write_manifest(folder, {k: v for k, v in merged.items() if k != "sub/empty"})


def test_newest_intact_falls_back_past_corrupt_checkpoints_with_their_names(tmp_path):
    paths = [save_checkpoint(tmp_path, step, _state(step), keep=3) for step in (1, 2, 3)]
    for path in paths:
        write_manifest(path)
    assert list_checkpoints(tmp_path) == paths
    chosen, passed_over = newest_intact(paths)
    assert chosen.path == paths[2] and chosen.status == "ok" and passed_over == []
    paths[2].write_bytes(paths[2].read_bytes()[:-1])  # the newest truncated
    _flip(paths[1], 200)
    chosen, passed_over = newest_intact(paths)
    assert chosen.path == paths[0]
    assert [p.message for p in passed_over] == [
        (f"checkpoint {paths[2]} is corrupt: step_00000003.pt has {paths[2].stat().st_size} bytes, "
         f"expected {paths[2].stat().st_size + 1}"),
        f"checkpoint {paths[1]} is corrupt: step_00000002.pt digest mismatch"]
    loaded = torch.load(chosen.path, weights_only=True)
    assert torch.equal(loaded["optim"]["exp_avg"], _state(1)["optim"]["exp_avg"])
    discard_manifest(paths[0])
    _flip(paths[0], 300)  # no manifest: an older run's checkpoint is taken, marked unverified
    chosen, _ = newest_intact(paths)
    assert chosen.path == paths[0] and chosen.status == "unverified"
    write_manifest(paths[0])
    _flip(paths[0], 300)
    assert newest_intact(paths)[0] is None and len(newest_intact(paths)[1]) == 3


def test_many_problems_are_summarised(tmp_path):
    folder = tmp_path / "step_00000009"
    folder.mkdir()
    for i in range(8):
        (folder / f"__{i}_0.distcp").write_bytes(bytes([i]) * (i + 1))
    write_manifest(folder)
    for i in range(8):
        (folder / f"__{i}_0.distcp").write_bytes(bytes([i + 1]) * (i + 1))
    message = verify(folder).message
    assert message.endswith("; and 3 more") and message.count("digest mismatch") == 5


def test_resume_skips_a_corrupt_newest_checkpoint_by_name_with_a_warning(tmp_path):
    from rcm.checkpoint import load_latest
    from rcm.checkpoint.local import CheckpointWarning

    save_checkpoint(tmp_path, 1, _state(1), keep=3)
    newest = save_checkpoint(tmp_path, 2, _state(2), keep=3)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zeroed in the middle: still unpickles
    newest.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match="step_00000002.pt is corrupt"):
        saved, path = load_latest(tmp_path)
    assert path.name == "step_00000001.pt"
