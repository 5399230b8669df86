"""rcm: few-step video generation by rCM distillation. Start with docs/layout.md for the map of the package."""


class ConfigError(ValueError):
    """A bad value of one configuration field: ``ConfigError("batch_size", "must be >= 1, got 0")``.

    Library code names the field, not a command-line flag; ``cli.py`` turns the field (and where the
    config sits in the command's config) into the flag the user typed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class PathArgumentError(ConfigError, FileNotFoundError):
    """A path field naming nothing on disk (both a ConfigError and a FileNotFoundError)."""
