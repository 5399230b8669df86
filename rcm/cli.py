"""rcm command line: tyro dataclass configs, one subcommand per job.

    rcm distill [digits]        distill the shipped digits teacher with rCM (the embedded default)
    rcm distill digits-i2v      the same, image to video (the first frame given; --experts two: two experts)
    rcm distill wan2.1-t2v-1.3b | wan2.1-t2v-14b | wan
                                distill a Wan2.1 teacher on an `rcm synth` dataset (the reference's recipe)
    rcm sample [digits]         sample the digits teacher or a distilled digits student
    rcm sample wan2.1-t2v-1.3b | wan2.1-t2v-14b | wan2.1-i2v-14b | wan2.2-ti2v-5b | wan2.2-t2v-a14b
               | wan2.2-i2v-a14b | wan
                                text (or image, --image) to video with a Wan teacher or distilled student
    rcm synth                   write a Wan latent dataset (teacher samples, videos or existing latents)
    rcm export                  one network of a training checkpoint (any world size) as a safetensors file,
                                or a Wan DiT as an official / diffusers folder (--layout)
    rcm eval                    per-frame quality / consistency / diversity table of the teacher and finished runs
    rcm study                   convergence study: rCM, DMD2, sCM at equal budgets, scored at 1/2/4 steps vs iterations
    rcm plot RUN                a run's log.jsonl as RUN/log.png (a panel per loss term, g-norm, lr, ...)
    rcm train-teacher           train the digits teacher from scratch (how the shipped one was made)
    rcm train-i2v-teacher       fine-tune it into the image-to-video digits teacher (how the shipped one was made)
    rcm train-classifier        train the digit-clip classifier used by `rcm eval` (how the shipped one was made)
    rcm bench attention         attention kernels side by side
    rcm bench step              one rCM training iteration of a Wan DiT, phase by phase, eager vs compiled
    rcm bench sample            few-step student vs 50-step teacher sampling of a Wan DiT
    rcm bench i2v               Wan2.2 TI2V-5B / A14B-shaped I2V sampling and a 5B rCM iteration, eager vs compiled

User errors (bad paths, values, files) print one line and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Command:
    """One runnable job: its config (a dataclass type, or a default instance) and the function taking it,
    named ``"module:function"`` and imported only once the arguments are parsed: the configs import no torch,
    so a command's help does not wait for it."""

    config: Any
    run: str
    description: str = ""

    def function(self) -> Callable:
        import importlib

        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Group:
    """Subcommands of one command (`rcm distill <model>`); ``default`` runs when none is named."""

    commands: dict[str, Command]
    default: str | None = None
    description: str | None = None  # the group's help text (`rcm distill --help`)


