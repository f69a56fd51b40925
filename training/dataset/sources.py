"""Record sources: folders, LJ Speech, manifests, audiofolder, hub and saved datasets, the prepared-
dataset registry."""

from __future__ import annotations

import collections
import csv
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..audio import hub_token, list_audio_files
from ..errors import first_line


MANIFEST_SUFFIXES = (".jsonl", ".csv", ".tsv", ".txt")


SPLIT_NAMES = ("train", "validation", "test")


class DatasetError(ValueError):
    """The data configuration cannot produce training items (bad path, nothing readable, ...)."""


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
    first = first_line(e)
    if "Dataset scripts are no longer supported" in text:
        script = text.rsplit("found", 1)[-1].strip() or "a loading script"
        return (f"this revision holds only a loading script ({script}), which datasets >= 4 no longer runs; "
                "pin a revision with parquet data files (data.revision; tokenizer: revision)")
    if type(e).__name__ in ("EmptyDatasetError", "DataFilesNotFoundError"):
        return f"the repository holds no data files at this revision ({first})"
    if "gated" in text or type(e).__name__ == "GatedRepoError":
        return f"{first} Accept its terms on huggingface.co and set HF_TOKEN"
    return first
