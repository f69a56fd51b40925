"""The `python -m training.tokenize` command: save/upload of the finished shards and one-line errors."""

from __future__ import annotations

import sys
from typing import Optional, Sequence, Tuple

from ..errors import first_line
from .pipeline import run
from .save import UploadError
from .settings import TokenizeError, build_parser, settings_from_args


def _user_errors() -> Tuple[type, ...]:
    from ..cli import loaded_types
    from ..config import ConfigError

    return (TokenizeError, ConfigError) + loaded_types(
        "training.codec.files:CodecError", "training.dataset.sources:DatasetError", "training.hub:ModelLoadError")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: exit 0 when done, 2 for bad input (one line on stderr), 1 for a failed upload or crash."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        summary = run(settings)
    except _user_errors() as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except UploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: complete lines were committed; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # an OUT_DIR we may not write (2), a full disk (2), an I/O error (1): rows stay pending
        from ..cli import os_error_exit_code, os_error_message

        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return os_error_exit_code(e)
    except RuntimeError as e:  # a crashed child: rows stay pending for a rerun
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.text())
    return 0
