"""Tokenize whole audio datasets into SNAC token shards (gzip JSONL) for TTS / audio-LM training.

Run ``python -m training.tokenize --config cfg.yaml`` (see ``examples/tokenize_config.yaml``) or
pass everything as flags (``--help``).

Pipeline (one job, one output folder ``OUT_DIR``)::

    reader processes  --(bounded queue, qsize clips)-->  encoder workers  --(results)-->  writer
    decode + resample                                   bucket by length                 (this process)
    to the model rate                                   batched exact encode             shards, failed.jsonl,
                                                                                         progress, summary

- Readers (``num_readers`` processes) decode and resample on the CPU. Unreadable or empty
  clips become ``failed.jsonl`` records; they never stop the run.
- Encoder workers: one per GPU, or CPU workers without a GPU. Each pools up to ``bucket_clips``
  clips, sorts them by length, and encodes batches of similar length with
  :class:`training.codec.Codec`, whose masked batching makes each clip's codes independent of its
  batch neighbours. A clip's codes are exactly those of ``snac.SNAC.encode`` on that clip alone:
  level ``i`` has ``ceil(n / pad_multiple) * pad_multiple / (hop * vq_strides[i])`` codes.
- The writer appends lines to the current shard's temporary file and, every ``lines_per_file``
  lines, commits it: a sidecar listing the shard's row ids is written atomically first, then the
  shard is renamed to its final name. A shard file therefore exists only when complete, and
  every complete shard has its id list.

Exactly once: on start, rows found in complete shards or in the failure logs are done; all
others are (re)processed. Temporary files of interrupted runs are removed. So a run killed at
any moment (SIGKILL included) and started again with the same command finishes the job with
every input row in exactly one place.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import glob
import gzip
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

STATE_DIR = ".tokenize"  # inside OUT_DIR: job fingerprint, shard id lists, locks
SHARD_GLOB = "tokens-*.jsonl.gz"
_SHARD_RE = re.compile(r"^tokens-(\d{5})-of-(\d{5})-(\d{6})\.jsonl\.gz$")
RESERVED_FIELDS = ("id", "source", "index", "name", "text", "speaker", "duration", "num_layers",
                   "token_lengths", "snac_tokens")
READER_PROGRESS_EVERY = 0.5  # seconds between a reader's progress messages


class TokenizeError(ValueError):
    """A user mistake in the tokenizer's config, flags or output folder (exit code 2)."""


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass
class SourceSpec:
    """One dataset to tokenize: a hub id, a ``save_to_disk`` dir, an (audio/LJ Speech) folder or a manifest.

    ``text_column_name``: None = no text; the default ``"auto"`` takes a ``text`` column when there
    is one. ``id_prefix``: the source's name in row ids (default: derived from ``name``).
    """

    name: str
    sub_name: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None  # hub revision (commit sha, branch, tag, refs/pr/N); None: default branch
    text_column_name: Optional[str] = "auto"
    audio_column_name: str = "audio"
    speaker_column_name: Optional[str] = None
    add_constant: List[Dict[str, Any]] = field(default_factory=list)
    id_prefix: Optional[str] = None

    def key(self) -> str:
        """Stable source name used in row ids (``<key>/<row index>``)."""
        if self.id_prefix:
            return self.id_prefix
        path = Path(self.name).expanduser()
        if path.exists():
            base = path.resolve().name
            return base if self.split == "train" else f"{base}/{self.split}"
        parts = [self.name] + ([self.sub_name] if self.sub_name else []) + [self.split]
        return "/".join(parts)

    def constants(self) -> Dict[str, Any]:
        return {c["key"]: c["value"] for c in self.add_constant}


@dataclass
class Settings:
    """Everything one tokenizer run needs (YAML ``base_settings`` + ``save_settings`` + sources)."""

    audio_codec: str = ""
    num_readers: int = 2
    qsize: int = 1000  # clips waiting between readers and encoders (memory: clips x length x 4 bytes)
    OUT_DIR: str = "shards"
    gzip_level: int = 1
    buffer_size: int = 16 * 2**20  # bytes of write buffer per open shard
    lines_per_file: int = 50000
    load_dataset_num_proc: Optional[int] = None
    # Extensions beyond the reference config (all optional):
    device: str = "auto"  # auto: every CUDA GPU (one worker each), else CPU
    num_workers: int = 0  # encoder workers; 0: one per GPU, or 1 on CPU
    precision: str = "fp32"  # fp32 or bf16 (CUDA only)
    batch_size: int = 0  # clips per encode call; 0: 2 on CPU (bigger batches measured slower), 64 on GPU
    bucket_clips: int = 0  # clips pooled and sorted by length before batching; 0: 16 x batch_size
    threads: int = 0  # torch threads per CPU worker; 0: cores / workers
    max_seconds: Optional[float] = None  # longer clips go to failed.jsonl
    flatten: bool = False  # add `snac_tokens`, the depth-first interleaving of all levels
    num_shards: int = 1
    shard_index: int = 0
    progress: Optional[bool] = None  # None: bars when stderr is a terminal
    save_local: Optional[str] = None
    hf_upload: Optional[str] = None
    sources: List[SourceSpec] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return Path(self.OUT_DIR).expanduser()


BASE_KEYS = {f.name for f in dataclasses.fields(Settings)} - {"save_local", "hf_upload", "sources"}
SOURCE_KEYS = {f.name for f in dataclasses.fields(SourceSpec)}
INT_KEYS = {"num_readers": 1, "qsize": 1, "gzip_level": 0, "buffer_size": 1, "lines_per_file": 1,
            "num_workers": 0, "batch_size": 0, "bucket_clips": 0, "threads": 0, "num_shards": 1,
            "shard_index": 0, "load_dataset_num_proc": 1}


