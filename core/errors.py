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
