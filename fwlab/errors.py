"""Errors fwlab reports to the user as one clear line (no traceback) and exit status 2."""


class FwlabError(Exception):
    """Base of every error that is the user's input, not a bug in fwlab."""


class RegistryError(FwlabError):
    """An unknown, duplicate or broken plugin name."""


class ConfigError(FwlabError, ValueError):
    """An unknown key, a bad value, or a missing file in the configuration (a ``ValueError`` as
    well, for Python callers that construct a plugin from a config themselves)."""


class IncompatibleError(FwlabError):
    """A model and a datamodule that cannot be trained together."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says where it stopped and how to continue it. Reported
    as ``fwlab: interrupted ...``, exit status 130, as any Ctrl-C fwlab sees."""
