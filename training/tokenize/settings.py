"""Tokenizer job settings: the dataclasses, YAML/dict parsing and validation, and the command-line
parser."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple


RESERVED_FIELDS = ("id", "source", "index", "name", "text", "speaker", "duration", "num_layers",
                   "token_lengths", "snac_tokens")


class TokenizeError(ValueError):
    """A user mistake in the tokenizer's config, flags or output folder (exit code 2)."""


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


def build_parser() -> argparse.ArgumentParser:
    from ..cli import OneLineParser

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
