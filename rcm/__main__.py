"""`python -m rcm` and the installed `rcm` command: the package's door to the command line.

The commands live in the repository's top-level `cli.py` (the design card's place for them; every command
is one line of its `_commands`); this entry point is what `[project.scripts]` names, so the installed
command is served from inside the package."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from cli import main as cli_main

    cli_main(argv)


if __name__ == "__main__":
    main()
