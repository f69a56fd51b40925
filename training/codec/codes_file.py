"""The codes file format (.npz): EncodedAudio, save and validated load."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from torch import Tensor

from .files import CodecError, PathLike


CODES_FORMAT_VERSION = 1


@dataclass
class EncodedAudio:
    """Codes of one recording and what is needed to turn them back into audio.

    codes:             per level, int64 ``(n_l,)``, coarsest first; ``n_l = padded / (hop * stride_l)``.
    length:            samples of the original at the model rate (decoded audio is trimmed to it).
    sample_rate:       the model's rate (Hz).
    input_sample_rate: rate of the original file (Hz), for ``--keep-rate``.
    input_length:      samples of the original at its own rate.
    model:             identity of the model that made the codes (config + weight fingerprint).
    """

    codes: List[Tensor]
    length: int
    sample_rate: int
    input_sample_rate: int
    input_length: int
    model: Dict[str, Any] = field(default_factory=dict)
    encode_seconds: float = 0.0

    @property
    def duration(self) -> float:
        return self.length / self.sample_rate


def save_codes(path: PathLike, enc: EncodedAudio) -> Path:
    """Write ``enc`` as ``.npz``: ``codes_0 .. codes_{L-1}`` plus scalar metadata and the model identity."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = int(enc.model.get("config", {}).get("codebook_size", 1 << 31))
    dtype = np.uint16 if size <= 1 << 16 else np.int64
    arrays = {f"codes_{i}": c.detach().cpu().numpy().astype(dtype) for i, c in enumerate(enc.codes)}
    meta = dict(format_version=CODES_FORMAT_VERSION, n_levels=len(enc.codes), length=enc.length,
                sample_rate=enc.sample_rate, input_sample_rate=enc.input_sample_rate,
                input_length=enc.input_length)
    arrays.update({k: np.asarray(v, dtype=np.int64) for k, v in meta.items()})
    arrays["model"] = np.asarray(json.dumps(enc.model, sort_keys=True))
    tmp = path.with_name(f".{path.name}.tmp.npz")  # np.savez appends .npz to other names
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_codes(path: PathLike) -> EncodedAudio:
    """Read a codes file written by :func:`save_codes`; structural problems raise CodecError."""
    path = Path(path)
    if not path.is_file():
        raise CodecError(f"{path}: codes file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zip/npy/pickle errors all mean "not a codes file"
        raise CodecError(f"{path}: not a codes file ({type(e).__name__})") from None
    needed = ("format_version", "n_levels", "length", "sample_rate", "input_sample_rate", "input_length", "model")
    missing = [k for k in needed if k not in data]
    if missing:
        raise CodecError(f"{path}: not a codes file of this toolkit (missing {', '.join(missing)})")
    if int(data["format_version"]) != CODES_FORMAT_VERSION:
        raise CodecError(f"{path}: codes format version {int(data['format_version'])} is not supported "
                         f"(expected {CODES_FORMAT_VERSION})")
    n = int(data["n_levels"])
    levels = [data.get(f"codes_{i}") for i in range(n)]
    if any(c is None or c.ndim != 1 or c.dtype.kind not in "iu" for c in levels):
        raise CodecError(f"{path}: codes must be {n} one-dimensional integer arrays codes_0..codes_{n - 1}")
    try:
        model = json.loads(str(data["model"]))
    except json.JSONDecodeError:
        raise CodecError(f"{path}: model identity is not valid JSON") from None
    return EncodedAudio(codes=[torch.from_numpy(c.astype(np.int64)) for c in levels], length=int(data["length"]),
                        sample_rate=int(data["sample_rate"]), input_sample_rate=int(data["input_sample_rate"]),
                        input_length=int(data["input_length"]), model=model)
