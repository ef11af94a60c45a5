"""One error style for every command.

Bad input is one line on stderr, `COMMAND: error: WHAT (FILE/KEY) — WHAT TO DO`, and exit code
2, with no traceback (`PN_DEBUG=1` shows it). Every error a user can fix derives from
`UserError` (`ConfigError`: a config file, key or value that cannot work); any other exception
is a bug and keeps its traceback. Commands run their work through `run_command` and parse their
arguments with `ArgumentParser` (argparse's own errors on the same one line).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

DEBUG_VARIABLE = "PN_DEBUG"


class UserError(ValueError):
    """Bad input: the message names the file or key and says what to do. A subclass may set
    another `exit_code` (e.g. 1: a save that failed for lack of disk, not for bad input)."""

    exit_code = 2


class ConfigError(UserError):
    """A config file, key or value that cannot work."""


def require(condition: bool, message: str) -> None:
    """The config checks' one form: a ConfigError with `message` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def one_line(err: BaseException | str) -> str:
    """A message on one line (YAML and library errors span several)."""
    return " ".join(str(err).split())


def run_command(prog: str, work: Callable[[], int | None],
                user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """work()'s exit code; a UserError (or one of `user_errors`) is one line on the first rank
    and its `exit_code` (2: bad input)."""
    try:
        return int(work() or 0)
    except (UserError, *user_errors) as err:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return getattr(err, "exit_code", 2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
