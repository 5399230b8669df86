"""`python -m rcm`: the command line (``rcm.cli``), as the installed `rcm` command runs it."""

from rcm.cli import main

if __name__ == "__main__":
    main()
