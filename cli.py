"""rcm command line: tyro dataclass configs, one subcommand per job.

    rcm distill                 distill the shipped digits teacher with rCM (the embedded default)
    rcm sample                  sample a teacher or a distilled student
    rcm eval                    quality / diversity table of the teacher and finished distill runs
    rcm train-teacher           train the digits teacher from scratch (how the shipped one was made)
    rcm train-classifier        train the digit-clip classifier used by `rcm eval` (how the shipped one was made)
    rcm bench attention         attention kernels side by side

User errors (bad paths, values, files) print one line and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


def _commands() -> dict[str, tuple[type, Callable]]:
    """name -> (config dataclass, function taking it). Imported lazily so `rcm --help` is quick."""
    from rcm import bench_attention, demo, evaluate, sample, tasks, train

    return {
        "distill": (train.DistillConfig, train.distill),
        "sample": (sample.SampleConfig, sample.sample),
        "eval": (tasks.EvalRunsConfig, tasks.eval_runs),
        "train-teacher": (demo.TrainTeacherConfig, demo.train_teacher),
        "train-classifier": (evaluate.TrainClassifierConfig, evaluate.train_classifier),
        "bench attention": (bench_attention.BenchAttentionConfig, bench_attention.bench_attention),
    }


def _user_errors() -> tuple[type[BaseException], ...]:
    from rcm.checkpoint import CheckpointError

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, CheckpointError)


def main(argv: list[str] | None = None) -> None:
    import tyro

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
            print(f"rcm {name}: choose one of {', '.join(sorted(subs))}", file=sys.stderr)
            raise SystemExit(2)
        (config_cls, fn), prog, rest = subs[rest[0]], f"rcm {name} {rest[0]}", rest[1:]
    else:
        (config_cls, fn), prog = commands[name], f"rcm {name}"
    try:
        config = tyro.cli(config_cls, args=rest, prog=prog)
        fn(config)
    except _user_errors() as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"rcm: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("rcm: interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
