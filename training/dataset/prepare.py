"""`python -m training.dataset prepare|list`: scan a source, write split manifests and a registry
entry."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..audio import AudioReadError, audio_info, decode_audio
from .sources import DatasetError, FileRecords, load_registry, open_records, register_dataset, registry_path


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


def main(argv: Optional[Sequence[str]] = None) -> int:
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
