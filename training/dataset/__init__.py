"""Training data: audio datasets from any source, cropping, collation, infinite DDP loaders.

Sources accepted by :class:`AudioDataset` (``source`` argument):

- a ``datasets.Dataset`` / ``DatasetDict`` / ``IterableDataset`` object,
- a Hugging Face hub id (``"openslr/librispeech_asr"``, with ``config_name`` / ``split`` /
  ``streaming``),
- a directory written by ``Dataset.save_to_disk``,
- an ``audiofolder`` directory (``metadata.csv`` / ``metadata.jsonl`` with a ``file_name``
  column, optional split sub-folders),
- an LJ Speech folder (``metadata.csv`` ``id|text|normalized_text`` + ``wavs/``),
- a plain directory tree of audio files,
- a manifest (``.jsonl`` with a ``path`` field, ``.csv`` / ``.tsv`` with a ``path`` header, or a
  ``.txt`` list of paths), e.g. written by ``python -m training.dataset prepare``,
- a name in the prepared-dataset registry (see :func:`registry_path`).

Items are dicts ``{"audio": (1, segment_length) float32, "length": valid samples, "id": str,
"index": int, ["text"], ["speaker"], "skipped": [...]}`` where ``skipped`` lists the
``"id: reason"`` of unreadable inputs replaced while producing the item (so the main process can
report bad files found inside DataLoader workers).

Reproducibility: a map-style item's crop depends only on ``(seed, epoch, index)``, so the same
batch comes out regardless of worker count or process; the infinite loader's position
(epoch, batches consumed) is saved in checkpoints and restored exactly.
"""

from .sources import (
    MANIFEST_SUFFIXES, SPLIT_NAMES, DatasetError, FileRecords, HFRecords, is_ljspeech_folder,
    read_manifest, registry_path, load_registry, register_dataset, registry_manifest, open_records,
    load_hub_dataset,
)
from .datasets import SegmentReader, AudioDataset, StreamingAudioDataset, CombinedAudioDataset, collate_audio
from .loader import (
    EpochBatchSampler, InfiniteLoader, resolve_source, held_out_rows, build_datasets,
    validation_batches, build_dataloaders,
)
from .prepare import scan_rows, prepare_dataset

__all__ = [
    'AudioDataset', 'CombinedAudioDataset', 'DatasetError', 'EpochBatchSampler', 'FileRecords',
    'HFRecords', 'InfiniteLoader', 'MANIFEST_SUFFIXES', 'SPLIT_NAMES', 'SegmentReader',
    'StreamingAudioDataset', 'build_dataloaders', 'build_datasets', 'collate_audio', 'held_out_rows',
    'is_ljspeech_folder', 'load_hub_dataset', 'load_registry', 'open_records', 'prepare_dataset',
    'read_manifest', 'register_dataset', 'registry_manifest', 'registry_path', 'resolve_source',
    'scan_rows', 'validation_batches',
]
