"""Exactly-once output state: completed shards and their id lists, atomic shard commits and the failure
log."""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..errors import first_line
from .settings import TokenizeError


STATE_DIR = ".tokenize"  # inside OUT_DIR: job fingerprint, shard id lists, locks


SHARD_GLOB = "tokens-*.jsonl.gz"


_SHARD_RE = re.compile(r"^tokens-(\d{5})-of-(\d{5})-(\d{6})\.jsonl\.gz$")


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
        return f"incomplete gzip stream: {first_line(e)}"
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
