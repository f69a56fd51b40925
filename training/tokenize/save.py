"""Saving finished token shards as a datasets folder and uploading them to the hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import first_line
from .ledger import OutputState, _atomic_json
from .progress import Summary
from .settings import Settings, TokenizeError


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
                first = first_line(e)
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
