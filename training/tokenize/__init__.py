"""Tokenize whole audio datasets into SNAC token shards (gzip JSONL) for TTS / audio-LM training.

Run ``python -m training.tokenize --config cfg.yaml`` (see ``examples/tokenize_config.yaml``) or
pass everything as flags (``--help``).

Pipeline (one job, one output folder ``OUT_DIR``)::

    reader processes  --(bounded queue, qsize clips)-->  encoder workers  --(results)-->  writer
    decode + resample                                   bucket by length                 (this process)
    to the model rate                                   batched exact encode             shards, failed.jsonl,
                                                                                         progress, summary

- Readers (``num_readers`` processes) decode and resample on the CPU. Unreadable or empty
  clips become ``failed.jsonl`` records; they never stop the run.
- Encoder workers: one per GPU, or CPU workers without a GPU. Each pools up to ``bucket_clips``
  clips, sorts them by length, and encodes batches of similar length with
  :class:`training.codec.Codec`, whose masked batching makes each clip's codes independent of its
  batch neighbours. A clip's codes are exactly those of ``snac.SNAC.encode`` on that clip alone:
  level ``i`` has ``ceil(n / pad_multiple) * pad_multiple / (hop * vq_strides[i])`` codes.
- The writer appends lines to the current shard's temporary file and, every ``lines_per_file``
  lines, commits it: a sidecar listing the shard's row ids is written atomically first, then the
  shard is renamed to its final name. A shard file therefore exists only when complete, and
  every complete shard has its id list.

Exactly once: on start, rows found in complete shards or in the failure logs are done; all
others are (re)processed. Temporary files of interrupted runs are removed. So a run killed at
any moment (SIGKILL included) and started again with the same command finishes the job with
every input row in exactly one place.
"""

from .settings import (
    RESERVED_FIELDS, TokenizeError, SourceSpec, Settings, BASE_KEYS, SOURCE_KEYS, INT_KEYS,
    source_from_dict, settings_from_dict, load_settings_file, constant_defaults, validate, build_parser,
    settings_from_args,
)
from .sources import OpenSource, open_source, registry_manifest_safe
from .ledger import STATE_DIR, SHARD_GLOB, shard_suffix, OutputState, shard_problem, ShardWriter, FailureLog
from .workers import (
    READER_PROGRESS_EVERY, flatten_order, flatten_codes, ReaderJob, reader_main, WorkerJob, worker_main,
)
from .pipeline import weights_fingerprint, job_fingerprint, plan_devices, pending_rows, run
from .command import main
from .progress import Progress, Summary
from .save import UploadError

__all__ = [
    'BASE_KEYS', 'FailureLog', 'INT_KEYS', 'OpenSource', 'OutputState', 'Progress',
    'READER_PROGRESS_EVERY', 'RESERVED_FIELDS', 'ReaderJob', 'SHARD_GLOB', 'SOURCE_KEYS', 'STATE_DIR',
    'Settings', 'ShardWriter', 'SourceSpec', 'Summary', 'TokenizeError', 'UploadError', 'WorkerJob',
    'build_parser', 'constant_defaults', 'flatten_codes', 'flatten_order', 'job_fingerprint',
    'load_settings_file', 'main', 'open_source', 'pending_rows', 'plan_devices', 'reader_main',
    'registry_manifest_safe', 'run', 'settings_from_args', 'settings_from_dict', 'shard_problem',
    'shard_suffix', 'source_from_dict', 'validate', 'weights_fingerprint', 'worker_main',
]