def _commands() -> dict[str, Command | Group]:
    """Every command: its config (from a torch-free config module) and where its code is. Built only when a
    command is named, so `rcm --help` imports nothing of the package."""
    from rcm.bench import config as bench
    from rcm.checkpoint.export import ExportConfig
    from rcm.digits import config as digits
    from rcm.train.plots import PlotConfig
    from rcm.wan import config as wan

    wan_sizes = {"wan2.1-t2v-1.3b": "Wan2.1 T2V 1.3B", "wan2.1-t2v-14b": "Wan2.1 T2V 14B",
                 "wan": "any Wan2.1 T2V DiT (architecture read from its files)"}
    distill = {"digits": Command(digits.DigitsDistillConfig(), "rcm.digits.task:distill_digits",
                                 "the digits demo (the default)"),
               "digits-i2v": Command(digits.DigitsI2VDistillConfig(), "rcm.digits.i2v:distill_digits_i2v",
                                     "image-to-video digits: the first frame given (--experts two: two experts)")}
    distill |= {m: Command(wan.WAN_DISTILL_PRESETS[m], "rcm.wan.task:distill_wan",
                           f"{d}, the reference's {'14B' if '14b' in m else '1.3B'} recipe") for m, d in wan_sizes.items()}
    sample = {"digits": Command(digits.DigitsSampleConfig(), "rcm.digits.sample:sample_digits",
                                "the digits demo (the default)")}
    wan_sample_models = {**wan_sizes, "wan": "any Wan DiT or two-expert folder (architecture read from its files)",
                         "wan2.1-i2v-14b": "Wan2.1 I2V 14B (--image, --image-encoder-path)",
                         "wan2.2-ti2v-5b": "Wan2.2 TI2V 5B (text, or --image)",
                         "wan2.2-t2v-a14b": "Wan2.2 T2V A14B (two experts)",
                         "wan2.2-i2v-a14b": "Wan2.2 I2V A14B (two experts, --image)"}
    sample |= {m: Command(wan.WanSampleConfig(model=m), "rcm.wan.sample:sample_wan", d)
               for m, d in wan_sample_models.items()}
    return {
        "distill": Group(distill, default="digits", description=(
            "Distill a teacher into a 1-4 step student with rCM (or sCM / DMD2 alone). With no model name: the\n"
            "digits demo (`rcm distill digits --help`). Wan2.1: `rcm distill wan2.1-t2v-1.3b --teacher DIT --data\n"
            "DATASET` (`rcm synth` makes the dataset; `wan` reads the architecture from the teacher). The\n"
            "defaults of each size (docs/method.md §5.1):\n\n" + wan.wan_defaults_table())),
        "sample": Group(sample, default="digits"),
        "synth": Command(wan.SynthConfig, "rcm.wan.synth:synth"),
        "export": Command(ExportConfig, "rcm.checkpoint.export:export"),
        "eval": Command(digits.EvalRunsConfig, "rcm.digits.evaluate:eval_runs"),
        "study": Command(digits.StudyConfig, "rcm.digits.study:run_study"),
        "plot": Command(PlotConfig, "rcm.train.plots:plot_run"),
        "train-teacher": Command(digits.TrainTeacherConfig, "rcm.digits.teacher:train_teacher"),
        "train-i2v-teacher": Command(digits.FinetuneI2VConfig, "rcm.digits.i2v:finetune_i2v_teacher"),
        "train-classifier": Command(digits.TrainClassifierConfig, "rcm.digits.classifier:train_classifier"),
        "bench": Group({"attention": Command(bench.BenchAttentionConfig, "rcm.bench.attention:bench_attention"),
                        "step": Command(bench.BenchStepConfig, "rcm.bench.step:bench_step"),
                        "sample": Command(bench.BenchSampleConfig, "rcm.bench.sample:bench_sample"),
                        "i2v": Command(bench.BenchI2VConfig, "rcm.bench.i2v:bench_i2v")}),
    }


def _user_errors() -> tuple[type[BaseException], ...]:
    from rcm.checkpoint import CheckpointError

    return (ValueError, OSError, CheckpointError)  # OSError: a path the user named (full disk, no permission ...)


def _run_failures() -> tuple[type[BaseException], ...]:
    """A run that stopped on its own (e.g. too many non-finite steps): one line, exit status 1."""
    from rcm.train import NonFiniteError

    return (NonFiniteError,)


class _ParseError(Exception):
    """tyro rejected the arguments (unknown flag, bad value or choice, a config's own check)."""


def _flag(name: str) -> str:
    """A config field's dotted path (``student_optim.lr``) as the flag that sets it (``--student-optim.lr``)."""
    return "--" + name.replace("_", "-")


def _config_error_message(exc: BaseException | None) -> str | None:
    """The one line of an error raised while tyro built the config, naming the flag it concerns.

    tyro wraps a nested config's error (raised in its ``__post_init__``) in an exception whose ``arg`` is
    that config's field path; a ``ConfigError`` adds its own field to it. None when nothing names a field."""
    from rcm import ConfigError

    prefix, seen = "", set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConfigError):
            return f"{_flag('.'.join(p for p in (prefix, exc.field) if p))}: {' '.join(exc.message.split())}"
        arg = getattr(exc, "arg", None)
        if isinstance(arg, str) and not prefix:  # e.g. "__tyro-dummy-inner__.student-optim": the field path
            parts = [p for p in arg.split(".") if p and not p.startswith("__") and p[0].islower()]
            prefix = ".".join(parts)
        last = exc
        exc = exc.__cause__ or exc.__context__
    if prefix:
        return f"{_flag(prefix)}: {' '.join(str(last.args[0] if last.args else last).split())}"
    return None


def _known_flags(config: Any, prefix: str = "") -> list[str]:
    """The flags of a config (a dataclass type or instance) as tyro spells them: nested configs dotted
    (``--loop.iterations``), booleans with their ``--no-`` twin."""
    import dataclasses
    import typing

    cls = config if isinstance(config, type) else type(config)
    if not dataclasses.is_dataclass(cls):
        return []
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved here: the field names alone
        hints = {}
    flags = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        kind = hints.get(f.name, f.type)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            flags += _known_flags(kind, name + ".")
            continue
        flags.append(_flag(name))
        if kind is bool:
            flags.append(_flag(".".join([*name.split(".")[:-1], "no-" + name.split(".")[-1]])))
    return flags


