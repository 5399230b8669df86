"""The house stays a house (docs/layout.md): no import circle, the engine imports no application and no
command, at most four modules at the `rcm/` top level, no source file over 500 lines, one writer of
videos, one progress bar, one device sync."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import rcm

ROOT = Path(rcm.__file__).resolve().parent
APPLICATIONS = ("rcm.digits", "rcm.wan", "rcm.bench", "rcm.sample", "rcm.pipeline")


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """rcm modules that `path` imports anywhere (module level or inside functions), resolved to files."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("rcm") and name in MODULES:
                out.add(name)
    return out


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _package_of(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]


def test_every_module_imports():
    for info in pkgutil.walk_packages(rcm.__path__, "rcm."):
        importlib.import_module(info.name)


def test_no_import_circle():
    """Modules form a DAG once a package's __init__ (which only gathers its own modules) is seen through."""
    def edges(name):  # `import rcm.x` runs rcm/x/__init__.py: follow it, but not back into the importer's own package
        return {t for t in GRAPH[name] if not (MODULES[t].name == "__init__.py" and name.startswith(t + "."))}

    state: dict[str, int] = {}

    def visit(name, stack):
        state[name] = 1
        for target in edges(name):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target] if target in stack else [name, target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, stack + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_engine_imports_no_application_and_no_command():
    engine = [n for n in GRAPH if n == "rcm.train" or n.startswith("rcm.train.")]
    assert engine
    for name in engine:
        bad = [t for t in GRAPH[name] if t.startswith(APPLICATIONS) or t == "rcm.cli"]
        assert not bad, (name, bad)


def test_top_level_is_packages_and_at_most_four_modules():
    modules = sorted(p.name for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(modules) <= 4, modules


ROOMS = ("rcm/__init__.py", "rcm/cli.py", "rcm/media.py", "rcm/timing.py", "rcm/sample.py", "rcm/pipeline", "rcm/train",
         "rcm/checkpoint", "rcm/digits", "rcm/wan", "rcm/bench", "rcm/parallel/fsdp.py", "cli.py")


@pytest.mark.parametrize("room", ROOMS)
def test_no_source_file_over_500_lines(room):
    path = ROOT.parent / room
    for f in [path] if path.is_file() else sorted(path.rglob("*.py")):
        assert len(f.read_text().splitlines()) <= 500, f


@pytest.mark.parametrize("idea, pattern, home", [
    ("the video writer", "mimwrite(", "rcm/media.py"),
    ("the progress bar", "from rich.progress import", "rcm/timing.py"),
    ("the device sync", "torch.cuda.synchronize(", "rcm/timing.py"),
    ("the line plot", ".line(", "rcm/train/plots.py"),
])
def test_one_implementation_of_each(idea, pattern, home):
    """Outside the kernels' rooms (their own timing loops), each idea is written in its home alone."""
    kernel_rooms = ("kernels", "attention.py")  # rcm/kernels/, rcm/bench/attention.py
    users = sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
                   if pattern in p.read_text() and not set(kernel_rooms) & {*p.parts, p.name})
    assert users == [home], (idea, users)


@pytest.mark.parametrize("package", ["rcm.checkpoint", "rcm.losses", "rcm.models", "rcm.parallel", "rcm.train"])
def test_every_lazily_exported_name_resolves(package):
    """The packages that load their names on first use (``rcm.lazy_exports``) keep `__all__` and the map in step:
    every public name resolves (a name left out of the map would fail `from package import *`)."""
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    assert set(module.__all__) <= set(dir(module))
