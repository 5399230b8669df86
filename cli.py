"""The command line, where the design card puts it: `python cli.py distill ...` in a checkout is `rcm distill ...`.

The commands live in the package (``rcm/cli.py``: one tyro dataclass config per job, each job's code in its own
module), so the installed `rcm` command and `python -m rcm` need nothing outside it."""

from rcm.cli import main

if __name__ == "__main__":
    main()