def _suggestions(token: str, flags: list[str]) -> list[str]:
    """Flags close to an unrecognized ``token``: the same last part (``--iterations`` → ``--loop.iterations``),
    then near spellings."""
    import difflib

    name = token.split("=", 1)[0].replace("_", "-")
    if not name.startswith("--"):
        return []
    last = name[2:].split(".")[-1]
    same = [f for f in flags if f[2:].split(".")[-1] == last and f != name]
    return (same or difflib.get_close_matches(name, flags, n=3, cutoff=0.75))[:3]


_current_flags: list[str] = []  # the flags of the config being parsed, for suggestions


def _parse_error_message(event) -> str:
    """One line for a tyro parse-error event (structured fields, never its rendered box)."""
    from tyro import _errors as events

    def flag(argument) -> str:
        try:
            return "/".join(argument.lowered.name_or_flags) or str(argument.lowered.metavar)
        except AttributeError:
            return "argument"

    if isinstance(event, events.InstantiationFailure):
        message = _config_error_message(sys.exc_info()[1])
        if message is not None:
            return message
        text = " ".join(str(event.message).split())
        return f"{flag(event.argument)}: {text}" if event.argument is not None else text
    if isinstance(event, events.InvalidChoice):
        return f"{flag(event.argument)}: invalid choice {event.value!r}; choose from {', '.join(event.choices)}"
    if isinstance(event, events.BadValue):
        got = f" {event.offending_value!r}" if event.offending_value is not None else ""
        return f"{flag(event.argument)}: {'expected more values' if got == '' else 'cannot take' + got}"
    if isinstance(event, events.UnrecognizedArgs):
        hints = [s for t in event.tokens for s in _suggestions(str(t), _current_flags)]
        return (f"unrecognized arguments: {' '.join(map(str, event.tokens))}"
                + (f"; perhaps you meant: {', '.join(dict.fromkeys(hints))}" if hints else ""))
    if isinstance(event, events.MissingArgs):
        names = [flag(a.arg) for a in event.missing_arguments]
        return f"missing required arguments: {', '.join(names)}"
    if isinstance(event, events.MissingSubcommand):
        return "a subcommand is needed"
    return type(event).__name__


def _raise_parse_error(event) -> None:
    """tyro's parse-error hook (``tyro._errors.on_parse_error``): one line instead of tyro's box."""
    raise _ParseError(_parse_error_message(event))


def _parse(config: Any, args: list[str], prog: str):
    """`tyro.cli` with every rejection turned into one `_ParseError` line."""
    import tyro
    from tyro import _errors

    cls, default = (config, None) if isinstance(config, type) else (type(config), config)
    _current_flags[:] = _known_flags(config)
    with _errors.on_parse_error(_raise_parse_error):
        return tyro.cli(cls, args=args, prog=prog, default=default)


def _parse_group(group: Group, args: list[str], prog: str) -> tuple[Any, Callable]:
    """A subcommand of ``group`` through tyro's own subcommand API (a Union of annotated configs). With a
    default, arguments that name no subcommand go to it: `rcm distill --method scm` is `rcm distill
    digits --method scm`. Returns (config, the function that runs it)."""
    from typing import Annotated, Union

    import tyro
    from tyro import _errors

    names = list(group.commands)
    if group.default is not None and (not args or (args[0] not in names and args[0] not in ("-h", "--help"))):
        args = [group.default, *args]
    if group.default is None and args and args[0] not in names and args[0] not in ("-h", "--help"):
        raise _ParseError(f"unknown subcommand {args[0]!r}; choose from {', '.join(names)}")
    if group.default is None and not args:
        raise _ParseError(f"a subcommand is needed; choose from {', '.join(names)}")
    options = []
    for name, cmd in group.commands.items():
        cls, default = (cmd.config, None) if isinstance(cmd.config, type) else (type(cmd.config), cmd.config)
        options.append(Annotated[cls, tyro.conf.subcommand(name, default=default, description=cmd.description,
                                                           prefix_name=False)])
    _current_flags[:] = _known_flags(group.commands[args[0]].config) if args and args[0] in names else []
    with _errors.on_parse_error(_raise_parse_error):
        config = tyro.cli(Union[tuple(options)], args=args, prog=prog,  # noqa: UP007
                          description=group.description, config=(tyro.conf.OmitSubcommandPrefixes,))
    return config, group.commands[args[0]].function()  # tyro has exited on --help: args[0] names the subcommand


