"""The error every config problem raises: a bad key, type, value or file, named in its message (exit code 2)."""


class ConfigError(ValueError):
    pass
