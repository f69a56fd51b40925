"""Shared command-line plumbing: user mistakes become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn, Tuple, Type

from .config import ConfigError


def user_error_types() -> Tuple[Type[BaseException], ...]:
    """Exception types that mean "the input was wrong", not "the program is broken"."""
    from .model import ModelLoadError

    types = [ConfigError, ModelLoadError, FileNotFoundError]
    try:
        from .audio import AudioReadError

        types.append(AudioReadError)
    except ImportError:
        pass
    try:
        from .dataset import DatasetError

        types.append(DatasetError)
    except ImportError:
        pass
    try:
        from .train import TrainingError

        types.append(TrainingError)
    except ImportError:
        pass
    return tuple(types)


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextmanager
def guard() -> Iterator[None]:
    """Turn user-input errors into ``error: <message>`` + exit 2; Ctrl-C into exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except user_error_types() as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one ``error:`` line (not usage + message), exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")