def _help_command(command: Command | Group, rest: list[str], prog: str) -> str:
    """The help that lists the flags of what was parsed: a group's subcommand (named, or the default)."""
    if isinstance(command, Group):
        if rest and rest[0] in command.commands:
            return f"{prog} {rest[0]} --help"
        if command.default is not None and rest:
            return f"{prog} {command.default} --help"
    return f"{prog} --help"


def _end_distributed() -> None:
    """Destroy the default process group (under torchrun, the one the command started) once the command
    has finished on this rank.

    Left to interpreter shutdown, gloo's worker threads can outlive Python and abort the process
    (SIGABRT, "terminate called without an active exception") after a run that succeeded. Only on
    success: after an error another rank may still be inside a collective, and destroying would hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# What a raw OSError of the system (``[Errno 17] File exists: 'x'``) means, as a sentence naming the path.
_OS_ERRORS = {
    FileExistsError: "cannot create {path}: a file or folder of that name is in the way",
    FileNotFoundError: "no such file or folder: {path}",
    NotADirectoryError: "cannot use {path}: a part of that path is a file, not a folder",
    IsADirectoryError: "{path} is a folder; a file is needed there",
    PermissionError: "permission denied: {path}",
}


def _shown_path(name) -> str:
    """A path as the user named it: a temporary (``.out.mp4.tmp-…``) is shown as the output it stands for."""
    import re
    from pathlib import Path

    path = Path(str(name))
    original = re.fullmatch(r"\.(.+)\.tmp[-.\w]*", path.name)
    return str(path.with_name(original.group(1)) if original else path)


def _user_error_line(e: BaseException) -> str:
    """A user error's one line: a ConfigError raised while running names the flag of its field; a system
    error (an OSError with a file name) becomes a sentence naming the path, never ``[Errno N]``."""
    from rcm import ConfigError

    if isinstance(e, ConfigError):
        return f"{_flag(e.field)}: {' '.join(e.message.split())}"
    if isinstance(e, OSError) and e.filename is not None:
        path = _shown_path(e.filename)
        template = next((t for cls, t in _OS_ERRORS.items() if isinstance(e, cls)), None)
        return template.format(path=path) if template else f"{path}: {e.strerror or type(e).__name__}"
    return " ".join(str(e).split()) or type(e).__name__


def _out_of_memory_line(e: BaseException) -> str | None:
    """An out-of-memory error that no config check caught (a size nobody estimated), as one line."""
    from rcm import is_out_of_memory

    if not (isinstance(e, MemoryError) or is_out_of_memory(e)):
        return None
    return (f"out of memory ({' '.join(str(e).split())[:160]}); lower the sizes given (--batch-size, "
            f"--num-samples, the resolution or frames)")


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
        sys.stdout.flush()  # here, not at exit: a reader that left (`rcm --help | head`) fails this flush
    except BrokenPipeError:
        # the reader stopped reading: no traceback and no "error"; stdout to devnull so the exit-time flush
        # fails no more, and the status of a process killed by SIGPIPE (128 + 13)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None


def _main(argv: list[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0)
    commands = _commands()
    if argv[0] not in commands:
        print(f"rcm: error: unknown command {argv[0]!r}; choose from {', '.join(sorted(commands))}", file=sys.stderr)
        raise SystemExit(2)
    name, rest = argv[0], argv[1:]
    command, prog = commands[name], f"rcm {name}"
    if not debug:  # a warning is one line, like an error (a fallback to an older checkpoint, say)
        warnings.formatwarning = lambda message, category, *args, **kwargs: f"rcm: warning: {message}\n"
    try:
        if isinstance(command, Group):
            config, run = _parse_group(command, rest, prog)
        else:
            config, run = _parse(command.config, rest, prog), command.function()
        run(config)
        _end_distributed()
    except (BrokenPipeError, SystemExit):
        raise  # the reader of our output left (main), or tyro printed the help: before the clauses below import torch
    except _ParseError as e:
        print(f"rcm: error: {e.args[0]} (see {_help_command(command, rest, prog)})", file=sys.stderr)
        raise SystemExit(2)
    except _user_errors() as e:
        if debug:
            raise
        print(f"rcm: error: {_user_error_line(e)}", file=sys.stderr)
        raise SystemExit(2)
    except _run_failures() as e:
        if debug:
            raise
        print(f"rcm: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1)
    except (RuntimeError, MemoryError) as e:
        line = _out_of_memory_line(e)
        if debug or line is None:
            raise
        print(f"rcm: error: {line}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("rcm: interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
