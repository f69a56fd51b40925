"""Building train/validation data from a config, and the resumable infinite DDP loader."""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..audio import AudioReadError
from .datasets import AudioDataset, CombinedAudioDataset, StreamingAudioDataset, _make_item, collate_audio
from .sources import DatasetError, load_registry, open_records, registry_path


class EpochBatchSampler:
    """Batches of ``(row, epoch)`` keys for one rank: a seeded permutation per epoch shared by
    all ranks, rank ``r`` taking every ``world_size``-th entry (padded by wrapping so ranks get
    equal counts, as ``DistributedSampler`` does), full batches only, skipping ``start_batch``."""

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = self.start_batch = 0

    def rank_rows(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = math.ceil(self.size / self.world_size)
        order = (order * math.ceil(per_rank * self.world_size / self.size))[: per_rank * self.world_size]
        rows = order[self.rank::self.world_size]
        if len(rows) < self.batch_size:  # tiny data: repeat so one full batch exists
            rows = (rows * math.ceil(self.batch_size / len(rows)))[: self.batch_size]
        return rows

    def __len__(self) -> int:
        return len(self.rank_rows(0)) // self.batch_size

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        rows, bs = self.rank_rows(self.epoch), self.batch_size
        for b in range(self.start_batch, len(rows) // bs):
            yield [(r, self.epoch) for r in rows[b * bs:(b + 1) * bs]]


def _seed_worker(worker_id: int) -> None:
    """Distinct, reproducible numpy / random seeds per worker (torch seeds itself)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class InfiniteLoader:
    """Endless iterator of collated batches over epochs, with a resumable position.

    ``state_dict()`` -> ``{"epoch", "batches", "seed", "rank", "world_size"}``: the epoch and the
    number of batches of it already returned. ``load_state_dict`` restarts at exactly that batch
    for map-style data (the sampler skips the consumed batches; crops are keyed by
    ``(seed, epoch, row)``); for streams each worker drops the rows it had already produced.
    """

    def __init__(self, dataset: Union[Dataset, IterableDataset], batch_size: int, *, num_workers: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, max_failure_fraction: float = 0.5,
                 pin_memory: bool = False):
        self.dataset, self.batch_size, self.num_workers = dataset, int(batch_size), int(num_workers)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.streaming = isinstance(dataset, IterableDataset)
        self.epoch = self.batches = 0
        self.max_failure_fraction, self.pin_memory = max_failure_fraction, pin_memory
        self.sampler = None if self.streaming else EpochBatchSampler(
            len(dataset), self.batch_size, rank=rank, world_size=world_size, seed=seed)
        self._loader: Optional[DataLoader] = None
        self._it: Optional[Iterator] = None
        self._reset_counts()

    # -- position ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(f"data seed changed ({state.get('seed')} -> {self.seed}): the resumed data order differs")
        if int(state.get("world_size", self.world_size)) != self.world_size:
            warnings.warn("world size changed since the checkpoint: resuming at the same epoch and batch "
                          "count, but batch contents differ")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._it = None

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> "InfiniteLoader":
        return self

    def __next__(self) -> Dict[str, Any]:
        empty_epochs = 0
        while True:
            if self._it is None:
                self._it = self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                empty_epochs = empty_epochs + 1 if self.batches == 0 else 0
                if empty_epochs >= 2:
                    raise DatasetError("the dataset produced no batches in a whole epoch "
                                       f"(batch size {self.batch_size}; too few readable items for this rank?)") from None
                self._end_epoch()
                continue
            self.batches += 1
            self._account(batch)
            return batch

    def _make_loader(self) -> DataLoader:
        common = dict(num_workers=self.num_workers, collate_fn=collate_audio, worker_init_fn=_seed_worker,
                      pin_memory=self.pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(self.seed * 7919 + self.rank))
        if self.streaming:
            return DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True, **common)
        # Map-style: workers persist across epochs; the sampler (main process) carries the epoch.
        common["persistent_workers"] = self.num_workers > 0
        return DataLoader(self.dataset, batch_sampler=self.sampler, **common)

    def _start_epoch(self) -> Iterator[Dict[str, Any]]:
        if self.streaming:
            self.dataset.set_epoch(self.epoch)
            self.dataset.resume_batches, self.dataset.resume_batch_size = self.batches, self.batch_size
            return iter(self._make_loader())
        self.sampler.epoch, self.sampler.start_batch = self.epoch, self.batches
        if self._loader is None:
            self._loader = self._make_loader()
        return iter(self._loader)

    def _end_epoch(self) -> None:
        if self.failed:
            reasons = Counter(r.split(": ", 1)[-1].split(" (")[0] for r in self.reasons)
            warnings.warn(f"data epoch {self.epoch}: skipped {self.failed} unreadable item(s) "
                          f"of {self.failed + self.ok}; reasons: {dict(reasons.most_common(5))}")
        self.epoch += 1
        self.batches = 0
        self._it = None
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.ok = self.failed = 0
        self.reasons: List[str] = []

    def _account(self, batch: Mapping[str, Any]) -> None:
        """Epoch-level failure accounting over all workers (they report via ``skipped``)."""
        skipped = batch.get("skipped", [])
        self.ok += len(batch["id"])
        self.failed += len(skipped)
        self.reasons.extend(skipped[:100])
        total = self.ok + self.failed
        if total >= 32 and self.failed > self.max_failure_fraction * total:
            raise DatasetError(f"{self.failed} of {total} audio reads failed this epoch (more than "
                               f"data.max_failure_fraction={self.max_failure_fraction}); e.g. {skipped[:1]}")

    def close(self) -> None:
        """Stop persistent workers (they also stop when the loader is garbage-collected)."""
        self._it = None
        self._loader = None


def resolve_source(data: Any) -> Tuple[Any, Optional[str]]:
    """``(source, default validation split)`` for a DataConfig: preset, registry name or path."""
    from ..config import DATASET_CONFIGS

    if data.dataset_path:
        return data.dataset_path, None
    if data.dataset:
        if data.dataset in DATASET_CONFIGS:
            return DATASET_CONFIGS[data.dataset]["dataset_path"], DATASET_CONFIGS[data.dataset].get("val_split")
        entry = load_registry().get(data.dataset)
        if entry is None:
            raise DatasetError(f"unknown dataset {data.dataset!r}: not a preset ({sorted(DATASET_CONFIGS)}) "
                               f"and not in the registry {registry_path()}; run "
                               "`python -m training.dataset prepare` first")
        return data.dataset, ("validation" if "validation" in entry.get("manifests", {}) else None)
    raise DatasetError("no training data configured: set data.dataset or data.dataset_path")


def _dataset_kwargs(data: Any, sample_rate: int, segment_length: int, random_crop: bool) -> Dict[str, Any]:
    return dict(config_name=data.config_name, revision=data.revision, audio_column=data.audio_column,
                text_column=data.text_column,
                speaker_column=data.speaker_column, random_crop=random_crop, seed=data.seed,
                loudness_db=data.loudness_db, silence_db=data.silence_db,
                max_silence_retries=data.max_silence_retries, max_failure_fraction=data.max_failure_fraction,
                max_item_retries=data.max_item_retries)


def held_out_rows(n: int, val_items: int, seed: int) -> Tuple[List[int], List[int]]:
    """Deterministic ``(train_rows, val_rows)``: ``val_items`` rows (at most a fifth of a small
    dataset, at least one) chosen by a seeded permutation; both lists sorted."""
    if val_items <= 0 or n < 2:
        return list(range(n)), []
    k = min(val_items, max(1, n // 5))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345)).tolist()
    return sorted(order[k:]), sorted(order[:k])


def build_datasets(cfg: Any, rank: int = 0, world_size: int = 1) -> Tuple[Any, Any]:
    """``(train_dataset, val_dataset or None)`` for a :class:`training.config.Config`."""
    d, rate = cfg.data, cfg.model.sampling_rate
    source, preset_val = resolve_source(d)
    val_split = d.val_split or preset_val
    train_kw = _dataset_kwargs(d, rate, cfg.segment_length(), True)
    val_kw = _dataset_kwargs(d, rate, cfg.val_segment_length(), False)
    if d.streaming:
        return _streaming_datasets(cfg, source, val_split, train_kw, val_kw, rank, world_size)
    records = open_records(source, split=d.split, config_name=d.config_name, audio_column=d.audio_column,
                           columns=(d.text_column, d.speaker_column), revision=d.revision)
    if val_split:
        train = AudioDataset(records, rate, cfg.segment_length(), **train_kw)
        val = AudioDataset(source, rate, cfg.val_segment_length(), split=val_split, **val_kw)
    else:
        train_rows, val_rows = held_out_rows(len(records), d.val_items, d.seed)
        train = AudioDataset(records, rate, cfg.segment_length(), indices=train_rows, **train_kw)
        val = AudioDataset(records, rate, cfg.val_segment_length(), indices=val_rows, **val_kw) if val_rows else None
    if d.extra_datasets:
        extra_kw = {**train_kw, "revision": None}  # data.revision pins the main source only
        extra = [AudioDataset(s, rate, cfg.segment_length(), split=d.split, **extra_kw) for s in d.extra_datasets]
        train = CombinedAudioDataset([train, *extra], d.dataset_weights or None, seed=d.seed)
    return train, val


def _streaming_datasets(cfg, source, val_split, train_kw, val_kw, rank, world_size):
    d, rate = cfg.data, cfg.model.sampling_rate
    if d.extra_datasets:
        raise DatasetError("data.extra_datasets needs map-style data (data.streaming=false)")
    common = dict(split=d.split, shuffle_buffer=d.shuffle_buffer)
    if val_split:
        train = StreamingAudioDataset(source, rate, cfg.segment_length(), rank=rank, world_size=world_size,
                                      **common, **train_kw)
        val = StreamingAudioDataset(source, rate, cfg.val_segment_length(), split=val_split, shuffle_buffer=0,
                                    take_items=d.val_items, **val_kw)
    else:  # the first val_items rows of the stream are held out
        train = StreamingAudioDataset(source, rate, cfg.segment_length(), rank=rank, world_size=world_size,
                                      skip_items=d.val_items, **common, **train_kw)
        val = StreamingAudioDataset(source, rate, cfg.val_segment_length(), split=d.split, shuffle_buffer=0,
                                    take_items=d.val_items, **val_kw) if d.val_items > 0 else None
    return train, val


def validation_batches(val: Any, batch_size: int, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Deterministic first-segment validation batches, decoded once (unreadable items dropped)."""
    if val is None:
        return []
    items: List[Dict[str, Any]] = []
    if isinstance(val, IterableDataset):
        items = list(val)
    else:
        for i in range(len(val)):
            row = val.records.row(i)
            rng = np.random.default_rng([val.seed, 0, i])
            try:
                seg, valid = val.reader(row["audio"], rng)
            except AudioReadError as e:
                warnings.warn(f"validation: skipping unreadable audio: {e}")
                continue
            items.append({**_make_item(row, i, seg, valid, val.text_column, val.speaker_column), "skipped": []})
    items = items[:limit] if limit else items
    return [collate_audio(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def build_dataloaders(cfg: Any, rank: int = 0, world_size: int = 1) -> Tuple[InfiniteLoader, List[Dict[str, Any]]]:
    """``(train_loader, val_batches)`` for a :class:`training.config.Config`.

    ``train_loader``: :class:`InfiniteLoader` (``next(loader)`` -> batch of
    ``cfg.data.batch_size`` crops of ``cfg.segment_length()`` samples for this rank).
    ``val_batches``: list of collated batches of first-segment crops of
    ``cfg.val_segment_length()`` samples; the same on every rank.
    Raises :class:`DatasetError` for a configuration that cannot produce data.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DatasetError(f"rank {rank} is not in [0, world_size={world_size})")
    train, val = build_datasets(cfg, rank, world_size)
    loader = InfiniteLoader(train, cfg.data.batch_size, num_workers=cfg.data.num_workers, seed=cfg.data.seed,
                            rank=rank, world_size=world_size, max_failure_fraction=cfg.data.max_failure_fraction,
                            pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu")
    return loader, validation_batches(val, cfg.data.batch_size)
