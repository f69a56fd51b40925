"""Training data: audio datasets from any source, cropping, collation, infinite DDP loaders.

Sources accepted by :class:`AudioDataset` (``source`` argument):

- a ``datasets.Dataset`` / ``DatasetDict`` / ``IterableDataset`` object,
- a Hugging Face hub id (``"openslr/librispeech_asr"``, with ``config_name`` / ``split`` /
  ``streaming``),
- a directory written by ``Dataset.save_to_disk``,
- an ``audiofolder`` directory (``metadata.csv`` / ``metadata.jsonl`` with a ``file_name``
  column, optional split sub-folders),
- an LJ Speech folder (``metadata.csv`` ``id|text|normalized_text`` + ``wavs/``),
- a plain directory tree of audio files,
- a manifest (``.jsonl`` with a ``path`` field, ``.csv`` / ``.tsv`` with a ``path`` header, or a
  ``.txt`` list of paths), e.g. written by ``python -m training.dataset prepare``,
- a name in the prepared-dataset registry (see :func:`registry_path`).

Items are dicts ``{"audio": (1, segment_length) float32, "length": valid samples, "id": str,
"index": int, ["text"], ["speaker"], "skipped": [...]}`` where ``skipped`` lists the
``"id: reason"`` of unreadable inputs replaced while producing the item (so the main process can
report bad files found inside DataLoader workers).

Reproducibility: a map-style item's crop depends only on ``(seed, epoch, index)``, so the same
batch comes out regardless of worker count or process; the infinite loader's position
(epoch, batches consumed) is saved in checkpoints and restored exactly.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .audio import (AudioReadError, audio_info, crop_or_pad, decode_audio, hub_token, list_audio_files,
                    normalize_loudness, open_audio, rms_db)

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".tsv", ".txt")
SPLIT_NAMES = ("train", "validation", "test")


class DatasetError(ValueError):
    """The data configuration cannot produce training items (bad path, nothing readable, ...)."""


# --------------------------------------------------------------------------------------
# Records: random access to raw (undecoded) rows of a source
# --------------------------------------------------------------------------------------


class FileRecords:
    """Rows backed by files on disk: each row a dict with ``path``, ``id`` and optional fields."""

    def __init__(self, rows: List[Dict[str, Any]], description: str):
        self.rows, self.description = rows, description
        self.columns = sorted({k for r in rows[:1000] for k in r})

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> Dict[str, Any]:
        r = dict(self.rows[i])
        r["audio"] = r["path"]
        return r

    def subset(self, indices: Sequence[int]) -> "FileRecords":
        return FileRecords([self.rows[i] for i in indices], self.description)


class HFRecords:
    """Rows of a map-style ``datasets.Dataset``; Audio columns are read undecoded (bytes/path).

    Reading ``{"bytes", "path"}`` and decoding with soundfile is faster than letting ``datasets``
    build a torchcodec decoder per row, and lets us seek to the crop (see benchmarks/bench_data.py).
    """

    def __init__(self, ds: Any, audio_column: str, keep: Sequence[str], description: str):
        _require_columns(ds.column_names, [audio_column, *keep], description)
        ds = ds.select_columns(list(dict.fromkeys([audio_column, *keep, *(["id"] if "id" in ds.column_names else [])])))
        self.ds = _undecoded(ds, audio_column)
        self.audio_column, self.description = audio_column, description
        self.columns = list(ds.column_names)

    def __len__(self) -> int:
        return len(self.ds)

    def row(self, i: int) -> Dict[str, Any]:
        r = dict(self.ds[int(i)])
        r["audio"] = r.pop(self.audio_column)
        return r

    def subset(self, indices: Sequence[int]) -> "HFRecords":
        new = object.__new__(HFRecords)
        new.__dict__.update(self.__dict__)
        new.ds = self.ds.select(list(indices))
        return new


def _undecoded(ds: Any, column: str) -> Any:
    """Cast an ``Audio`` column to ``decode=False`` so rows carry ``{"bytes", "path"}``."""
    from datasets import Audio

    feature = (ds.features or {}).get(column) if getattr(ds, "features", None) is not None else None
    if isinstance(feature, Audio) and feature.decode:
        return ds.cast_column(column, Audio(decode=False))
    return ds


def _require_columns(available: Sequence[str], wanted: Sequence[Optional[str]], description: str) -> None:
    missing = [c for c in wanted if c and c not in available]
    if missing:
        raise DatasetError(f"{description}: column(s) {missing} not found; available columns: {sorted(available)}")


def _row_id(row: Mapping[str, Any], index: int) -> str:
    if row.get("id") is not None:
        return str(row["id"])
    audio = row.get("audio")
    path = audio if isinstance(audio, (str, os.PathLike)) else (audio.get("path") if isinstance(audio, Mapping) else None)
    # A chained URL's first hop names the file itself ("zip://wavs/a.flac::https://host/a.zip").
    return Path(str(path).split("::", 1)[0]).stem if path else str(index)


# --------------------------------------------------------------------------------------
# Local layouts
# --------------------------------------------------------------------------------------


def _folder_rows(root: Path) -> List[Dict[str, Any]]:
    """One row per audio file; the id is the relative path without extension, or with it where
    two files differ only by extension (``a.flac`` and ``a.mp3`` must not share an id)."""
    files = list_audio_files(root)
    stems = [p.relative_to(root).with_suffix("").as_posix() for p in files]
    clash = {s for s, n in collections.Counter(stems).items() if n > 1}
    return [{"path": str(p), "id": p.relative_to(root).as_posix() if s in clash else s,
             "parent": p.parent.relative_to(root).as_posix()} for p, s in zip(files, stems)]


def is_ljspeech_folder(root: Path) -> bool:
    return (root / "metadata.csv").is_file() and (root / "wavs").is_dir()


def _ljspeech_rows(root: Path) -> List[Dict[str, Any]]:
    """``metadata.csv`` (``id|text|normalized_text``, no header) joined with ``wavs/<id>.*``."""
    by_stem = {p.stem: p for p in list_audio_files(root / "wavs")}
    rows = []
    with open(root / "metadata.csv", encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("|")
            if not parts[0]:
                continue
            path = by_stem.get(parts[0])
            if path is None:
                warnings.warn(f"{root}: metadata.csv lists {parts[0]!r} but wavs/ has no such audio file")
                continue
            text = parts[1] if len(parts) > 1 else ""
            rows.append({"path": str(path), "id": parts[0], "text": text,
                         "normalized_text": parts[2] if len(parts) > 2 else text})
    return rows


def _audiofolder_rows(root: Path, split: str) -> Optional[List[Dict[str, Any]]]:
    """Hugging Face ``audiofolder`` layout; None when ``root`` is not one.

    Metadata (``metadata.csv`` or ``metadata.jsonl`` with ``file_name``) lives in the split
    folder (``root/<split>/``) or in ``root``; without a split folder the whole tree is ``train``.
    """
    base = root / split if (root / split).is_dir() else root
    meta = next((base / n for n in ("metadata.jsonl", "metadata.csv") if (base / n).is_file()), None)
    if meta is None:
        return None
    entries = _read_table(meta)
    if not entries or "file_name" not in entries[0]:
        return None
    rows = []
    for e in entries:
        path = base / e["file_name"]
        rows.append({**{k: v for k, v in e.items() if k != "file_name"}, "path": str(path),
                     "id": str(e.get("id") or Path(e["file_name"]).with_suffix("").as_posix())})
    return rows


def _read_table(path: Path) -> List[Dict[str, Any]]:
    """Rows of a JSONL / CSV / TSV file (with a header line)."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            out = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            return out
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    for n, row in enumerate(rows, 2):
        if None in row:  # csv puts surplus fields under the key None
            raise DatasetError(f"{path}:{n}: more fields than header columns (unquoted delimiter?)")
    return rows


