"""rcm command line (tyro). Subcommands are wired in as the package grows."""


def main() -> None:
    raise SystemExit("rcm: no subcommands yet")


if __name__ == "__main__":
    main()
