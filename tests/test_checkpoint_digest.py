"""Content fingerprints with a user-cache (rcm.checkpoint.digest): what the cache key catches, where it writes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rcm
from rcm.checkpoint import digest as digest_module
from rcm.checkpoint.digest import (
    CHUNK_BYTES,
    file_digest,
    path_digest,
    sha256_file,
    user_cache_dir,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh XDG cache, caching allowed at once (no racy window), and a count of full reads."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(digest_module, "RACY_WINDOW_S", 0.0)
    reads = []
    real = digest_module.sha256_file
    monkeypatch.setattr(digest_module, "sha256_file", lambda p: reads.append(Path(p)) or real(p))
    return reads


def _entries() -> list[Path]:
    return sorted((user_cache_dir() / "digests").glob("*.json"))


def test_streamed_sha256_matches_hashlib_on_awkward_sizes(tmp_path):
    rng = __import__("random").Random(0)
    for size in (0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, 2 * CHUNK_BYTES + 17):
        data = rng.randbytes(size)
        (tmp_path / "f").write_bytes(data)
        assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_same_content_under_two_paths_and_through_dotdot(tmp_path, cache):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    data = os.urandom(300_000)
    (tmp_path / "a" / "teacher.safetensors").write_bytes(data)
    (tmp_path / "b" / "copy.safetensors").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_digest(tmp_path / "a" / "teacher.safetensors") == expected
    assert file_digest(tmp_path / "b" / "copy.safetensors") == expected
    assert len(cache) == 2
    assert file_digest(tmp_path / "b" / ".." / "a" / "teacher.safetensors") == expected
    os.symlink(tmp_path / "a" / "teacher.safetensors", tmp_path / "link")
    assert file_digest(tmp_path / "link") == expected
    assert len(cache) == 2  # the spelling through '..' and the link resolve to the cached entry


def test_what_the_key_catches(tmp_path, cache):
    """Replacing content with the same size and restoring the mtime with os.utime is caught: in place through
    ctime (os.utime cannot set it back), renamed over the old file through the inode and ctime."""
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"A" * 4096)
    first = file_digest(path)
    mtime = os.stat(path).st_mtime_ns
    assert file_digest(path) == first and len(cache) == 1  # unchanged key: served from the cache
    time.sleep(0.05)  # past one tick of the kernel's coarse clock
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(b"B")
    os.utime(path, ns=(mtime, mtime))
    assert os.stat(path).st_mtime_ns == mtime and os.stat(path).st_size == 4096
    second = file_digest(path)
    assert second != first and second == hashlib.sha256(b"B" + b"A" * 4095).hexdigest()
    time.sleep(0.05)
    replacement = tmp_path / "new.pt"
    replacement.write_bytes(b"C" * 4096)
    os.utime(replacement, ns=(mtime, mtime))
    os.replace(replacement, path)  # a new inode under the old name, same size and mtime
    assert file_digest(path) == hashlib.sha256(b"C" * 4096).hexdigest()
    assert len(cache) == 3


def test_a_just_written_file_is_not_cached(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(digest_module, "RACY_WINDOW_S", 2.0)
    path = tmp_path / "fresh.pt"
    path.write_bytes(b"x" * 1000)
    file_digest(path)
    file_digest(path)
    assert len(cache) == 2 and _entries() == []  # a same-tick rewrite could not be told apart yet


def test_xdg_cache_home_is_honoured_and_relative_values_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "rcm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "rcm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "rcm"


def test_corrupt_cache_entries_are_ignored_and_rewritten(tmp_path, cache):
    path = tmp_path / "t.pt"
    path.write_bytes(b"weights" * 100)
    good = file_digest(path)
    (entry,) = _entries()
    for corrupt in (b"{not json", b'{"key": 1, "sha256": "00"}', b"", b'["a list"]'):
        entry.write_bytes(corrupt)
        assert file_digest(path) == good
        assert entry.read_text().count(good) == 1  # rewritten
    entry_text = entry.read_text().replace(good, "0" * 64)
    entry.write_text(entry_text)  # a wrong but well-formed digest under the right key is trusted: the key is the contract
    assert file_digest(path) == "0" * 64
    assert file_digest(path, cache=False) == good


def test_concurrent_processes_share_the_cache_safely(tmp_path):
    path = tmp_path / "t.pt"
    path.write_bytes(os.urandom(2 * CHUNK_BYTES))
    os.utime(path, ns=(10**18, 10**18))  # mtime far from now; ctime is now, so allow caching at once
    code = ("import sys; from rcm.checkpoint import digest as d; d.RACY_WINDOW_S = 0.0; "
            "print(d.file_digest(sys.argv[1]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(4)]
    outputs = {r.communicate(timeout=120)[0].strip() for r in runs}
    assert outputs == {hashlib.sha256(path.read_bytes()).hexdigest()}
    files = sorted((tmp_path / "xdg" / "rcm" / "digests").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # one entry, no temporaries left


def test_read_only_package_folder_is_never_written(tmp_path, monkeypatch):
    """Digesting files inside (a copy of) the installed package writes only to the user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(digest_module, "RACY_WINDOW_S", 0.0)
    package = tmp_path / "site-packages" / "rcm"
    (package / "assets").mkdir(parents=True)
    (package / "assets" / "teacher.safetensors").write_bytes(b"w" * 5000)
    os.chmod(package / "assets", 0o555)
    os.chmod(package, 0o555)
    before = sorted((p, p.stat().st_mtime_ns) for p in package.rglob("*"))
    path_digest(package)
    file_digest(package / "assets" / "teacher.safetensors")
    assert sorted((p, p.stat().st_mtime_ns) for p in package.rglob("*")) == before
    assert len(list((tmp_path / "xdg" / "rcm" / "digests").iterdir())) == 1
    assert Path(rcm.__file__).parent not in user_cache_dir().parents


def test_folder_digest_depends_on_names_and_content_not_on_location(tmp_path, cache):
    for name in ("one", "two"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "sub" / "model-00001.safetensors").write_bytes(b"shard")
        (tmp_path / name / ".cache").mkdir()
        (tmp_path / name / ".cache" / "download.lock").write_text(name)  # hidden: left out
    assert path_digest(tmp_path / "one") == path_digest(tmp_path / "two")
    (tmp_path / "two" / "sub" / "model-00001.safetensors").rename(tmp_path / "two" / "sub" / "model-00002.safetensors")
    assert path_digest(tmp_path / "one") != path_digest(tmp_path / "two")


def test_bad_paths_are_value_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'missing.pt'} does not exist"):
        file_digest(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=f"{tmp_path} is not a file"):
        file_digest(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is an empty folder"):
        path_digest(tmp_path / "empty")


def test_a_file_changing_while_read_is_an_error_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "being_written.pt"
    path.write_bytes(b"a" * 1000)
    real = digest_module.sha256_file

    def read_while_appended(p):
        result = real(p)
        with open(path, "ab") as f:
            f.write(b"more")
        return result

    monkeypatch.setattr(digest_module, "sha256_file", read_while_appended)
    with pytest.raises(ValueError, match=f"{path} changed while it was being read"):
        file_digest(path)
