"""rcm command line: tyro dataclass configs, one subcommand per job.

    rcm distill                 distill the shipped digits teacher with rCM (the embedded default)
    rcm sample                  sample a teacher or a distilled student
    rcm synth                   write a Wan latent dataset (teacher samples, videos or existing latents)
    rcm export                  one network of a training checkpoint (any world size) as a safetensors file
    rcm eval                    quality / diversity table of the teacher and finished distill runs
    rcm train-teacher           train the digits teacher from scratch (how the shipped one was made)
    rcm train-classifier        train the digit-clip classifier used by `rcm eval` (how the shipped one was made)
    rcm bench attention         attention kernels side by side
    rcm bench step              one rCM training iteration of a Wan DiT, phase by phase, eager vs compiled
    rcm bench sample            few-step student vs 50-step teacher sampling of a Wan DiT

User errors (bad paths, values, files) print one line and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import re
import sys
from typing import Callable


def _commands() -> dict[str, tuple[type, Callable]]:
    """name -> (config dataclass, function taking it). Imported lazily so `rcm --help` is quick."""
    from rcm import bench_attention, bench_wan, checkpoint, demo, evaluate, sample, synth, tasks, train

    return {
        "distill": (train.DistillConfig, train.distill),
        "sample": (sample.SampleConfig, sample.sample),
        "synth": (synth.SynthConfig, synth.synth),
        "export": (checkpoint.ExportConfig, checkpoint.export),
        "eval": (tasks.EvalRunsConfig, tasks.eval_runs),
        "train-teacher": (demo.TrainTeacherConfig, demo.train_teacher),
        "train-classifier": (evaluate.TrainClassifierConfig, evaluate.train_classifier),
        "bench attention": (bench_attention.BenchAttentionConfig, bench_attention.bench_attention),
        "bench step": (bench_wan.BenchStepConfig, bench_wan.bench_step),
        "bench sample": (bench_wan.BenchSampleConfig, bench_wan.bench_sample),
    }


def _user_errors() -> tuple[type[BaseException], ...]:
    from rcm.checkpoint import CheckpointError

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError,
            CheckpointError)


def _run_failures() -> tuple[type[BaseException], ...]:
    """A run that stopped on its own (e.g. too many non-finite steps): one line, exit status 1."""
    from rcm.train import NonFiniteError

    return (NonFiniteError,)


class _ParseError(Exception):
    """tyro rejected the arguments (unknown flag, bad value or choice, a config's own check)."""


_RULE = set("─━-│┃╭╮╰╯ ")  # box edges and rules, UTF-8 or ASCII (tyro draws ASCII when stdout is not UTF-8)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(boxed: str) -> str:
    """tyro's boxed error -> its first paragraph on one line (the title when the box has nothing else)."""
    lines = [_ANSI.sub("", line).strip() for line in boxed.splitlines()]
    lines = [line for line in lines if line]
    title = lines[0].strip("─━╭╮ ") if lines else ""
    paragraph: list[str] = []
    for line in lines[1:]:
        if set(line) <= _RULE:  # a rule or the bottom edge: ends the first paragraph (skipped before it)
            if paragraph:
                break
            continue
        paragraph.append(line.strip("│┃ "))
    message = " ".join(" ".join(paragraph).split()) or title or "invalid arguments"
    message = re.sub(r"^Error parsing [A-Z]\w*: ", "", message)  # a check of the whole config
    return re.sub(r"^Error parsing ([a-z][\w.-]*): ", lambda m: f"--{m[1].replace('_', '-')}: ", message)  # of a group


def _parse(config_cls: type, args: list[str], prog: str):
    """`tyro.cli`, with its multi-line error boxes turned into one `_ParseError` line (help is untouched)."""
    import contextlib
    import io
    import os

    import tyro

    if "-h" in args or "--help" in args:
        return tyro.cli(config_cls, args=args, prog=prog)
    captured, columns = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100000"  # tyro wraps its boxes to the terminal: one paragraph per line
    try:
        with contextlib.redirect_stderr(captured):
            config = tyro.cli(config_cls, args=args, prog=prog)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise _ParseError(_one_line(captured.getvalue()), captured.getvalue()) from None
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    sys.stderr.write(captured.getvalue())  # warnings, if any
    return config


def _end_distributed() -> None:
    """Destroy the default process group (under torchrun, the one the command started) once the command
    has finished on this rank.

    Left to interpreter shutdown, gloo's worker threads can outlive Python and abort the process
    (SIGABRT, "terminate called without an active exception") after a run that succeeded. Only on
    success: after an error another rank may still be inside a collective, and destroying would hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    commands = _commands()
    groups = sorted({name.split()[0] for name in commands})
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0)
    if argv[0] not in groups:
        print(f"rcm: error: unknown command {argv[0]!r}; choose from {', '.join(groups)}", file=sys.stderr)
        raise SystemExit(2)
    name, rest = argv[0], argv[1:]
    subs = {n.split(" ", 1)[1]: fn for n, fn in commands.items() if n.startswith(name + " ")}
    if subs:  # a group such as `bench`
        if not rest or rest[0] not in subs:
            got = f"unknown subcommand {rest[0]!r}" if rest else "a subcommand is needed"
            print(f"rcm: error: rcm {name}: {got}; choose from {', '.join(sorted(subs))}", file=sys.stderr)
            raise SystemExit(2)
        (config_cls, fn), prog, rest = subs[rest[0]], f"rcm {name} {rest[0]}", rest[1:]
    else:
        (config_cls, fn), prog = commands[name], f"rcm {name}"
    try:
        config = _parse(config_cls, rest, prog)
        fn(config)
        _end_distributed()
    except _ParseError as e:
        if debug:
            print(e.args[1], file=sys.stderr, end="")
        print(f"rcm: error: {e.args[0]} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(2)
    except _user_errors() as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"rcm: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    except _run_failures() as e:
        if debug:
            raise
        print(f"rcm: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("rcm: interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