def read_manifest(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Manifest rows with absolute ``path`` (relative paths are relative to the manifest)."""
    path = Path(path)
    if path.suffix == ".txt":
        entries = [{"path": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        entries = _read_table(path)
    rows = []
    for n, e in enumerate(entries):
        if not e.get("path"):
            raise DatasetError(f"{path}: entry {n} has no 'path' field")
        p = Path(e["path"])
        p = p if p.is_absolute() else (path.parent / p)
        rows.append({**e, "path": str(p), "id": str(e.get("id") or p.stem)})
    return rows


# --------------------------------------------------------------------------------------
# Registry of prepared datasets
# --------------------------------------------------------------------------------------


def registry_path() -> Path:
    """``$SNAC_DATA_REGISTRY`` (a JSON file, or a folder holding ``registry.json``), else
    ``~/.cache/snac_training/registry.json``."""
    env = os.environ.get("SNAC_DATA_REGISTRY")
    if env:
        p = Path(env).expanduser()
        return p / "registry.json" if (p.is_dir() or not p.suffix) else p
    return Path.home() / ".cache" / "snac_training" / "registry.json"


def load_registry() -> Dict[str, Any]:
    path = registry_path()
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"dataset registry {path} is not valid JSON ({e.msg})") from None


def register_dataset(name: str, entry: Mapping[str, Any]) -> Path:
    """Add or replace ``name`` in the registry (atomic write); returns the registry file."""
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    reg = load_registry()
    reg[name] = dict(entry)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(reg, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def registry_manifest(name: str, split: str) -> Optional[Path]:
    """Manifest of ``split`` of registered dataset ``name``; None when ``name`` is not registered."""
    entry = load_registry().get(name)
    if entry is None:
        return None
    manifests = entry.get("manifests", {})
    if split not in manifests:
        raise DatasetError(f"registered dataset {name!r} has no split {split!r}; it has {sorted(manifests)}")
    return Path(manifests[split])


# --------------------------------------------------------------------------------------
# Resolving a source into records (map-style) or a Hugging Face IterableDataset (streaming)
# --------------------------------------------------------------------------------------


def open_records(source: Any, *, split: str = "train", config_name: Optional[str] = None,
                 streaming: bool = False, audio_column: str = "audio",
                 columns: Sequence[Optional[str]] = (), revision: Optional[str] = None) -> Any:
    """Resolve ``source`` to :class:`FileRecords`, :class:`HFRecords` or an HF ``IterableDataset``.

    ``revision``: hub revision (commit sha, branch, tag, ``refs/pr/N``) when ``source`` is a hub id.

    ``columns``: extra columns (text, speaker) that must exist; a missing one raises
    :class:`DatasetError` listing the available columns.
    """
    wanted = [c for c in columns if c]
    try:
        import datasets as hf
    except ImportError:  # pragma: no cover - datasets is a dependency; keep the message clear
        hf = None
    if hf is not None and isinstance(source, hf.DatasetDict):
        if split not in source:
            raise DatasetError(f"DatasetDict has no split {split!r}; it has {sorted(source)}")
        source = source[split]
    if hf is not None and isinstance(source, hf.IterableDataset):
        _require_columns(source.column_names or [audio_column, *wanted], [audio_column, *wanted], "IterableDataset")
        return _undecoded(source, audio_column)
    if hf is not None and isinstance(source, hf.Dataset):
        records = HFRecords(source, audio_column, wanted, "Dataset")
        return _as_iterable(records) if streaming else records
    if isinstance(source, (list, tuple)):
        rows = [{"path": str(p), "id": Path(str(p)).stem} for p in source]
        return _check_file_records(FileRecords(rows, "file list"), wanted, streaming)
    if not isinstance(source, (str, os.PathLike)):
        raise DatasetError(f"unsupported dataset source of type {type(source).__name__}")
    records = _open_path_or_name(str(source), split, config_name, streaming, audio_column, wanted, revision)
    if isinstance(records, FileRecords):
        return _check_file_records(records, wanted, streaming)
    return records


def _check_file_records(records: FileRecords, wanted: Sequence[str], streaming: bool) -> Any:
    if len(records) == 0:
        raise DatasetError(f"{records.description}: no audio files found")
    _require_columns(records.columns, wanted, records.description)
    return _as_iterable(records) if streaming else records


def _as_iterable(records: Any) -> "_RecordStream":
    return _RecordStream(records)


class _RecordStream:
    """Marks a map-style record source that should be read as a stream (sequential shards)."""

    def __init__(self, records: Any):
        self.records = records


def _open_path_or_name(source: str, split: str, config_name: Optional[str], streaming: bool,
                       audio_column: str, wanted: Sequence[str], revision: Optional[str] = None) -> Any:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DatasetError(f"{path}: a file source must be a manifest ({', '.join(MANIFEST_SUFFIXES)})")
        return FileRecords(read_manifest(path), str(path))
    if path.is_dir():
        return _open_directory(path, split, audio_column, wanted, streaming)
    manifest = registry_manifest(source, split)
    if manifest is not None:
        if not manifest.is_file():
            raise DatasetError(f"registered dataset {source!r}: manifest {manifest} is missing; run prepare again")
        return FileRecords(read_manifest(manifest), f"{source} ({split})")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DatasetError(f"dataset path not found: {source}")
    return _load_hub(source, split, config_name, streaming, audio_column, wanted, revision)


def _open_directory(path: Path, split: str, audio_column: str, wanted: Sequence[str], streaming: bool) -> Any:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        import datasets as hf

        loaded = hf.load_from_disk(str(path))
        return open_records(loaded, split=split, streaming=streaming, audio_column=audio_column, columns=wanted)
    if is_ljspeech_folder(path):
        return FileRecords(_ljspeech_rows(path), f"{path} (LJ Speech)")
    rows = _audiofolder_rows(path, split)
    if rows is not None:
        return FileRecords(rows, f"{path} (audiofolder, {split})")
    base = path / split if (path / split).is_dir() else path
    return FileRecords(_folder_rows(base), str(base))


def _load_hub(source: str, split: str, config_name: Optional[str], streaming: bool,
              audio_column: str, wanted: Sequence[str], revision: Optional[str] = None) -> Any:
    ds = load_hub_dataset(source, config_name, split, streaming=streaming, revision=revision)
    return open_records(ds, split=split, audio_column=audio_column, columns=wanted, streaming=streaming)


def load_hub_dataset(repo_id: str, config_name: Optional[str], split: str, *, streaming: bool = False,
                     revision: Optional[str] = None, num_proc: Optional[int] = None) -> Any:
    """``datasets.load_dataset`` of a hub dataset at ``revision`` with the environment's token.

    Every failure (network, authentication, unknown id / config / split / revision, a revision
    that holds only a loading script or no data) becomes a one-line :class:`DatasetError`.
    """
    import datasets as hf

    kwargs: Dict[str, Any] = dict(split=split, streaming=streaming, revision=revision, token=hub_token())
    if num_proc is not None and not streaming:
        kwargs["num_proc"] = num_proc
    try:
        return hf.load_dataset(repo_id, config_name, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; each becomes one readable line
        pinned = f"revision {revision!r}" if revision else "default branch"
        where = f"{repo_id!r} (config {config_name!r}, split {split!r}, {pinned})"
        raise DatasetError(f"cannot load dataset {where}: {_hub_failure_reason(e)}") from None


def _hub_failure_reason(e: BaseException) -> str:
    """Plain words for the ways ``load_dataset`` fails on a hub repository."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if "Dataset scripts are no longer supported" in text:
        script = text.rsplit("found", 1)[-1].strip() or "a loading script"
        return (f"this revision holds only a loading script ({script}), which datasets >= 4 no longer runs; "
                "pin a revision with parquet data files (data.revision; tokenizer: revision)")
    if type(e).__name__ in ("EmptyDatasetError", "DataFilesNotFoundError"):
        return f"the repository holds no data files at this revision ({first})"
    if "gated" in text or type(e).__name__ == "GatedRepoError":
        return f"{first} Accept its terms on huggingface.co and set HF_TOKEN"
    return first


# --------------------------------------------------------------------------------------
# Turning a raw row into a training item
# --------------------------------------------------------------------------------------


class SegmentReader:
    """Decode a crop of ``segment_length`` samples at ``sample_rate`` from one audio value.

    Random crops re-draw (at most ``max_silence_retries`` times) when the crop's RMS is below
    ``silence_db``; deterministic crops (``random_crop=False``) take the first segment.
    """

    def __init__(self, sample_rate: int, segment_length: int, *, random_crop: bool = True,
                 loudness_db: Optional[float] = None, silence_db: float = -60.0, max_silence_retries: int = 5):
        self.sample_rate, self.segment_length = int(sample_rate), int(segment_length)
        self.random_crop, self.loudness_db = random_crop, loudness_db
        self.silence_db, self.max_silence_retries = silence_db, max_silence_retries

    def __call__(self, value: Any, rng: np.random.Generator) -> Tuple[torch.Tensor, int]:
        """Returns ``((1, segment_length) float32, valid samples)``; raises AudioReadError."""
        with open_audio(value) as reader:
            sr, total = reader.info.sample_rate, reader.info.num_frames
            # Source frames covering one segment, +2 so rounding in the resampler never leaves
            # the crop one sample short.
            need = math.ceil(self.segment_length * sr / self.sample_rate) + 2
            if total <= need:
                audio, _ = reader.read(0, None, self.sample_rate)
                seg, valid = crop_or_pad(audio, self.segment_length)
            else:
                seg, valid = self._crop(reader, total, need, rng)
        if self.loudness_db is not None:
            seg = normalize_loudness(seg, self.loudness_db)
        return seg, valid

    def _crop(self, reader: Any, total: int, need: int, rng: np.random.Generator) -> Tuple[torch.Tensor, int]:
        attempts = 1 + (self.max_silence_retries if self.random_crop else 0)
        for _ in range(attempts):
            start = int(rng.integers(0, total - need + 1)) if self.random_crop else 0
            audio, _ = reader.read(start, need, self.sample_rate)
            seg, valid = crop_or_pad(audio, self.segment_length)
            if rms_db(seg[..., :valid]) >= self.silence_db:
                break
        return seg, valid


def _make_item(row: Mapping[str, Any], index: int, seg: torch.Tensor, valid: int,
               text_column: Optional[str], speaker_column: Optional[str]) -> Dict[str, Any]:
    item = {"audio": seg, "length": valid, "id": _row_id(row, index), "index": index}
    if text_column:
        item["text"] = "" if row.get(text_column) is None else str(row.get(text_column))
    if speaker_column:
        item["speaker"] = "" if row.get(speaker_column) is None else str(row.get(speaker_column))
    return item


class _FailureLog:
    """Per-process counts of unreadable items; raises when too large a fraction fails."""

    MIN_ATTEMPTS = 20  # judge the failure fraction only once it means something

    def __init__(self, max_fraction: float, description: str):
        self.max_fraction, self.description = max_fraction, description
        self.ok = self.failed = 0
        self.bad: Dict[int, str] = {}

    def success(self) -> None:
        self.ok += 1

    def failure(self, index: int, ident: str, reason: str) -> str:
        self.failed += 1
        if index not in self.bad:
            warnings.warn(f"skipping unreadable audio: {reason}", stacklevel=3)
        self.bad[index] = f"{ident}: {reason}"
        total = self.ok + self.failed
        if total >= self.MIN_ATTEMPTS and self.failed > self.max_fraction * total:
            raise DatasetError(f"{self.description}: {self.failed} of {total} audio reads failed "
                               f"(more than data.max_failure_fraction={self.max_fraction}); last: {reason}")
        return self.bad[index]


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


class AudioDataset(Dataset):
    """Map-style dataset of fixed-length crops (streaming sources give a
    :class:`StreamingAudioDataset` instead, see ``__new__``).

    Args:
        source: see the module docstring.
        sample_rate: output rate (Hz), normally ``ModelConfig.sampling_rate``.
        segment_length: output samples per item (``Config.segment_length()``).
        config_name, split, streaming: hub / DatasetDict selection.
        audio_column, text_column, speaker_column: column names (text/speaker optional).
        random_crop: random crops (training) or the first segment (validation).
        seed: crops depend only on ``(seed, epoch, index)``.
        loudness_db, silence_db, max_silence_retries: see :class:`SegmentReader`.
        max_failure_fraction: raise :class:`DatasetError` when more reads than this fail.
        max_item_retries: consecutive unreadable items tolerated before raising.
        indices: restrict to these rows (held-out splits).

    ``dataset[i]`` or ``dataset[(i, epoch)]`` returns an item (see the module docstring); an
    unreadable row is replaced by another row chosen deterministically, and reported in the
    item's ``skipped`` list.
    """

    def __new__(cls, source: Any = None, *args: Any, **kwargs: Any):
        if cls is AudioDataset and _is_streaming_request(source, kwargs):
            return StreamingAudioDataset(source, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, source: Any, sample_rate: int, segment_length: int, *, config_name: Optional[str] = None,
                 split: str = "train", streaming: bool = False, audio_column: str = "audio",
                 text_column: Optional[str] = None, speaker_column: Optional[str] = None,
                 random_crop: bool = True, seed: int = 0, loudness_db: Optional[float] = None,
                 silence_db: float = -60.0, max_silence_retries: int = 5, max_failure_fraction: float = 0.5,
                 max_item_retries: int = 20, indices: Optional[Sequence[int]] = None,
                 revision: Optional[str] = None):
        records = source if isinstance(source, (FileRecords, HFRecords)) else open_records(
            source, split=split, config_name=config_name, streaming=False, audio_column=audio_column,
            columns=(text_column, speaker_column), revision=revision)
        if indices is not None:
            records = records.subset(indices)
        if len(records) == 0:
            raise DatasetError(f"{records.description}: no items")
        self.records, self.seed = records, int(seed)
        self.text_column, self.speaker_column = text_column, speaker_column
        self.reader = SegmentReader(sample_rate, segment_length, random_crop=random_crop, loudness_db=loudness_db,
                                    silence_db=silence_db, max_silence_retries=max_silence_retries)
        self.max_item_retries = max_item_retries
        self.failures = _FailureLog(max_failure_fraction, records.description)

    @property
    def sample_rate(self) -> int:
        return self.reader.sample_rate

    @property
    def segment_length(self) -> int:
        return self.reader.segment_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        index, epoch = (key if isinstance(key, tuple) else (key, 0))
        index, n = int(index), len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        rng = np.random.default_rng([self.seed, int(epoch), index])
        skipped: List[str] = []
        for _ in range(self.max_item_retries + 1):
            item = self._try(index, rng, skipped)
            if item is not None:
                item["skipped"] = skipped
                return item
            index = int(rng.integers(n))  # deterministic replacement row
        raise DatasetError(f"{self.records.description}: {len(skipped)} unreadable items in a row; "
                           f"last: {skipped[-1] if skipped else '?'}")

    def _try(self, index: int, rng: np.random.Generator, skipped: List[str]) -> Optional[Dict[str, Any]]:
        if index in self.failures.bad:  # known bad in this process: don't decode again
            skipped.append(self.failures.bad[index])
            return None
        row = self.records.row(index)
        try:
            seg, valid = self.reader(row["audio"], rng)
        except AudioReadError as e:
            skipped.append(self.failures.failure(index, _row_id(row, index), str(e)))
            return None
        self.failures.success()
        return _make_item(row, index, seg, valid, self.text_column, self.speaker_column)


def _is_streaming_request(source: Any, kwargs: Mapping[str, Any]) -> bool:
    if kwargs.get("streaming"):
        return True
    try:
        import datasets as hf
    except ImportError:  # pragma: no cover
        return False
    return isinstance(source, hf.IterableDataset)


class StreamingAudioDataset(IterableDataset):
    """Iterable dataset of crops over a streamed source, with a shuffle buffer.

    Sharding: ``rank`` / ``world_size`` select a disjoint part (``split_dataset_by_node`` for
    Hugging Face streams, every ``world_size``-th shard/row otherwise); DataLoader workers split
    each rank's part further (by shards for Hugging Face streams, by rows otherwise). One pass =
    one epoch; call :meth:`set_epoch` to reshuffle. ``skip`` (items per worker) resumes mid-epoch.
    """

    def __init__(self, source: Any, sample_rate: int, segment_length: int, *, config_name: Optional[str] = None,
                 split: str = "train", streaming: bool = True, audio_column: str = "audio",
                 text_column: Optional[str] = None, speaker_column: Optional[str] = None,
                 random_crop: bool = True, seed: int = 0, loudness_db: Optional[float] = None,
                 silence_db: float = -60.0, max_silence_retries: int = 5, max_failure_fraction: float = 0.5,
                 max_item_retries: int = 20, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1,
                 skip_items: int = 0, take_items: Optional[int] = None, revision: Optional[str] = None):
        src = source.records if isinstance(source, _RecordStream) else source
        opened = src if isinstance(src, (FileRecords, HFRecords)) else open_records(
            src, split=split, config_name=config_name, streaming=True, audio_column=audio_column,
            columns=(text_column, speaker_column), revision=revision)
        self.records = opened.records if isinstance(opened, _RecordStream) else opened
        self.description = getattr(self.records, "description", "stream")
        self.rank, self.world_size = int(rank), int(world_size)
        self.skip_items, self.take_items = int(skip_items), take_items
        if not isinstance(self.records, (FileRecords, HFRecords)):  # a Hugging Face IterableDataset
            from datasets.distributed import split_dataset_by_node

            stream = self.records
            if skip_items:
                stream = stream.skip(skip_items)
            if take_items is not None:
                stream = stream.take(take_items)
            self.records = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size) \
                if self.world_size > 1 else stream
        self.seed, self.epoch, self.shuffle_buffer = int(seed), 0, int(shuffle_buffer)
        self.text_column, self.speaker_column = text_column, speaker_column
        self.reader = SegmentReader(sample_rate, segment_length, random_crop=random_crop, loudness_db=loudness_db,
                                    silence_db=silence_db, max_silence_retries=max_silence_retries)
        self.max_failure_fraction, self.max_item_retries = max_failure_fraction, max_item_retries
        self.audio_column = audio_column
        # Batches of this epoch the consumer already has (set by InfiniteLoader on resume).
        self.resume_batches, self.resume_batch_size = 0, 1

    @property
    def sample_rate(self) -> int:
        return self.reader.sample_rate

    @property
    def segment_length(self) -> int:
        return self.reader.segment_length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rows(self, worker: int, num_workers: int) -> Iterator[Tuple[int, Mapping[str, Any]]]:
        """(global position, row) pairs of this rank and worker, in source order."""
        if isinstance(self.records, (FileRecords, HFRecords)):
            n = len(self.records)
            start, stop = self.skip_items, n if self.take_items is None else min(n, self.skip_items + self.take_items)
            stride = self.world_size * num_workers
            first = start + self.rank * num_workers + worker
            for i in range(first, stop, stride):
                yield i, self.records.row(i)
        else:  # datasets splits its IterableDataset across DataLoader workers itself
            for i, row in enumerate(self.records):
                row = dict(row)
                if self.audio_column not in row:
                    raise DatasetError(f"{self.description}: no column {self.audio_column!r} in rows "
                                       f"with keys {sorted(row)}")
                row["audio"] = row.pop(self.audio_column)
                yield i, row

    def _resume_rows(self, worker: int, num_workers: int) -> int:
        """Rows this worker already delivered: DataLoader takes one batch from each worker in turn."""
        return math.ceil(max(0, self.resume_batches - worker) / num_workers) * self.resume_batch_size

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The shuffle order and each crop have separate RNGs, so rows skipped on resume (never
        # decoded) leave later crops unchanged.
        order_rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        failures = _FailureLog(self.max_failure_fraction, self.description)
        rows = _shuffled(self._rows(worker, num_workers), self.shuffle_buffer, order_rng)
        for _ in range(self._resume_rows(worker, num_workers)):  # resume: drop rows undecoded
            if next(rows, None) is None:
                return
        skipped: List[str] = []
        in_a_row = 0
        for pos, row in rows:
            try:
                seg, valid = self.reader(row["audio"], np.random.default_rng([self.seed, self.epoch, pos]))
            except AudioReadError as e:
                skipped.append(failures.failure(pos, _row_id(row, pos), str(e)))
                in_a_row += 1
                if in_a_row > self.max_item_retries:
                    raise DatasetError(f"{self.description}: {in_a_row} unreadable items in a row; last: {e}") from None
                continue
            failures.success()
            in_a_row = 0
            item = _make_item(row, pos, seg, valid, self.text_column, self.speaker_column)
            item["skipped"], skipped = skipped, []
            yield item


def _shuffled(rows: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle-buffer a stream: keep ``size`` rows, emit a random one as each new row arrives."""
    if size <= 1:
        yield from rows
        return
    buffer: List[Any] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = row
    order = rng.permutation(len(buffer))
    for j in order:
        yield buffer[j]


class CombinedAudioDataset(Dataset):
    """Map-style mixture of map-style datasets drawn with ``weights`` (default: by size).

    Position ``p`` of epoch ``e`` picks dataset ``j`` with probability ``weights[j]`` and a
    row of it uniformly, from an RNG seeded by ``(seed, e, p)``; ``len`` is the total size.
    """

    def __init__(self, datasets: Sequence[AudioDataset], weights: Optional[Sequence[float]] = None, seed: int = 0):
        if not datasets:
            raise DatasetError("CombinedAudioDataset needs at least one dataset")
        if any(not isinstance(d, Dataset) or isinstance(d, IterableDataset) for d in datasets):
            raise DatasetError("CombinedAudioDataset combines map-style datasets only")
        sizes = [len(d) for d in datasets]
        w = np.asarray(weights if weights else sizes, dtype=np.float64)
        if w.shape != (len(datasets),) or (w < 0).any() or w.sum() <= 0:
            raise DatasetError(f"weights {list(w)} must be {len(datasets)} non-negative numbers, not all zero")
        self.datasets, self.weights, self.seed = list(datasets), w / w.sum(), int(seed)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def choose(self, position: int, epoch: int) -> Tuple[int, int]:
        """(dataset number, row) drawn for ``position`` of ``epoch``."""
        rng = np.random.default_rng([self.seed, int(epoch), int(position), 7])
        j = int(rng.choice(len(self.datasets), p=self.weights))
        return j, int(rng.integers(len(self.datasets[j])))

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        position, epoch = key if isinstance(key, tuple) else (key, 0)
        j, row = self.choose(position, epoch)
        item = self.datasets[j][(row, epoch)]
        item["source"] = j
        return item


# --------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------


def collate_audio(items: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Stack items: ``audio`` ``(B, 1, T)`` (right-padded to the longest), ``length`` LongTensor(B),
    ``id`` list, ``text`` / ``speaker`` lists when present, ``skipped`` flat list of reports."""
    if not items:
        raise DatasetError("collate_audio got an empty batch")
    longest = max(it["audio"].shape[-1] for it in items)
    audio = torch.stack([crop_or_pad(it["audio"], longest)[0] for it in items])
    batch: Dict[str, Any] = {
        "audio": audio,
        "length": torch.tensor([int(it["length"]) for it in items], dtype=torch.long),
        "id": [str(it["id"]) for it in items],
        "skipped": [s for it in items for s in it.get("skipped", ())],
    }
    for key in ("text", "speaker"):
        if any(key in it for it in items):
            batch[key] = [it.get(key, "") for it in items]
    if all("index" in it for it in items):
        batch["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
    return batch


# --------------------------------------------------------------------------------------
# Infinite, resumable, sharded loader
# --------------------------------------------------------------------------------------


class EpochBatchSampler:
    """Batches of ``(row, epoch)`` keys for one rank: a seeded permutation per epoch shared by
    all ranks, rank ``r`` taking every ``world_size``-th entry (padded by wrapping so ranks get
    equal counts, as ``DistributedSampler`` does), full batches only, skipping ``start_batch``."""

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = self.start_batch = 0

    def rank_rows(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = math.ceil(self.size / self.world_size)
        order = (order * math.ceil(per_rank * self.world_size / self.size))[: per_rank * self.world_size]
        rows = order[self.rank::self.world_size]
        if len(rows) < self.batch_size:  # tiny data: repeat so one full batch exists
            rows = (rows * math.ceil(self.batch_size / len(rows)))[: self.batch_size]
        return rows

    def __len__(self) -> int:
        return len(self.rank_rows(0)) // self.batch_size

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        rows, bs = self.rank_rows(self.epoch), self.batch_size
        for b in range(self.start_batch, len(rows) // bs):
            yield [(r, self.epoch) for r in rows[b * bs:(b + 1) * bs]]


def _seed_worker(worker_id: int) -> None:
    """Distinct, reproducible numpy / random seeds per worker (torch seeds itself)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class InfiniteLoader:
    """Endless iterator of collated batches over epochs, with a resumable position.

    ``state_dict()`` -> ``{"epoch", "batches", "seed", "rank", "world_size"}``: the epoch and the
    number of batches of it already returned. ``load_state_dict`` restarts at exactly that batch
    for map-style data (the sampler skips the consumed batches; crops are keyed by
    ``(seed, epoch, row)``); for streams each worker drops the rows it had already produced.
    """

    def __init__(self, dataset: Union[Dataset, IterableDataset], batch_size: int, *, num_workers: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, max_failure_fraction: float = 0.5,
                 pin_memory: bool = False):
        self.dataset, self.batch_size, self.num_workers = dataset, int(batch_size), int(num_workers)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.streaming = isinstance(dataset, IterableDataset)
        self.epoch = self.batches = 0
        self.max_failure_fraction, self.pin_memory = max_failure_fraction, pin_memory
        self.sampler = None if self.streaming else EpochBatchSampler(
            len(dataset), self.batch_size, rank=rank, world_size=world_size, seed=seed)
        self._loader: Optional[DataLoader] = None
        self._it: Optional[Iterator] = None
        self._reset_counts()

    # -- position ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(f"data seed changed ({state.get('seed')} -> {self.seed}): the resumed data order differs")
        if int(state.get("world_size", self.world_size)) != self.world_size:
            warnings.warn("world size changed since the checkpoint: resuming at the same epoch and batch "
                          "count, but batch contents differ")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._it = None

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> "InfiniteLoader":
        return self

    def __next__(self) -> Dict[str, Any]:
        empty_epochs = 0
        while True:
            if self._it is None:
                self._it = self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                empty_epochs = empty_epochs + 1 if self.batches == 0 else 0
                if empty_epochs >= 2:
                    raise DatasetError("the dataset produced no batches in a whole epoch "
                                       f"(batch size {self.batch_size}; too few readable items for this rank?)") from None
                self._end_epoch()
                continue
            self.batches += 1
            self._account(batch)
            return batch

    def _make_loader(self) -> DataLoader:
        common = dict(num_workers=self.num_workers, collate_fn=collate_audio, worker_init_fn=_seed_worker,
                      pin_memory=self.pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(self.seed * 7919 + self.rank))
        if self.streaming:
            return DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True, **common)
        # Map-style: workers persist across epochs; the sampler (main process) carries the epoch.
        common["persistent_workers"] = self.num_workers > 0
        return DataLoader(self.dataset, batch_sampler=self.sampler, **common)

    def _start_epoch(self) -> Iterator[Dict[str, Any]]:
        if self.streaming:
            self.dataset.set_epoch(self.epoch)
            self.dataset.resume_batches, self.dataset.resume_batch_size = self.batches, self.batch_size
            return iter(self._make_loader())
        self.sampler.epoch, self.sampler.start_batch = self.epoch, self.batches
        if self._loader is None:
            self._loader = self._make_loader()
        return iter(self._loader)

    def _end_epoch(self) -> None:
        if self.failed:
            reasons = Counter(r.split(": ", 1)[-1].split(" (")[0] for r in self.reasons)
            warnings.warn(f"data epoch {self.epoch}: skipped {self.failed} unreadable item(s) "
                          f"of {self.failed + self.ok}; reasons: {dict(reasons.most_common(5))}")
        self.epoch += 1
        self.batches = 0
        self._it = None
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.ok = self.failed = 0
        self.reasons: List[str] = []

    def _account(self, batch: Mapping[str, Any]) -> None:
        """Epoch-level failure accounting over all workers (they report via ``skipped``)."""
        skipped = batch.get("skipped", [])
        self.ok += len(batch["id"])
        self.failed += len(skipped)
        self.reasons.extend(skipped[:100])
        total = self.ok + self.failed
        if total >= 32 and self.failed > self.max_failure_fraction * total:
            raise DatasetError(f"{self.failed} of {total} audio reads failed this epoch (more than "
                               f"data.max_failure_fraction={self.max_failure_fraction}); e.g. {skipped[:1]}")

    def close(self) -> None:
        """Stop persistent workers (they also stop when the loader is garbage-collected)."""
        self._it = None
        self._loader = None


# --------------------------------------------------------------------------------------
# From a training Config
# --------------------------------------------------------------------------------------


def resolve_source(data: Any) -> Tuple[Any, Optional[str]]:
    """``(source, default validation split)`` for a DataConfig: preset, registry name or path."""
    from .config import DATASET_CONFIGS

    if data.dataset_path:
        return data.dataset_path, None
    if data.dataset:
        if data.dataset in DATASET_CONFIGS:
            return DATASET_CONFIGS[data.dataset]["dataset_path"], DATASET_CONFIGS[data.dataset].get("val_split")
        entry = load_registry().get(data.dataset)
        if entry is None:
            raise DatasetError(f"unknown dataset {data.dataset!r}: not a preset ({sorted(DATASET_CONFIGS)}) "
                               f"and not in the registry {registry_path()}; run "
                               "`python -m training.dataset prepare` first")
        return data.dataset, ("validation" if "validation" in entry.get("manifests", {}) else None)
    raise DatasetError("no training data configured: set data.dataset or data.dataset_path")


def _dataset_kwargs(data: Any, sample_rate: int, segment_length: int, random_crop: bool) -> Dict[str, Any]:
    return dict(config_name=data.config_name, revision=data.revision, audio_column=data.audio_column,
                text_column=data.text_column,
                speaker_column=data.speaker_column, random_crop=random_crop, seed=data.seed,
                loudness_db=data.loudness_db, silence_db=data.silence_db,
                max_silence_retries=data.max_silence_retries, max_failure_fraction=data.max_failure_fraction,
                max_item_retries=data.max_item_retries)


def held_out_rows(n: int, val_items: int, seed: int) -> Tuple[List[int], List[int]]:
    """Deterministic ``(train_rows, val_rows)``: ``val_items`` rows (at most a fifth of a small
    dataset, at least one) chosen by a seeded permutation; both lists sorted."""
    if val_items <= 0 or n < 2:
        return list(range(n)), []
    k = min(val_items, max(1, n // 5))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345)).tolist()
    return sorted(order[k:]), sorted(order[:k])


def build_datasets(cfg: Any, rank: int = 0, world_size: int = 1) -> Tuple[Any, Any]:
    """``(train_dataset, val_dataset or None)`` for a :class:`training.config.Config`."""
    d, rate = cfg.data, cfg.model.sampling_rate
    source, preset_val = resolve_source(d)
    val_split = d.val_split or preset_val
    train_kw = _dataset_kwargs(d, rate, cfg.segment_length(), True)
    val_kw = _dataset_kwargs(d, rate, cfg.val_segment_length(), False)
    if d.streaming:
        return _streaming_datasets(cfg, source, val_split, train_kw, val_kw, rank, world_size)
    records = open_records(source, split=d.split, config_name=d.config_name, audio_column=d.audio_column,
                           columns=(d.text_column, d.speaker_column), revision=d.revision)
    if val_split:
        train = AudioDataset(records, rate, cfg.segment_length(), **train_kw)
        val = AudioDataset(source, rate, cfg.val_segment_length(), split=val_split, **val_kw)
    else:
        train_rows, val_rows = held_out_rows(len(records), d.val_items, d.seed)
        train = AudioDataset(records, rate, cfg.segment_length(), indices=train_rows, **train_kw)
        val = AudioDataset(records, rate, cfg.val_segment_length(), indices=val_rows, **val_kw) if val_rows else None
    if d.extra_datasets:
        extra_kw = {**train_kw, "revision": None}  # data.revision pins the main source only
        extra = [AudioDataset(s, rate, cfg.segment_length(), split=d.split, **extra_kw) for s in d.extra_datasets]
        train = CombinedAudioDataset([train, *extra], d.dataset_weights or None, seed=d.seed)
    return train, val


def _streaming_datasets(cfg, source, val_split, train_kw, val_kw, rank, world_size):
    d, rate = cfg.data, cfg.model.sampling_rate
    if d.extra_datasets:
        raise DatasetError("data.extra_datasets needs map-style data (data.streaming=false)")
    common = dict(split=d.split, shuffle_buffer=d.shuffle_buffer)
    if val_split:
        train = StreamingAudioDataset(source, rate, cfg.segment_length(), rank=rank, world_size=world_size,
                                      **common, **train_kw)
        val = StreamingAudioDataset(source, rate, cfg.val_segment_length(), split=val_split, shuffle_buffer=0,
                                    take_items=d.val_items, **val_kw)
    else:  # the first val_items rows of the stream are held out
        train = StreamingAudioDataset(source, rate, cfg.segment_length(), rank=rank, world_size=world_size,
                                      skip_items=d.val_items, **common, **train_kw)
        val = StreamingAudioDataset(source, rate, cfg.val_segment_length(), split=d.split, shuffle_buffer=0,
                                    take_items=d.val_items, **val_kw) if d.val_items > 0 else None
    return train, val


def validation_batches(val: Any, batch_size: int, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Deterministic first-segment validation batches, decoded once (unreadable items dropped)."""
    if val is None:
        return []
    items: List[Dict[str, Any]] = []
    if isinstance(val, IterableDataset):
        items = list(val)
    else:
        for i in range(len(val)):
            row = val.records.row(i)
            rng = np.random.default_rng([val.seed, 0, i])
            try:
                seg, valid = val.reader(row["audio"], rng)
            except AudioReadError as e:
                warnings.warn(f"validation: skipping unreadable audio: {e}")
                continue
            items.append({**_make_item(row, i, seg, valid, val.text_column, val.speaker_column), "skipped": []})
    items = items[:limit] if limit else items
    return [collate_audio(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def build_dataloaders(cfg: Any, rank: int = 0, world_size: int = 1) -> Tuple[InfiniteLoader, List[Dict[str, Any]]]:
    """``(train_loader, val_batches)`` for a :class:`training.config.Config`.

    ``train_loader``: :class:`InfiniteLoader` (``next(loader)`` -> batch of
    ``cfg.data.batch_size`` crops of ``cfg.segment_length()`` samples for this rank).
    ``val_batches``: list of collated batches of first-segment crops of
    ``cfg.val_segment_length()`` samples; the same on every rank.
    Raises :class:`DatasetError` for a configuration that cannot produce data.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DatasetError(f"rank {rank} is not in [0, world_size={world_size})")
    train, val = build_datasets(cfg, rank, world_size)
    loader = InfiniteLoader(train, cfg.data.batch_size, num_workers=cfg.data.num_workers, seed=cfg.data.seed,
                            rank=rank, world_size=world_size, max_failure_fraction=cfg.data.max_failure_fraction,
                            pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu")
    return loader, validation_batches(val, cfg.data.batch_size)


# --------------------------------------------------------------------------------------
# Preparation: scan once, write manifests, register
# --------------------------------------------------------------------------------------


def _split_of(ident: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per item id: adding files never moves others."""
    digest = hashlib.sha1(f"{seed}:{ident}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def scan_rows(rows: Sequence[Mapping[str, Any]], workers: int = 8, progress: bool = False, verify: bool = False):
    """Header-read every row: ``(kept rows with num_frames/sample_rate/duration, dropped (path, reason))``.

    Headers cannot reveal a file cut off mid-stream or NaN samples; ``verify=True`` also decodes
    each file completely to catch those (much slower; training skips such files anyway).
    """
    def probe(row):
        try:
            info = audio_info(row["path"])
            if verify:
                decode_audio(row["path"])
            return row, info, None
        except AudioReadError as e:
            return row, None, str(e)

    kept, dropped = [], []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(probe, rows)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(rows), desc="scanning", unit="file")
        for row, info, err in results:
            if info is None:
                dropped.append((row["path"], err))
            else:
                kept.append({**row, "num_frames": info.num_frames, "sample_rate": info.sample_rate,
                             "channels": info.channels, "duration": round(info.duration, 6)})
    return kept, dropped


def prepare_dataset(source: Union[str, os.PathLike], name: str, out_dir: Union[str, os.PathLike], *,
                    val_fraction: float = 0.02, test_fraction: float = 0.0, min_seconds: float = 0.0,
                    max_seconds: Optional[float] = None, seed: int = 0, workers: int = 8,
                    progress: bool = False, verify: bool = False) -> Dict[str, Any]:
    """Scan a local corpus (folder, LJ Speech folder, audiofolder or manifest) from headers only,
    drop unreadable / too short / too long files with the reason, split train/validation/test by
    a hash of each id, write ``<out_dir>/{train,validation,test}.jsonl`` + ``dropped.tsv`` and
    register ``name``. Returns the registry entry."""
    src = Path(source).expanduser()
    if not src.exists():
        raise DatasetError(f"prepare: source not found: {src}")
    records = open_records(str(src), split="train")
    if not isinstance(records, FileRecords):
        raise DatasetError(f"prepare: {src} is a Hugging Face dataset; use it directly (it needs no manifest)")
    kept, dropped = scan_rows(records.rows, workers=workers, progress=progress, verify=verify)
    kept, dropped = _filter_durations(kept, dropped, min_seconds, max_seconds)
    if not kept:
        raise DatasetError(f"prepare: no readable audio in {src} ({len(dropped)} file(s) dropped)")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    splits = _assign_splits(kept, val_fraction, test_fraction, seed)
    manifests = {s: str(_write_manifest(out / f"{s}.jsonl", rows).resolve()) for s, rows in splits.items() if rows}
    with open(out / "dropped.tsv", "w", encoding="utf-8") as f:
        f.write("path\treason\n" + "".join(f"{p}\t{r}\n" for p, r in dropped))
    entry = {"source": str(src.resolve()), "manifests": manifests,
             "counts": {s: len(r) for s, r in splits.items()}, "dropped": len(dropped),
             "hours": round(sum(r["duration"] for r in kept) / 3600, 4), "seed": seed,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    register_dataset(name, entry)
    return entry


def _filter_durations(kept, dropped, min_seconds, max_seconds):
    ok = []
    for r in kept:
        if r["duration"] < min_seconds:
            dropped.append((r["path"], f"shorter than {min_seconds} s ({r['duration']:.3f} s)"))
        elif max_seconds is not None and r["duration"] > max_seconds:
            dropped.append((r["path"], f"longer than {max_seconds} s ({r['duration']:.3f} s)"))
        else:
            ok.append(r)
    return ok, dropped


def _assign_splits(rows, val_fraction, test_fraction, seed) -> Dict[str, List[Dict[str, Any]]]:
    """Lowest hashes go to validation, then test; at least one item each when its fraction > 0."""
    order = sorted(rows, key=lambda r: _split_of(r["id"], seed))
    n = len(order)
    n_val = 0 if val_fraction <= 0 else max(1, round(val_fraction * n))
    n_test = 0 if test_fraction <= 0 else max(1, round(test_fraction * n))
    if n_val + n_test >= n:
        raise DatasetError(f"prepare: {n} readable file(s) cannot fill validation ({n_val}) and test ({n_test}) "
                           "and still leave training data; lower --val-fraction / --test-fraction")
    by_id = lambda rs: sorted(rs, key=lambda r: r["id"])  # noqa: E731 - stable file order
    return {"train": by_id(order[n_val + n_test:]), "validation": by_id(order[:n_val]),
            "test": by_id(order[n_val:n_val + n_test])}


def _write_manifest(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """JSONL with paths relative to the manifest's folder when possible (movable corpora)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            rel = os.path.relpath(r["path"], path.parent)
            f.write(json.dumps({**r, "path": rel}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _cli(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.dataset",
                                     description="Prepare audio corpora for SNAC training.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="scan a corpus, write manifests and register it")
    p.add_argument("source", help="audio folder, LJ Speech folder, audiofolder or manifest")
    p.add_argument("--name", required=True, help="registry name used as data.dataset in training configs")
    p.add_argument("--out", help="folder for the manifests (default: <source>/manifests or next to a manifest)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of files for validation (default 0.02)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of files for test (default 0)")
    p.add_argument("--min-seconds", type=float, default=0.0, help="drop files shorter than this")
    p.add_argument("--max-seconds", type=float, default=None, help="drop files longer than this")
    p.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    p.add_argument("--workers", type=int, default=8, help="threads reading headers")
    p.add_argument("--verify", action="store_true",
                   help="decode every file fully to also drop truncated / NaN files (slow)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("list", help="show registered datasets")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            reg = load_registry()
            print(f"registry: {registry_path()}")
            for name, e in sorted(reg.items()):
                print(f"{name}\t{e.get('counts')}\t{e.get('hours')} h\t{e.get('source')}")
            return 0
        src = Path(args.source).expanduser()
        out = args.out or (src.parent / f"{src.stem}_manifests" if src.is_file() else src / "manifests")
        entry = prepare_dataset(src, args.name, out, val_fraction=args.val_fraction,
                                test_fraction=args.test_fraction, min_seconds=args.min_seconds,
                                max_seconds=args.max_seconds, seed=args.seed, workers=args.workers,
                                progress=not args.quiet, verify=args.verify)
    except (DatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"registered {args.name!r}: {entry['counts']}, {entry['hours']} h, {entry['dropped']} dropped "
          f"(see {Path(out) / 'dropped.tsv'}); registry {registry_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
