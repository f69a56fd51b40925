"""Shared command-line plumbing: user mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import errno
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn, Tuple, Type

from .config import ConfigError
from .errors import TrainingStopped, first_line


def loaded_types(*names: str) -> Tuple[Type[BaseException], ...]:
    """The exception classes named ``"module:Class"`` whose module is already imported.

    An exception can only be raised once its class's module has been imported, so matching
    against the loaded ones catches every instance without importing anything: a bad flag or
    config value is answered before torch (about 1.5 s) loads."""
    found = []
    for name in names:
        module, _, attribute = name.partition(":")
        cls = getattr(sys.modules.get(module), attribute, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def user_error_types() -> Tuple[Type[BaseException], ...]:
    """Exception types that mean "the input was wrong", not "the program is broken"."""
    return (ConfigError, FileNotFoundError) + loaded_types(
        "training.hub:ModelLoadError", "training.audio:AudioReadError", "training.dataset.sources:DatasetError",
        "training.state:TrainingError")


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# Environment errors the user can fix (permissions, a full disk, a path that is not a folder):
# exit 2 like a bad flag. Any other OSError (I/O error, ...) is one line with exit 1.
USER_FIXABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                                 errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP})


def os_error_message(e: OSError) -> str:
    """``Permission denied: /path`` from an OSError (strerror and the file names it carries)."""
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    text = e.strerror or str(e) or type(e).__name__
    return f"{text}: {' -> '.join(names)}" if names else text


def os_error_exit_code(e: OSError) -> int:
    return 2 if e.errno in USER_FIXABLE_ERRNOS else 1


@contextmanager
def guard() -> Iterator[None]:
    """Turn user-input errors into ``error: <message>`` + exit 2 (or the exception's own
    ``exit_code``, e.g. 1 for a failed collective), environment errors (OSError) into one line +
    exit 2 (user fixable) or 1, Ctrl-C before training into exit 130, and a run stopped by a
    signal into its line + exit 128 + signal number."""
    try:
        yield
    except TrainingStopped as e:
        if e.announce:
            print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except user_error_types() as e:
        fail(first_line(e), getattr(e, "exit_code", 2))
    except OSError as e:
        fail(os_error_message(e), os_error_exit_code(e))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one ``error:`` line (not usage + message), exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")
