"""Reader and encoder processes: decode clips, encode them in exact batches, flatten codes into token
rows."""

from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import first_line
from .settings import TokenizeError
from .sources import OpenSource


READER_PROGRESS_EVERY = 0.5  # seconds between a reader's progress messages


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
    from ..audio import AudioReadError, decode_audio

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
                reason = first_line(e)
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

        from ..codec import load_codec

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
                                            "reason": f"encode failed: {first_line(e)}"}),
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
        result_q.put(("worker_error", job.worker, first_line(e)))
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
