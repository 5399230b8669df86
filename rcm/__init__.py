"""rcm: few-step video generation by rCM distillation. Start with docs/layout.md for the map of the package.

Also the checks every command's config makes before work starts (docs/reliability.md, "Validation"):
``check_count``, ``check_seed``, ``check_output_file``, ``check_memory``, and ``out_of_memory_as`` for what cannot be estimated.
Nothing here imports torch at import time."""

from __future__ import annotations

import contextlib
import math
import os

MAX_SEED = 2**62  # seeds are offset (seed + i, per rank, per worker): headroom below torch's 2^63 limit
MAX_ITERATIONS = 10**9  # training iterations / steps: a billion would take years; more is a typo
MAX_SAMPLING_STEPS = 10_000  # sampler steps: 200x the default teacher's 50


class ConfigError(ValueError):
    """A bad value of one configuration field: ``ConfigError("batch_size", "must be >= 1, got 0")``.

    Library code names the field, not a command-line flag; ``rcm.cli`` turns the field (and where the
    config sits in the command's config) into the flag the user typed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class PathArgumentError(ConfigError, FileNotFoundError):
    """A path field naming nothing on disk (both a ConfigError and a FileNotFoundError)."""


def check_count(field: str, value: int, low: int = 1, high: int = MAX_ITERATIONS) -> int:
    """``value`` of ``field`` as an integer in ``low..high`` (a count: steps, iterations, a batch size)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(field, f"must be in {low}..{high:,}, got {value:,}" if value > high
                          else f"must be >= {low}, got {value}")
    return value


def check_number(field: str, value: float, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` of ``field`` as a finite number in the interval ``low..high`` (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(field, f"must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "" if low is None else f"{'(' if low_open else '['}{low:g}, "
        right = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        where = (f"in {left}{right}" if low is not None and high is not None
                 else f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}")
        raise ConfigError(field, f"must be {where}, got {value}")
    return float(value)


def check_seed(field: str, value: int) -> int:
    """A random seed: an integer in ``0..MAX_SEED`` (torch refuses 2^64 and more; offsets need headroom)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(field, f"must be an integer in 0..2^62, got {value}")
    return value


def check_output_file(field: str, value, suffix: str = ".safetensors") -> str:
    """A file to write: named (not empty or "."), not an existing folder, ending in ``suffix``."""
    from pathlib import Path

    if str(value).strip() in ("", "."):
        raise ConfigError(field, "must name a file")
    if Path(value).is_dir():
        raise ConfigError(field, f"{value} is a folder; give a file path")
    if Path(value).suffix != suffix:
        raise ConfigError(field, f"must be a {suffix} file, got {value}")
    return str(value)


def check_threads(field: str, value: int) -> int:
    """A thread count: 0 (torch's default) up to this machine's CPUs (torch aborts the process on far more)."""
    cpus = os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= cpus:
        raise ConfigError(field, f"must be in 0..{cpus} (0: torch's default; this machine has {cpus} CPUs), got {value}")
    return value


def use_threads(field: str, value: int) -> None:
    """``check_threads``, then ``torch.set_num_threads(value)``; 0 leaves torch's default."""
    check_threads(field, value)
    if value:
        import torch

        torch.set_num_threads(value)


def available_memory(device: str = "cpu") -> int | None:
    """Bytes that can be allocated now on ``device`` ("cpu" or "cuda[:i]"): the kernel's MemAvailable
    (plus free swap) on the CPU, ``torch.cuda.mem_get_info`` on a GPU; None when unknown."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index
        return torch.cuda.mem_get_info(torch.cuda.current_device() if index is None else index)[0]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def check_memory(field: str, nbytes: float, what: str, device: str = "cpu") -> None:
    """Refuse, naming ``field``, a setting whose first big allocation (``nbytes`` for ``what``) cannot fit in
    the memory ``device`` has free now. An estimate from below: passing it does not promise the run fits
    (``out_of_memory_as`` turns a later out-of-memory error into the same kind of line)."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise ConfigError(field, f"{what} needs {_gib(nbytes)}, more than the {_gib(free)} of "
                                 f"{'GPU' if str(device).startswith('cuda') else 'host'} memory available")


def is_out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory errors: CUDA's ``OutOfMemoryError`` and the CPU allocator's RuntimeError (also
    a size so large that torch cannot compute the storage)."""
    text = str(e)
    return type(e).__name__ == "OutOfMemoryError" or (isinstance(e, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "not enough memory", "out of memory",
                            "Storage size calculation overflowed")))


@contextlib.contextmanager
def out_of_memory_as(field: str, hint: str = ""):
    """Inside: torch's out-of-memory error becomes a ``ConfigError`` naming ``field`` (one line, exit 2)."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, MemoryError) or is_out_of_memory(e)):
            raise
        first = " ".join(str(e).split())[:160]
        raise ConfigError(field, f"out of memory ({first}){'; ' + hint if hint else ''}") from e


def lazy_exports(package: str, exports: dict[str, str]):
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) for names its ``__init__`` re-exports: ``exports``
    maps each name to the submodule defining it, imported on first use. So importing a light submodule (a
    package's config) does not import the package's torch code, and `rcm ... --help` needs no torch."""
    import importlib
    import sys

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
