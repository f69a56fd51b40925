"""Dataset classes (map-style, streaming, combined): reading, cropping and collating training items."""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..audio import AudioReadError, crop_or_pad, normalize_loudness, open_audio, rms_db
from .sources import DatasetError, FileRecords, HFRecords, _RecordStream, _row_id, open_records


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


class _ReadsSegments:
    """The rate and crop length a dataset's items have, both owned by its :class:`SegmentReader`."""

    reader: SegmentReader

    @property
    def sample_rate(self) -> int:
        return self.reader.sample_rate

    @property
    def segment_length(self) -> int:
        return self.reader.segment_length


class AudioDataset(_ReadsSegments, Dataset):
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


class StreamingAudioDataset(_ReadsSegments, IterableDataset):
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
