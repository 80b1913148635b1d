"""Errors in the user's data or config: their message names the file, record and field (or the option), so the
command line prints that message alone and exits non-zero; `ALPACA_RLHF_DEBUG=1` shows the traceback too."""

from __future__ import annotations


class UserError(Exception):
    """Base class: the message says everything a user needs; no traceback by default."""


class DataValidationError(UserError, ValueError):
    """A record or data file is unusable; the message names the file, the record's index and the field."""


class ConfigError(UserError, ValueError):
    """An option's value cannot work; the message names the option."""


# also printed as one line: a missing earlier-stage folder or data file, an output folder that is in the way, a run
# stopped by the non-finite guard; each of their messages here names the path or the cause
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, FloatingPointError)
