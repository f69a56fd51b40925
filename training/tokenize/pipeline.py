"""Runs one tokenize job: plans devices and pending rows, starts readers and encoders, writes results,
reports progress."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .ledger import FailureLog, OutputState, ShardWriter, _atomic_json, shard_suffix
from .progress import Progress, Summary
from .save import _check_save_target, _save_outputs
from .settings import Settings, TokenizeError, constant_defaults
from .sources import OpenSource, open_source
from .workers import ReaderJob, WorkerJob, flatten_order, reader_main, worker_main


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

    from ..codec import CodecError, select_device

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
    from ..hub import load_generator

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
