"""Input discovery, output path planning and the error type of file and folder inference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..audio import list_audio_files


PathLike = Union[str, os.PathLike]


class CodecError(ValueError):
    """A user-facing inference problem: bad codes file, wrong model, bad arguments or paths."""


def collect_inputs(path: PathLike, suffixes: Optional[Tuple[str, ...]] = None, recursive: bool = True) -> Tuple[List[Path], Optional[Path]]:
    """Files to process: ``([path], None)`` for a file, ``(files, root)`` for a folder.

    ``suffixes``: accepted extensions for folders (default: audio files). Raises CodecError for a
    missing path or a folder without matching files.
    """
    p = Path(path)
    if p.is_file():
        return [p], None
    if not p.exists():
        raise CodecError(f"input not found: {p}")
    if not p.is_dir():
        raise CodecError(f"input is neither a file nor a folder: {p}")
    if suffixes is None:
        files = list_audio_files(p, recursive=recursive)
        what = "audio files"
    else:
        pattern = p.rglob("*") if recursive else p.glob("*")
        files = sorted(f for f in pattern if f.is_file() and f.suffix.lower() in suffixes)
        what = "/".join(suffixes) + " files"
    if not files:
        raise CodecError(f"no {what} found in {p}{' (searched recursively)' if recursive else ''}")
    return files, p


def output_paths(inputs: Sequence[Path], root: Optional[Path], output: PathLike, suffix: str) -> List[Path]:
    """Output path per input: ``output`` itself for one file, else the input's relative path
    under ``output`` with ``suffix`` (``name.ext`` + suffix where two inputs would collide)."""
    out = Path(output)
    if root is None:
        return [out]
    rels = [i.relative_to(root) for i in inputs]
    plain = [out / r.with_suffix(suffix) for r in rels]
    dup = {p for p in plain if plain.count(p) > 1}
    return [out / r.parent / (r.name + suffix) if p in dup else p for r, p in zip(rels, plain)]


def refuse_overwriting_inputs(inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
    """CodecError if any output would replace one of the inputs."""
    resolved = {p.resolve() for p in inputs}
    for o in outputs:
        if o.resolve() in resolved:
            raise CodecError(f"output {o} would overwrite an input file; choose another output path")
