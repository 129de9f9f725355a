"""The one error type users see: a bad input, reported as one line naming where it is."""


class ConfigError(Exception):
    """Bad input. ``path`` is the dotted config path (or a file / option name); exit status 2."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message

    def at(self, prefix: str) -> "ConfigError":
        """The same error re-rooted under ``prefix`` (e.g. ``model.quantizer``); a path already under
        it (a plugin that named ``data.root`` itself) is kept, not doubled."""
        if prefix and self.path and (self.path == prefix or self.path.startswith(prefix + ".")):
            return ConfigError(self.path, self.message)
        path = f"{prefix}.{self.path}" if self.path and prefix else (prefix or self.path)
        return ConfigError(path, self.message)


class RunError(Exception):
    """Something that only shows during a run (a corrupt image, a non-finite loss from a legal
    config): the run ends FAILED and the command prints one line, ``<where>: <what>``. Built from a
    single message so DataLoader worker processes can re-raise it."""


class DataError(RunError):
    """A data file that cannot be read or decoded; the message starts with the file's path."""


def one_line(e: BaseException) -> str:
    """The error's message on one line (a DataLoader worker wraps it in a traceback: keep its last line)."""
    text = str(e).strip()
    lines = text.splitlines()
    if "Original Traceback" in text and lines:
        last = lines[-1]
        name = f"{type(e).__module__}.{type(e).__name__}: "
        return last[len(name):] if last.startswith(name) else last.split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines) or type(e).__name__