def _check_type(key: str, value: Any, types: Tuple[type, ...], optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in types:
        raise TokenizeError(f"config key {key!r} expects {'/'.join(t.__name__ for t in types)}, got {value!r}")
    if not isinstance(value, types):
        raise TokenizeError(f"config key {key!r} expects {'/'.join(t.__name__ for t in types)}, got {value!r}")
    return value


def _apply_base(s: Settings, values: Mapping[str, Any], where: str) -> None:
    for key, value in values.items():
        if key not in BASE_KEYS:
            raise TokenizeError(f"unknown key {where}.{key}; expected one of {sorted(BASE_KEYS)}")
        name = f"{where}.{key}"
        if key in INT_KEYS:
            value = _check_type(name, value, (int,), optional=key == "load_dataset_num_proc")
        elif key == "max_seconds":
            value = _check_type(name, value, (int, float), optional=True)
        elif key in ("flatten",):
            value = _check_type(name, value, (bool,))
        elif key == "progress":
            value = _check_type(name, value, (bool,), optional=True)
        else:
            value = str(_check_type(name, value, (str, int, float)))
        setattr(s, key, value)


def source_from_dict(d: Mapping[str, Any], where: str) -> SourceSpec:
    """A :class:`SourceSpec` from one ``hf_datasets`` entry, with errors naming the entry."""
    if not isinstance(d, Mapping):
        raise TokenizeError(f"{where} must be a mapping with at least 'name', got {d!r}")
    unknown = sorted(set(d) - SOURCE_KEYS)
    if unknown:
        raise TokenizeError(f"unknown key(s) {unknown} in {where}; expected some of {sorted(SOURCE_KEYS)}")
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise TokenizeError(f"{where}.name must be a hub id or a local path")
    for key in ("sub_name", "revision", "text_column_name", "speaker_column_name", "id_prefix"):
        _check_type(f"{where}.{key}", d.get(key), (str,), optional=True)
    for key in ("split", "audio_column_name"):
        if key in d:
            _check_type(f"{where}.{key}", d[key], (str,))
    constants = d.get("add_constant") or []
    if not isinstance(constants, list):
        raise TokenizeError(f"{where}.add_constant must be a list of {{key, value}} mappings")
    for n, c in enumerate(constants):
        if not isinstance(c, Mapping) or set(c) != {"key", "value"} or not isinstance(c["key"], str):
            raise TokenizeError(f"{where}.add_constant[{n}] must be a mapping with exactly 'key' (a string) and 'value'")
        if c["key"] in RESERVED_FIELDS or c["key"].startswith("snac_layer_"):
            raise TokenizeError(f"{where}.add_constant[{n}]: key {c['key']!r} is a reserved output field")
    return SourceSpec(**{**dict(d), "add_constant": [dict(c) for c in constants]})


def settings_from_dict(d: Mapping[str, Any]) -> Settings:
    """Parse the YAML layout (``base_settings``, ``save_settings``, ``hf_datasets``)."""
    if not isinstance(d, Mapping):
        raise TokenizeError("the config must be a mapping with base_settings / save_settings / hf_datasets")
    unknown = sorted(set(d) - {"base_settings", "save_settings", "hf_datasets"})
    if unknown:
        raise TokenizeError(f"unknown config section(s) {unknown}; expected base_settings, save_settings, hf_datasets")
    s = Settings()
    base = d.get("base_settings") or {}
    if not isinstance(base, Mapping):
        raise TokenizeError("base_settings must be a mapping")
    _apply_base(s, base, "base_settings")
    save = d.get("save_settings") or {}
    if not isinstance(save, Mapping) or set(save) - {"local", "hf_upload"}:
        raise TokenizeError("save_settings may only hold 'local' and 'hf_upload'")
    s.save_local = _check_type("save_settings.local", save.get("local"), (str,), optional=True)
    s.hf_upload = _check_type("save_settings.hf_upload", save.get("hf_upload"), (str,), optional=True)
    entries = d.get("hf_datasets") or []
    if not isinstance(entries, list):
        raise TokenizeError("hf_datasets must be a list of dataset entries")
    s.sources = [source_from_dict(e, f"hf_datasets[{n}]") for n, e in enumerate(entries)]
    return s


def load_settings_file(path: str) -> Settings:
    """Read a YAML (or JSON) tokenizer config with one-line errors."""
    if not os.path.isfile(path):
        raise TokenizeError(f"config file not found: {path}")
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TokenizeError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    return settings_from_dict(data or {})


def constant_defaults(sources: Sequence[SourceSpec]) -> Dict[str, Any]:
    """Every constant key of the job and the value written for sources that do not set it.

    The value is the empty value of the key's type ("" / 0 / 0.0 / False), never null:
    ``datasets`` infers each shard's schema from its own lines and cannot merge a shard whose
    column is all null with one where it holds strings or numbers.
    """
    zero = {str: "", int: 0, float: 0.0, bool: False}
    types: Dict[str, type] = {}
    for spec in sources:
        for key, value in spec.constants().items():
            if type(value) not in zero:
                raise TokenizeError(f"add_constant {key!r}: value {value!r} must be a string, number or boolean")
            if types.setdefault(key, type(value)) is not type(value):
                raise TokenizeError(f"add_constant {key!r} has values of different types across datasets "
                                    f"({types[key].__name__} and {type(value).__name__})")
    return {key: zero[t] for key, t in types.items()}


def _check_ranges(s: Settings) -> None:
    """Integer settings against their minimum (INT_KEYS), before any process starts: a reader
    count of 0 would otherwise wait forever for input that never comes."""
    for key, minimum in INT_KEYS.items():
        value = getattr(s, key)
        if value is not None and value < minimum:
            raise TokenizeError(f"{key} must be >= {minimum}, got {value}")
    if s.max_seconds is not None and not math.isfinite(s.max_seconds):
        raise TokenizeError(f"max_seconds must be a finite number of seconds, got {s.max_seconds}")


def validate(s: Settings) -> None:
    """Cross-field checks; raises TokenizeError naming the offending key."""
    constant_defaults(s.sources)
    _check_ranges(s)
    if not s.audio_codec:
        raise TokenizeError("no model given: set base_settings.audio_codec or --audio_codec")
    if not s.sources:
        raise TokenizeError("no dataset given: add hf_datasets entries or --dataset")
    if not 0 <= s.gzip_level <= 9:
        raise TokenizeError(f"gzip_level must be in 0..9, got {s.gzip_level}")
    if not 0 <= s.shard_index < s.num_shards:
        raise TokenizeError(f"shard_index must be in 0..num_shards-1 ({s.num_shards - 1}), got {s.shard_index}")
    if s.precision not in ("fp32", "bf16"):
        raise TokenizeError(f"precision must be fp32 or bf16, got {s.precision!r}")
    if s.max_seconds is not None and s.max_seconds <= 0:
        raise TokenizeError(f"max_seconds must be positive, got {s.max_seconds}")
    keys = [src.key() for src in s.sources]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise TokenizeError(f"several datasets share the id prefix {dupes}; give them distinct 'id_prefix' values")
    if s.hf_upload is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", s.hf_upload):
        raise TokenizeError(f"save_settings.hf_upload must be a hub repo id like user/name, got {s.hf_upload!r}")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser

    p = OneLineParser(
        prog="python -m training.tokenize",
        description="Encode audio datasets into SNAC token shards (gzip JSONL). Flags override --config values; "
                    "rerunning the same command after an interruption resumes the job.")
    p.add_argument("--config", help="YAML config (base_settings / save_settings / hf_datasets)")
    g = p.add_argument_group("model and output (base_settings)")
    g.add_argument("--audio_codec", help="model: hub id, SNAC directory, our checkpoint file or run directory")
    g.add_argument("--out_dir", "--OUT_DIR", dest="OUT_DIR", help="output folder for shards and logs")
    g.add_argument("--num_readers", type=int, help="decoding processes (default 2)")
    g.add_argument("--qsize", type=int, help="clips buffered between readers and encoders (default 1000)")
    g.add_argument("--gzip_level", type=int, help="gzip compression level 0-9 (default 1)")
    g.add_argument("--buffer_size", type=int, help="write buffer per shard in bytes (default 16 MiB)")
    g.add_argument("--lines_per_file", type=int, help="clips per shard file (default 50000)")
    g.add_argument("--load_dataset_num_proc", type=int, help="processes for datasets.load_dataset of hub datasets")
    g.add_argument("--device", help="auto (every CUDA GPU, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--num_workers", type=int, help="encoder workers (0: one per GPU, or 1 on CPU)")
    g.add_argument("--precision", choices=("fp32", "bf16"), help="encoder precision (bf16: CUDA only)")
    g.add_argument("--batch_size", type=int, help="clips per encode call (0: 2 on CPU, 64 on GPU)")
    g.add_argument("--bucket_clips", type=int, help="clips pooled and sorted by length before batching (0: 16 x batch)")
    g.add_argument("--threads", type=int, help="torch threads per CPU worker (0: cores / workers)")
    g.add_argument("--max_seconds", type=float, help="clips longer than this go to failed.jsonl")
    g.add_argument("--flatten", action="store_true", default=None,
                   help="also write snac_tokens: all levels interleaved per coarse frame (depth-first)")
    g.add_argument("--num_shards", type=int, help="split the job over this many invocations (machines)")
    g.add_argument("--shard_index", type=int, help="which part of the job this invocation does (0-based)")
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress bars")
    g.add_argument("--no_progress", dest="progress", action="store_false", help="never show progress bars")
    d = p.add_argument_group("datasets (hf_datasets; --dataset replaces the config's list)")
    d.add_argument("--dataset", action="append", help="hub id, save_to_disk dir, audio/LJ Speech folder or manifest "
                                                      "(repeat for several; the options below apply to all)")
    d.add_argument("--sub_name", help="hub dataset configuration, e.g. en")
    d.add_argument("--revision", help="hub dataset revision: commit sha, branch, tag or refs/pr/N (default: default branch)")
    d.add_argument("--split", help="split (default train)")
    d.add_argument("--text_column_name", help="text column ('none' for no text; default: 'text' when present)")
    d.add_argument("--audio_column_name", help="audio column (default audio)")
    d.add_argument("--speaker_column_name", help="speaker column (default: none)")
    d.add_argument("--add_constant", action="append", metavar="KEY=VALUE",
                   help="constant field added to every line (repeatable; VALUE is read as JSON when it parses)")
    s = p.add_argument_group("after encoding (save_settings)")
    s.add_argument("--save_local", help="also write the shards as a datasets.save_to_disk folder here")
    s.add_argument("--hf_upload", help="also push the result to this hub dataset repo (needs network and a token)")
    return p


def _parse_constant(text: str) -> Dict[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise TokenizeError(f"--add_constant expects KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return {"key": key, "value": value}


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Config file (if any) overridden by flags, validated."""
    s = load_settings_file(args.config) if args.config else Settings()
    base = {k: getattr(args, k) for k in BASE_KEYS if getattr(args, k, None) is not None}
    _apply_base(s, base, "flag")
    if args.save_local is not None:
        s.save_local = args.save_local
    if args.hf_upload is not None:
        s.hf_upload = args.hf_upload
    if args.dataset:
        entry: Dict[str, Any] = {}
        for key in ("sub_name", "revision", "split", "audio_column_name", "speaker_column_name", "text_column_name"):
            value = getattr(args, key)
            if value is not None:
                entry[key] = None if value.lower() in ("none", "null") and key.endswith("column_name") else value
        constants = [_parse_constant(c) for c in args.add_constant or []]
        s.sources = [source_from_dict({"name": n, **entry, "add_constant": constants}, f"--dataset {n}")
                     for n in args.dataset]
    elif any(getattr(args, k) is not None for k in ("sub_name", "revision", "split", "text_column_name", "audio_column_name",
                                                      "speaker_column_name", "add_constant")):
        raise TokenizeError("dataset options (--split, --text_column_name, ...) need --dataset")
    _distributed_defaults(s, args)
    validate(s)
    return s


def _distributed_defaults(s: Settings, args: argparse.Namespace) -> None:
    """Under torchrun, each rank is one part of the job on its own GPU (unless flags say otherwise)."""
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world and rank and args.num_shards is None and args.shard_index is None and int(world) > 1:
        s.num_shards, s.shard_index = int(world), int(rank)
        if s.device == "auto" and os.environ.get("LOCAL_RANK"):
            s.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


@dataclass
class OpenSource:
    """An opened dataset: random access to raw rows plus how to read text / speaker from them."""

    spec: SourceSpec
    key: str
    records: Any  # training.dataset.FileRecords or HFRecords: len(), row(i) -> dict with "audio"
    text_column: Optional[str]
    speaker_column: Optional[str]

    def __len__(self) -> int:
        return len(self.records)


def open_source(spec: SourceSpec, num_proc: Optional[int] = None) -> OpenSource:
    """Resolve a source with :func:`training.dataset.open_records` (hub ids loaded here, so that
    ``load_dataset_num_proc`` applies). Raises DatasetError / TokenizeError on bad sources."""
    from .dataset import DatasetError, open_records, registry_manifest

    wanted = [c for c in (spec.speaker_column_name,) if c]
    if spec.text_column_name not in (None, "auto"):
        wanted.append(spec.text_column_name)
    target: Any = spec.name
    path = Path(spec.name).expanduser()
    if not path.exists() and _looks_like_hub_id(spec.name) and registry_manifest_safe(registry_manifest, spec):
        target = _load_hub_dataset(spec, num_proc)
    records = open_records(target, split=spec.split, config_name=spec.sub_name, streaming=False,
                           audio_column=spec.audio_column_name, columns=wanted)
    if not hasattr(records, "row"):
        raise DatasetError(f"{spec.name}: streaming sources are not supported by the tokenizer; load it map-style")
    text = spec.text_column_name
    if text == "auto":
        text = "text" if "text" in getattr(records, "columns", []) else None
    return OpenSource(spec, spec.key(), records, text, spec.speaker_column_name)


def registry_manifest_safe(lookup, spec: SourceSpec) -> bool:
    """True when ``spec.name`` is not a registered prepared dataset (so it must be a hub id)."""
    try:
        return lookup(spec.name, spec.split) is None
    except Exception:  # noqa: BLE001 - a registered name with a bad split: let open_records report it
        return False


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith(".")


def _load_hub_dataset(spec: SourceSpec, num_proc: Optional[int]) -> Any:
    """The source's hub dataset (map-style) at its revision, with the environment's token."""
    from .dataset import load_hub_dataset

    return load_hub_dataset(spec.name, spec.sub_name, spec.split, revision=spec.revision, num_proc=num_proc)


# --------------------------------------------------------------------------------------
# Output folder state: lock, job fingerprint, done rows, shard commits, failure log
# --------------------------------------------------------------------------------------


def _ranges(indices: Iterable[int]) -> List[List[int]]:
    """Sorted ints as ``[[start, stop), ...]`` runs (compact id lists for the sidecars)."""
    out: List[List[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_suffix(num_shards: int, shard_index: int) -> str:
    """File-name suffix of per-invocation logs ('' for a single-invocation job)."""
    return "" if num_shards == 1 else f"-{shard_index:05d}-of-{num_shards:05d}"


class OutputState:
    """What ``OUT_DIR`` already holds, and the lock that keeps one writer per shard index."""

    def __init__(self, out_dir: Path, num_shards: int, shard_index: int):
        self.out_dir, self.num_shards, self.shard_index = out_dir, num_shards, shard_index
        self.state_dir = out_dir / STATE_DIR
        self.prefix = f"tokens-{shard_index:05d}-of-{num_shards:05d}-"
        self.failed_path = out_dir / f"failed{shard_suffix(num_shards, shard_index)}.jsonl"
        self._lock_file: Optional[io.TextIOWrapper] = None

    def open(self, fingerprint: Dict[str, Any]) -> None:
        """Create the folders, take the lock, check the job matches, clean interrupted writes."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise TokenizeError(f"OUT_DIR {self.out_dir} exists and is not a folder")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._check_job(fingerprint)
        self._clean_interrupted()
        self._repair_failed_log()
        self._set_aside_damaged()

    def _lock(self) -> None:
        f = open(self.state_dir / f"lock-{self.shard_index:05d}-of-{self.num_shards:05d}", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise TokenizeError(f"another tokenizer run is writing shard index {self.shard_index} "
                                f"in {self.out_dir}; wait for it or stop it first") from None
        self._lock_file = f  # held until this process exits (the kernel drops it even on SIGKILL)

    def _check_job(self, fingerprint: Dict[str, Any]) -> None:
        path = self.state_dir / "job.json"
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if diff:
                raise TokenizeError(f"{self.out_dir} holds shards of a different job ({', '.join(diff)} differ); "
                                    "use a new OUT_DIR, or the same settings to resume")
        elif any(self.out_dir.glob(SHARD_GLOB)):
            raise TokenizeError(f"{self.out_dir} holds token shards but no job record ({STATE_DIR}/job.json); "
                                "use a new OUT_DIR")
        else:
            _atomic_json(path, fingerprint)

    def _clean_interrupted(self) -> None:
        """Remove this shard index's temporary shards and sidecars whose shard never got renamed."""
        for tmp in self.out_dir.glob(f".{self.prefix}*.tmp*"):
            tmp.unlink()
        for tmp in self.state_dir.glob(".*.tmp*"):
            if self.prefix in tmp.name:
                tmp.unlink()
        for side in self.state_dir.glob(f"{self.prefix}*.json"):
            if not (self.out_dir / side.name[:-len(".json")]).is_file():
                side.unlink()

    def _set_aside_damaged(self) -> None:
        """Verify this shard index's shards (complete gzip stream, line count equal to the id
        list) and rename damaged ones to ``<name>.damaged``: their rows become pending again and
        are encoded into new shards. Reads every shard once per start (gzip level 1 decompresses
        at hundreds of MB/s)."""
        for shard in self.shards():
            if not shard.name.startswith(self.prefix):
                continue  # another invocation's shards: that invocation checks them
            side = self.state_dir / f"{shard.name}.json"
            problem = shard_problem(shard, side)
            if problem is None:
                continue
            target = shard.with_name(shard.name + ".damaged")
            n = 1
            while target.exists():
                n += 1
                target = shard.with_name(f"{shard.name}.damaged{n}")
            os.replace(shard, target)
            side.unlink(missing_ok=True)
            print(f"warning: {shard.name} is damaged ({problem}); kept as {target.name}, its rows are encoded again",
                  file=sys.stderr)

    def _repair_failed_log(self) -> None:
        """Drop a half-written last line (a kill mid-write); its row will simply be retried."""
        if not self.failed_path.is_file():
            return
        data = self.failed_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.failed_path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def shards(self) -> List[Path]:
        return sorted(p for p in self.out_dir.glob(SHARD_GLOB) if _SHARD_RE.match(p.name))

    def next_part(self) -> int:
        parts = [int(_SHARD_RE.match(p.name).group(3)) for p in self.shards() if p.name.startswith(self.prefix)]
        return max(parts, default=-1) + 1

    def done(self) -> Tuple[Dict[str, set], Dict[str, float]]:
        """Row indices per source key already in a complete shard or a failure log (any shard
        index), and totals of what the complete shards hold."""
        done: Dict[str, set] = {}
        totals = {"lines": 0, "seconds": 0.0, "failed": 0}
        for shard in self.shards():
            side = self.state_dir / f"{shard.name}.json"
            info = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else _sidecar_from_shard(shard)
            for key, runs in info["ids"].items():
                rows = done.setdefault(key, set())
                for a, b in runs:
                    rows.update(range(a, b))
            totals["lines"] += info["lines"]
            totals["seconds"] += info["seconds"]
        for log in self.out_dir.glob("failed*.jsonl"):
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a half-written line of another shard index's live run
                done.setdefault(rec["source"], set()).add(int(rec["index"]))
                totals["failed"] += 1
        return done, totals


def shard_problem(shard: Path, sidecar: Path) -> Optional[str]:
    """Why a committed shard cannot be trusted (None when its gzip stream is complete and its
    line count matches its id list)."""
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None
    except (OSError, json.JSONDecodeError):
        info = None  # rebuilt from the shard itself below
    lines = 0
    try:
        with gzip.open(shard, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    return "its last line is incomplete"
                lines += 1
    except (OSError, EOFError, zlib.error) as e:
        return f"incomplete gzip stream: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if info is not None:
        listed = sum(b - a for runs in info.get("ids", {}).values() for a, b in runs)
        if lines != info.get("lines") or lines != listed:
            return f"{lines} lines but its id list names {listed}"
    return None


def _sidecar_from_shard(shard: Path) -> Dict[str, Any]:
    """Id list of a complete shard without sidecar (e.g. shards copied without .tokenize/)."""
    ids: Dict[str, List[int]] = {}
    lines, seconds = 0, 0.0
    with gzip.open(shard, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            ids.setdefault(rec["source"], []).append(int(rec["index"]))
            lines += 1
            seconds += float(rec.get("duration") or 0.0)
    return {"ids": {k: _ranges(v) for k, v in ids.items()}, "lines": lines, "seconds": seconds}


class ShardWriter:
    """Streams lines into a temporary gzip file; commits it as a shard every ``lines_per_file``."""

    def __init__(self, state: OutputState, lines_per_file: int, gzip_level: int, buffer_size: int):
        self.state, self.lines_per_file = state, lines_per_file
        self.gzip_level, self.buffer_size = gzip_level, buffer_size
        self.part = state.next_part()
        self.committed: List[Path] = []
        self._open_part()

    def _open_part(self) -> None:
        self.name = f"{self.state.prefix}{self.part:06d}.jsonl.gz"
        self.tmp = self.state.out_dir / f".{self.name}.tmp{os.getpid()}"
        self._raw = open(self.tmp, "wb", buffering=self.buffer_size)
        # mtime=0: identical content gives identical bytes, whatever the time of the run.
        self._gz = gzip.GzipFile(filename="", mode="wb", compresslevel=self.gzip_level, fileobj=self._raw, mtime=0)
        self.ids: Dict[str, List[int]] = {}
        self.lines, self.seconds = 0, 0.0

    def add(self, key: str, index: int, seconds: float, line: str) -> None:
        self._gz.write(line.encode("utf-8"))
        self._gz.write(b"\n")
        self.ids.setdefault(key, []).append(index)
        self.lines += 1
        self.seconds += seconds
        if self.lines >= self.lines_per_file:
            self.commit()
            self._open_part()

    def commit(self) -> Optional[Path]:
        """Finish the current part: fsync it, write its id list, then rename it into place."""
        self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        if self.lines == 0:
            self.tmp.unlink()
            return None
        final = self.state.out_dir / self.name
        info = {"ids": {k: _ranges(v) for k, v in self.ids.items()}, "lines": self.lines, "seconds": self.seconds}
        _atomic_json(self.state.state_dir / f"{self.name}.json", info)  # sidecar first: see module docstring
        os.replace(self.tmp, final)
        _fsync_dir(self.state.out_dir)
        self.committed.append(final)
        self.part += 1
        return final

    def close(self) -> None:
        self.commit()


class FailureLog:
    """Appends one JSON line per failed row; one ``write`` per line so a kill leaves at most a
    partial last line (removed on the next start)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.count = 0

    def add(self, record: Dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


# --------------------------------------------------------------------------------------
# Token layout
# --------------------------------------------------------------------------------------


def flatten_order(vq_strides: Sequence[int]) -> List[Tuple[int, int]]:
    """``(level, offset)`` of each token within one coarse frame, depth-first.

    Level ``l`` has ``vq_strides[0] // vq_strides[l]`` codes per coarse frame. For strides
    (4, 2, 1) the order is l1[0], l2[0], l3[0], l3[1], l2[1], l3[2], l3[3] (7 tokens); for
    (8, 4, 2, 1) it is the 15-token analogue.
    """
    for a, b in zip(vq_strides, vq_strides[1:]):
        if a % b:
            raise TokenizeError(f"cannot flatten codes: vq_strides {list(vq_strides)} are not nested multiples")
    order: List[Tuple[int, int]] = []

    def visit(level: int, offset: int) -> None:
        order.append((level, offset))
        if level + 1 < len(vq_strides):
            ratio = vq_strides[level] // vq_strides[level + 1]
            for child in range(ratio):
                visit(level + 1, offset * ratio + child)

    visit(0, 0)
    return order


def flatten_codes(codes: Sequence[np.ndarray], vq_strides: Sequence[int]) -> np.ndarray:
    """All levels interleaved frame by frame in :func:`flatten_order` (1-D int64)."""
    frames = len(codes[0])
    per = [vq_strides[0] // s for s in vq_strides]
    columns = [codes[level].reshape(frames, per[level])[:, offset] for level, offset in flatten_order(vq_strides)]
    return np.stack(columns, axis=1).reshape(-1)


# --------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this child when the parent dies (the parent may be SIGKILLed)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _put(q: Any, item: Any, parent: int) -> None:
    """Blocking put that gives up when the parent is gone (no orphan blocked forever)."""
    while True:
        try:
            q.put(item, timeout=1.0)
            return
        except queue.Full:
            if os.getppid() != parent:
                os._exit(1)


@dataclass
class ReaderJob:
    """One reader's share: (source number, row indices) pairs and how to decode."""

    reader: int
    sources: List[OpenSource]
    tasks: List[Tuple[int, np.ndarray]]
    sample_rate: int
    max_seconds: Optional[float]


def _row_fields(src: OpenSource, row: Mapping[str, Any]) -> Dict[str, Any]:
    # "" rather than null for a missing value: see constant_defaults for why shards avoid nulls.
    def text_of(col: Optional[str]) -> str:
        return "" if col is None or row.get(col) is None else str(row[col])

    return {"name": text_of("id"), "text": text_of(src.text_column), "speaker": text_of(src.speaker_column)}


def reader_main(job: ReaderJob, audio_q: Any, result_q: Any, parent: int) -> None:
    """Decode + resample this reader's rows; send audio to ``audio_q``, failures to ``result_q``."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    from .audio import AudioReadError, decode_audio

    last, count, seconds = time.monotonic(), 0, 0.0
    for src_no, indices in job.tasks:
        src = job.sources[src_no]
        for index in indices.tolist():
            fields: Dict[str, Any] = {"name": None}
            try:
                row = src.records.row(index)
                fields = _row_fields(src, row)
                audio, _ = decode_audio(row["audio"], job.sample_rate)
                n = int(audio.shape[-1])
                if job.max_seconds is not None and n > job.max_seconds * job.sample_rate:
                    raise AudioReadError(f"{n / job.sample_rate:.1f} s is longer than max_seconds={job.max_seconds}")
            except Exception as e:  # noqa: BLE001 - any bad row is a failure record, never a stop
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                _put(result_q, ("failed", {"id": f"{src.key}/{index}", "source": src.key, "index": index,
                                           "name": fields.get("name"), "reason": reason}), parent)
                continue
            _put(audio_q, (src_no, index, fields, audio[0].numpy()), parent)
            count += 1
            seconds += n / job.sample_rate
            now = time.monotonic()
            if now - last >= READER_PROGRESS_EVERY:
                _put(result_q, ("read", job.reader, count, seconds), parent)
                count, seconds, last = 0, 0.0, now
    _put(result_q, ("read", job.reader, count, seconds), parent)
    # Flush this process's queue feeder before reporting done, so that the parent's end-of-input
    # markers, sent after every reader is done, reach the workers after all audio.
    audio_q.close()
    audio_q.join_thread()
    result_q.put(("reader_done", job.reader))


@dataclass
class WorkerJob:
    """One encoder worker: model source, device and batching, plus the line layout."""

    worker: int
    audio_codec: str
    device: str
    precision: str
    batch_size: int
    bucket_clips: int
    threads: int
    flatten: bool
    keys: List[str]
    constants: List[Dict[str, Any]]  # per source: every constant key of the job (None when unset)
    with_speaker: bool


class _Encoder:
    """Pools clips, encodes them in length-sorted batches, turns codes into JSON lines."""

    def __init__(self, job: WorkerJob, result_q: Any, parent: int):
        import torch

        from .codec import load_codec

        if job.threads:
            torch.set_num_threads(job.threads)
        self.job, self.result_q, self.parent = job, result_q, parent
        self.codec = load_codec(job.audio_codec, device=job.device, precision=job.precision,
                                batch_size=job.batch_size)
        self.strides = list(self.codec.cfg.vq_strides)
        self.rate = self.codec.sample_rate
        self.pool: List[Tuple[int, int, Dict[str, Any], np.ndarray]] = []

    def add(self, item: Tuple[int, int, Dict[str, Any], np.ndarray]) -> None:
        self.pool.append(item)
        if len(self.pool) >= self.job.bucket_clips:
            self.flush()

    def flush(self) -> None:
        """Encode every pooled clip: sorted by length so batch members pad little."""
        pool = sorted(self.pool, key=lambda it: len(it[3]))
        self.pool = []
        for start in range(0, len(pool), self.job.batch_size):
            self._encode(pool[start:start + self.job.batch_size])

    def _encode(self, batch: List[Tuple[int, int, Dict[str, Any], np.ndarray]]) -> None:
        import torch

        try:
            # The TorchScript profiling executor re-specialises snac's scripted Snake for every new
            # input length, which costs more than it saves on variable-length clips.
            with torch.jit.optimized_execution(False):
                per_item = self.codec.encode_many([torch.from_numpy(it[3]) for it in batch])
        except RuntimeError as e:  # out of memory and other per-input failures: retry alone, then fail it
            if len(batch) > 1:
                for it in batch:
                    self._encode([it])
                return
            src_no, index, fields, _ = batch[0]
            key = self.job.keys[src_no]
            _put(self.result_q, ("failed", {"id": f"{key}/{index}", "source": key, "index": index,
                                            "name": fields.get("name"),
                                            "reason": f"encode failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"}),
                 self.parent)
            return
        out = []
        for (src_no, index, fields, audio), codes in zip(batch, per_item):
            levels = [c.numpy() for c in codes]
            seconds = len(audio) / self.rate
            out.append((self.job.keys[src_no], index, seconds, [len(c) for c in levels],
                        self._line(src_no, index, fields, seconds, levels)))
        _put(self.result_q, ("encoded", self.job.worker, out), self.parent)

    def _line(self, src_no: int, index: int, fields: Dict[str, Any], seconds: float, levels: List[np.ndarray]) -> str:
        key = self.job.keys[src_no]
        rec: Dict[str, Any] = {"id": f"{key}/{index}", "source": key, "index": index,
                               "name": fields["name"] or str(index), "text": fields["text"]}
        if self.job.with_speaker:
            rec["speaker"] = fields["speaker"]
        rec.update(self.job.constants[src_no])
        rec["duration"] = round(seconds, 6)
        rec["num_layers"] = len(levels)
        rec["token_lengths"] = [len(c) for c in levels]
        for level, c in enumerate(levels, 1):
            rec[f"snac_layer_{level}"] = c.tolist()
        if self.job.flatten:
            rec["snac_tokens"] = flatten_codes(levels, self.strides).tolist()
        return json.dumps(rec, ensure_ascii=False, separators=(",", ":"))


def worker_main(job: WorkerJob, audio_q: Any, result_q: Any, parent: int) -> None:
    """Encoder worker: read clips until the end marker (None), then flush and report done."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        enc = _Encoder(job, result_q, parent)
    except Exception as e:  # noqa: BLE001 - report why this worker cannot start, then stop
        result_q.put(("worker_error", job.worker, str(e).splitlines()[0] if str(e) else type(e).__name__))
        return
    result_q.put(("worker_ready", job.worker))
    try:
        while True:
            try:
                item = audio_q.get(timeout=0.5)
            except queue.Empty:
                if os.getppid() != parent:
                    os._exit(1)
                enc.flush()  # readers are behind: encode what is here rather than wait
                continue
            if item is None:
                break
            enc.add(item)
        enc.flush()
    except Exception as e:  # noqa: BLE001 - a bug or a broken device: stop the run, rows stay pending
        result_q.put(("worker_error", job.worker, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return
    # Same queue and feeder thread as the results: "done" arrives after this worker's last batch.
    result_q.put(("worker_done", job.worker))


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------


class Progress:
    """Live bars (total, one per reader, one per worker) with clips/s and audio hours/s."""

    def __init__(self, enabled: bool, total: int, reader_totals: Sequence[int], workers: int):
        self.enabled = enabled
        self.start = time.monotonic()
        self.bars: Dict[Tuple[str, int], Any] = {}
        self.hours: Dict[Tuple[str, int], float] = {}
        if not enabled:
            return
        from tqdm import tqdm

        def bar(label: str, n: int, pos: int, total_: Optional[int]) -> None:
            self.bars[(label, n)] = tqdm(total=total_, desc=f"{label} {n}" if label != "total" else "total",
                                         unit="clip", position=pos, leave=label == "total", dynamic_ncols=True)
            self.hours[(label, n)] = 0.0

        bar("total", 0, 0, total)
        for r, t in enumerate(reader_totals):
            bar("reader", r, 1 + r, t)
        for w in range(workers):
            bar("worker", w, 1 + len(reader_totals) + w, None)

    def update(self, label: str, n: int, clips: int, seconds: float) -> None:
        if not self.enabled:
            return
        key = (label, n)
        self.hours[key] += seconds / 3600.0
        bar = self.bars[key]
        bar.update(clips)
        elapsed = max(1e-9, time.monotonic() - self.start)
        bar.set_postfix_str(f"{self.hours[key]:.3f} h audio, {self.hours[key] / elapsed:.4f} h/s", refresh=False)

    def close(self) -> None:
        for bar in reversed(list(self.bars.values())):
            bar.close()


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What one invocation did (and what OUT_DIR holds afterwards)."""

    clips: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    tokens_per_level: List[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    shards_written: List[str] = field(default_factory=list)
    pending_at_start: int = 0
    total_lines: int = 0
    total_failed: int = 0
    complete: bool = False
    saved_local: Optional[str] = None
    uploaded: Optional[str] = None

    def text(self) -> str:
        hours = self.audio_seconds / 3600.0
        speed = hours / (self.wall_seconds / 3600.0) if self.wall_seconds > 0 else 0.0
        tokens = ", ".join(f"level {i + 1}: {n}" for i, n in enumerate(self.tokens_per_level)) or "none"
        lines = [f"clips encoded: {self.clips}   failed: {self.failed}   (rows pending at start: {self.pending_at_start})",
                 f"audio: {hours:.4f} h in {self.wall_seconds:.1f} s wall = {speed:.1f} audio hours per hour",
                 f"tokens per level: {tokens}",
                 f"shards written: {len(self.shards_written)}; OUT_DIR now holds {self.total_lines} lines and "
                 f"{self.total_failed} failed rows ({'job complete' if self.complete else 'job not complete'})"]
        if self.saved_local:
            lines.append(f"saved with save_to_disk: {self.saved_local}")
        if self.uploaded:
            lines.append(f"uploaded to the hub: {self.uploaded}")
        return "\n".join(lines)


def weights_fingerprint(model: Any) -> str:
    """Short hash of a model's weights: resuming with other weights would mix tokenizations."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def job_fingerprint(s: Settings, model_cfg: Any, weights: str) -> Dict[str, Any]:
    """What must not change between a run and its resumption (sharding may change)."""
    sources = []
    for spec in s.sources:
        d = dataclasses.asdict(spec)
        if d.get("revision") is None:  # unpinned sources keep the fingerprints of earlier versions
            d.pop("revision", None)
        path = Path(spec.name).expanduser()
        d["name"] = str(path.resolve()) if path.exists() else spec.name
        d["key"] = spec.key()
        sources.append(d)
    return {"model": model_cfg.snac_kwargs(), "weights": weights, "sources": sources, "flatten": s.flatten}


def plan_devices(s: Settings) -> List[str]:
    """One device per encoder worker."""
    import torch

    from .codec import CodecError, select_device

    try:
        if s.device in ("auto", "cuda") and torch.cuda.is_available():
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        elif s.device == "auto":
            devices = ["cpu"]
        else:
            devices = [str(select_device(s.device))]
    except CodecError as e:
        raise TokenizeError(str(e)) from None
    if s.precision == "bf16" and not devices[0].startswith("cuda"):
        raise TokenizeError("precision bf16 needs a CUDA device; use fp32 on CPU")
    n = s.num_workers or (len(devices) if devices[0].startswith("cuda") else 1)
    return [devices[w % len(devices)] for w in range(n)]


def pending_rows(sources: Sequence[OpenSource], done: Mapping[str, set], num_shards: int,
                 shard_index: int) -> List[np.ndarray]:
    """Per source, the row indices this shard index still has to do (``index % num_shards``)."""
    out = []
    for src in sources:
        mine = np.arange(shard_index, len(src), num_shards, dtype=np.int64)
        finished = done.get(src.key)
        if finished:
            mine = mine[~np.isin(mine, np.fromiter(finished, dtype=np.int64, count=len(finished)))]
        out.append(mine)
    return out


def _reader_jobs(sources: List[OpenSource], pending: List[np.ndarray], n: int, rate: int,
                 max_seconds: Optional[float]) -> List[ReaderJob]:
    return [ReaderJob(r, sources, [(i, p[r::n]) for i, p in enumerate(pending) if len(p[r::n])], rate, max_seconds)
            for r in range(n)]


def _worker_jobs(s: Settings, devices: List[str], sources: List[OpenSource]) -> List[WorkerJob]:
    gpu = devices[0].startswith("cuda")
    # On CPU, big batches only add memory traffic (2 cores: batch 4 was slower than 1 or 2).
    batch = s.batch_size or (64 if gpu else 2)
    defaults = constant_defaults([src.spec for src in sources])
    constants = [{**defaults, **src.spec.constants()} for src in sources]
    threads = s.threads or (0 if gpu else max(1, (os.cpu_count() or 1) // len(devices)))
    return [WorkerJob(w, s.audio_codec, dev, s.precision, batch, s.bucket_clips or 16 * batch, threads, s.flatten,
                      [src.key for src in sources], constants, any(src.speaker_column for src in sources))
            for w, dev in enumerate(devices)]


class _Children:
    """The reader and worker processes; stops them all on exit."""

    def __init__(self) -> None:
        self.procs: Dict[Tuple[str, int], Any] = {}

    def start(self, ctx: Any, kind: str, n: int, target: Any, args: Tuple[Any, ...]) -> None:
        p = ctx.Process(target=target, args=args, name=f"tokenize-{kind}-{n}", daemon=True)
        p.start()
        self.procs[(kind, n)] = p

    def check(self, finished: Mapping[str, set]) -> None:
        """Raise when a child died without reporting done (crash, OOM kill)."""
        for (kind, n), p in self.procs.items():
            if n not in finished[kind] and p.exitcode is not None:
                raise RuntimeError(f"{kind} {n} stopped unexpectedly (exit code {p.exitcode}); "
                                   "rerun the same command to resume")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        for p in self.procs.values():
            p.join(timeout=10)


def _pipeline(s: Settings, sources: List[OpenSource], pending: List[np.ndarray], rate: int,
              writer: ShardWriter, failures: FailureLog, summary: Summary) -> None:
    """Run readers and workers over ``pending`` until every row is written or failed."""
    devices = plan_devices(s)
    ctx = mp.get_context("spawn")  # CUDA and OpenMP thread pools do not survive fork
    audio_q, result_q = ctx.Queue(maxsize=s.qsize), ctx.Queue()
    readers = _reader_jobs(sources, pending, s.num_readers, rate, s.max_seconds)
    workers = _worker_jobs(s, devices, sources)
    progress = Progress(sys.stderr.isatty() if s.progress is None else s.progress,
                        sum(len(p) for p in pending), [sum(len(t[1]) for t in j.tasks) for j in readers], len(workers))
    children, parent = _Children(), os.getpid()
    finished: Dict[str, set] = {"reader": set(), "worker": set()}
    try:
        # Readers first: they fill the queue while the workers load the model.
        for r in readers:
            children.start(ctx, "reader", r.reader, reader_main, (r, audio_q, result_q, parent))
        for w in workers:
            children.start(ctx, "worker", w.worker, worker_main, (w, audio_q, result_q, parent))
        while len(finished["worker"]) < len(workers):
            try:
                msg = result_q.get(timeout=1.0)
            except queue.Empty:
                children.check(finished)
                continue
            _handle(msg, s, writer, failures, summary, progress, finished, audio_q, len(readers), len(workers))
    finally:
        progress.close()
        children.stop()


def _handle(msg: Tuple[Any, ...], s: Settings, writer: ShardWriter, failures: FailureLog, summary: Summary,
            progress: Progress, finished: Dict[str, set], audio_q: Any, n_readers: int, n_workers: int) -> None:
    kind = msg[0]
    if kind == "encoded":
        for key, index, seconds, lengths, line in msg[2]:
            writer.add(key, index, seconds, line)
            summary.clips += 1
            summary.audio_seconds += seconds
            summary.tokens_per_level = [a + b for a, b in zip(summary.tokens_per_level or [0] * len(lengths), lengths)]
            progress.update("worker", msg[1], 1, seconds)
            progress.update("total", 0, 1, seconds)
    elif kind == "failed":
        failures.add(msg[1])
        summary.failed += 1
        progress.update("total", 0, 1, 0.0)
    elif kind == "read":
        progress.update("reader", msg[1], msg[2], msg[3])
    elif kind == "reader_done":
        finished["reader"].add(msg[1])
        if len(finished["reader"]) == n_readers:
            for _ in range(n_workers):
                audio_q.put(None)  # end of input, after all audio (readers flushed their feeders)
    elif kind == "worker_done":
        finished["worker"].add(msg[1])
    elif kind == "worker_error":
        raise RuntimeError(f"encoder worker {msg[1]} failed: {msg[2]}; rerun the same command to resume")


def run(s: Settings) -> Summary:
    """Tokenize everything ``s`` names that OUT_DIR does not hold yet; then apply save_settings."""
    from .model import load_generator

    t0 = time.monotonic()
    model, cfg = load_generator(s.audio_codec, "cpu")
    fingerprint = job_fingerprint(s, cfg, weights_fingerprint(model))
    del model
    if s.flatten:
        flatten_order(cfg.vq_strides)  # fail now, not in a worker, when the strides cannot interleave
    sources = [open_source(spec, s.load_dataset_num_proc) for spec in s.sources]
    state = OutputState(s.out_dir, s.num_shards, s.shard_index)
    _check_save_target(s, state)
    state.open(fingerprint)
    done, _ = state.done()
    pending = pending_rows(sources, done, s.num_shards, s.shard_index)
    summary = Summary(pending_at_start=int(sum(len(p) for p in pending)), tokens_per_level=[0] * cfg.n_levels)
    if summary.pending_at_start:
        writer = ShardWriter(state, s.lines_per_file, s.gzip_level, s.buffer_size)
        failures = FailureLog(state.failed_path)
        try:
            _pipeline(s, sources, pending, cfg.sampling_rate, writer, failures, summary)
        finally:
            # Complete lines are worth keeping even when the run stops early (Ctrl-C, a crash).
            writer.close()
            failures.close()
            summary.shards_written = [p.name for p in writer.committed]
    summary.wall_seconds = time.monotonic() - t0
    done, totals = state.done()
    summary.total_lines, summary.total_failed = int(totals["lines"]), int(totals["failed"])
    summary.complete = all(set(range(len(src))) <= done.get(src.key, set()) for src in sources)
    _atomic_json(s.out_dir / f"summary{shard_suffix(s.num_shards, s.shard_index)}.json", dataclasses.asdict(summary))
    if summary.complete:
        _save_outputs(s, state, summary)
    return summary


# --------------------------------------------------------------------------------------
# save_settings
# --------------------------------------------------------------------------------------


class UploadError(RuntimeError):
    """push_to_hub failed (offline, no token, ...); the shards on disk are complete."""


def _check_save_target(s: Settings, state: OutputState) -> None:
    """Refuse early (not after hours of encoding) to overwrite a folder we did not write."""
    if not s.save_local:
        return
    target = Path(s.save_local).expanduser().resolve()
    marker = state.state_dir / "saved_local.json"
    ours = marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("path") == str(target)
    if target.exists() and not ours:
        raise TokenizeError(f"save_settings.local target {target} already exists; choose a new folder")


def _save_outputs(s: Settings, state: OutputState, summary: Summary) -> None:
    if not (s.save_local or s.hf_upload):
        return
    shard_names = [p.name for p in state.shards()]
    ds = None
    if s.save_local:
        target = Path(s.save_local).expanduser().resolve()
        marker = state.state_dir / "saved_local.json"
        prev = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
        if not (prev.get("path") == str(target) and prev.get("shards") == shard_names and target.exists()):
            ds = _load_shards(state)
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            ds.save_to_disk(str(tmp))
            os.rename(tmp, target)  # fails rather than replace a folder that appeared meanwhile
            _atomic_json(marker, {"path": str(target), "shards": shard_names})
        summary.saved_local = str(target)
    if s.hf_upload:
        marker = state.state_dir / "uploaded.json"
        prev = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
        if not (prev.get("repo") == s.hf_upload and prev.get("shards") == shard_names):
            ds = ds if ds is not None else _load_shards(state)
            try:
                ds.push_to_hub(s.hf_upload)
            except Exception as e:  # noqa: BLE001 - offline, auth, quota: one line, shards stay
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UploadError(f"upload to {s.hf_upload} failed ({type(e).__name__}: {first}); the shards in "
                                  f"{s.out_dir} are complete - rerun the same command to retry the upload") from None
            _atomic_json(marker, {"repo": s.hf_upload, "shards": shard_names})
        summary.uploaded = s.hf_upload


def _load_shards(state: OutputState) -> Any:
    """All shards as one ``datasets.Dataset``; its Arrow cache lives in OUT_DIR/.tokenize and is
    removed when this process exits (the returned dataset memory-maps it until then)."""
    import atexit
    import shutil

    import datasets as hf

    cache = state.state_dir / f"hf_cache{os.getpid()}"
    atexit.register(shutil.rmtree, cache, True)
    hf.disable_progress_bars()  # the summary reports the result; keep stderr for errors
    return hf.load_dataset("json", data_files=[str(p) for p in state.shards()], split="train", cache_dir=str(cache))


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _user_errors() -> Tuple[type, ...]:
    from .config import ConfigError
    from .codec import CodecError
    from .dataset import DatasetError
    from .model import ModelLoadError

    return (TokenizeError, ConfigError, CodecError, DatasetError, ModelLoadError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: exit 0 when done, 2 for bad input (one line on stderr), 1 for a failed upload or crash."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        summary = run(settings)
    except _user_errors() as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except UploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: complete lines were committed; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # an OUT_DIR we may not write (2), a full disk (2), an I/O error (1): rows stay pending
        from .cli import os_error_exit_code, os_error_message

        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return os_error_exit_code(e)
    except RuntimeError as e:  # a crashed child: rows stay pending for a rerun
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
