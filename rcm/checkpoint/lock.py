"""One writer per run folder: an exclusive ``flock`` on ``<run folder>/.rcm.lock`` held for the run's lifetime.

Guarantees:
- While a process holds a folder's lock, another process (or another ``RunFolderLock`` in the same process)
  that tries the folder fails at once with ``RunFolderBusy`` (a ``ValueError``) naming the holder: process id,
  host, start time, command, and whether that process is still running.
- The kernel drops the lock when the holder exits in any way (return, exception, SIGKILL, power loss), so a
  lock left by a dead process is taken over by the next run with no stale-lock logic: of two processes that
  take over at the same time, the kernel lets exactly one in. The lock file is never deleted (deleting it
  would let a late opener lock an orphaned inode); the holder writes its description into it after locking.
- Liveness in the message compares the process start time as well as the id (a reused id reads as ended).

Not guaranteed:
- A process forked by the holder (a fork-started data-loader worker) shares the lock and keeps it after the
  holder dies, until it exits; the message says so. Processes started with exec (subprocess) do not inherit it.
- Filesystems without file locks (some Lustre or FUSE mounts) raise a ``ValueError`` naming the folder rather
  than run unlocked. NFS v4 and local filesystems lock correctly.
- Deleting the lock file by hand breaks exclusion; ``RunFolderLock.check`` detects it (call it at each save).
  Under torchrun one process (rank 0) takes the lock and must tell the others whether it got it.

The same lock guards a single output file outside any run folder (``rcm.checkpoint.run_folder.claim_file``):
``RunFolderLock(folder, name=".<file>.rcm.lock", remove_on_release=True)``. Such a lock file is removed by its
holder while still locked; that is safe because an opener re-checks after locking that the name still leads to
the file it locked (and retries otherwise), so only a SIGKILLed holder leaves one behind (taken over next time).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".rcm.lock"


class RunFolderBusy(ValueError):
    """The run folder is locked by another process (or another lock of this process); ``holder`` describes it."""

    def __init__(self, message: str, holder: dict | None):
        super().__init__(message)
        self.holder = holder


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None if it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22; the name in (...) may hold spaces


def _this_process() -> dict:
    ticks = process_start_ticks(os.getpid())
    if ticks is not None:
        boot = float(next(line.split()[1] for line in Path("/proc/stat").read_text().splitlines()
                          if line.startswith("btime ")))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    else:
        started = time.time()  # no /proc: the lock time stands in for the start time
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(), "start_ticks": ticks,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "command": shlex.join(sys.argv)}


def holder_running(holder: dict) -> bool | None:
    """Whether the process a lock description names is still running: None when it cannot be told (another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    if holder.get("boot_id") != _boot_id():  # locked before this machine last started
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    if Path("/proc/self/stat").exists():
        ticks = process_start_ticks(pid)
        return ticks is not None and holder.get("start_ticks") in (None, ticks)  # another start: a reused id
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def read_holder(folder: str | Path, wait_s: float = 2.0, name: str = LOCK_NAME) -> dict | None:
    """The description in ``folder``'s lock file, or None if there is none. A new holder overwrites its
    predecessor's description right after locking, so an empty, partial, or ended holder's description is
    re-read for up to ``wait_s`` seconds before it is believed (a takeover in progress is not misreported)."""
    path = Path(folder) / name
    deadline = time.monotonic() + wait_s
    holder = None
    while True:
        try:
            holder = json.loads(path.read_text())
            if not isinstance(holder, dict):
                holder = None
        except (OSError, ValueError):
            holder = None
        if (holder is not None and holder_running(holder) is not False) or time.monotonic() >= deadline:
            return holder
        if not path.exists():
            return None
        time.sleep(0.05)


def _busy_message(what: str, holder: dict | None, flag: str) -> str:
    if holder is None:
        return f"{what} is in use by another process (it has not said which); use another {flag}"
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
           f"command: {str(holder.get('command'))[:200]}")
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return f"{what} is already locked by this process ({who})"
    running = holder_running(holder)
    if running is False:
        return (f"{what} is still locked although the run that locked it has ended ({who}): a process "
                f"it started (a data-loader worker?) holds the lock; wait for it to exit, or end it")
    return f"{what} is in use by another run ({who}); wait for it to finish, or use another {flag}"


class RunFolderLock:
    """``with RunFolderLock(folder):`` — hold ``folder`` exclusively (creating it) until the block ends.

    ``name``: the lock file's name in ``folder``; ``what`` and ``flag`` say in messages what is locked (default
    "run folder <folder>") and which flag picks another one; ``remove_on_release``: delete the lock file when
    released (for the lock of one output file, see the module notes)."""

    def __init__(self, folder: str | Path, name: str = LOCK_NAME, what: str | None = None, flag: str = "--out-dir",
                 remove_on_release: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what or f"run folder {self.folder}"
        self.flag, self.remove_on_release = flag, remove_on_release
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        if self._fd is not None:
            raise ValueError(f"{self.what} is already locked by this RunFolderLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only if the lock file is replaced between our open and our lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_holder(self.folder, name=self.path.name)
                raise RunFolderBusy(_busy_message(self.what, holder, self.flag), holder) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise ValueError(f"cannot lock {self.what}: its filesystem does not support "
                                     f"file locks ({e.strerror}); use a folder on a local or NFS v4 disk") from None
                raise
            if self._same_file(fd):
                break
            os.close(fd)
        else:
            raise ValueError(f"cannot lock {self.what}: its lock file {self.path} keeps being replaced")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_this_process()).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            held, named = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)

    def check(self) -> None:
        """Raise a ``ValueError`` if this lock is not held or its lock file was deleted or replaced meanwhile."""
        if self._fd is None:
            raise ValueError(f"{self.what} is not locked by this process")
        if not self._same_file(self._fd):
            raise ValueError(f"the lock file {self.path} of {self.what} was removed or replaced while "
                             f"this run held it: another process may be writing the folder; stopping")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # a free lock describes no one
            if self.remove_on_release and self._same_file(fd):
                os.unlink(self.path)  # while still locked: an opener of the old file sees it gone and retries
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
