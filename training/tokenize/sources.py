"""Opening a tokenizer source (hub id, local dataset, folder, manifest, registry name) as rows to
encode."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .settings import SourceSpec


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
    from ..dataset import DatasetError, open_records, registry_manifest

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
    from ..dataset import load_hub_dataset

    return load_hub_dataset(spec.name, spec.sub_name, spec.split, revision=spec.revision, num_proc=num_proc)
