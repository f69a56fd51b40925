"""Code agreement of two SNAC models on a folder of audio or on a tokenizer output folder.

:func:`code_agreement` answers "how many of model A's tokens does model B reproduce?", level by
level, pooled over all clips (:mod:`training.agreement` defines the number). Both models encode
with :class:`training.codec.Codec` in float32 (exact batching and chunking, so the codes are
``snac.SNAC.encode``'s for each clip alone).

The input is either

- a folder of audio files (searched recursively) or one file: each clip is decoded, mixed to mono
  and resampled to the models' rate exactly as the tokenizer's readers do, and encoded by both
  models; or
- a tokenizer output folder (``python -m training.tokenize``, recognised by ``.tokenize/job.json``):
  model A's codes are the shards' ``snac_layer_N`` (the tokenizer must have used model A's weights,
  checked by fingerprint), and each line's audio is read again from the source and row its ``source``
  / ``index`` name, to be encoded by model B. The number is the one the same clips give as a folder.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..agreement import AgreementCounter, format_agreement
from .engine import Codec, load_codec
from .files import CodecError, PathLike, collect_inputs

JOB_RECORD = Path(".tokenize") / "job.json"


@dataclass
class AgreementResult:
    """Per level (coarsest first): codes compared, codes equal, and their ratio."""

    equal: List[int]
    total: List[int]
    clips: int
    kind: str  # "audio" or "tokens"
    token_rates: List[float]
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (clip, reason) of clips left out

    @property
    def fractions(self) -> List[float]:
        return [e / t if t else 1.0 for e, t in zip(self.equal, self.total)]

    def table(self) -> str:
        """A plain-text table, one row per level."""
        rows = [f"{'level':>5}  {'rate (Hz)':>9}  {'codes':>10}  {'equal':>10}  {'agreement':>10}"]
        for level, (e, t, f) in enumerate(zip(self.equal, self.total, self.fractions)):
            rows.append(f"{level:>5}  {self.token_rates[level]:>9.2f}  {t:>10}  {e:>10}  {100 * f:>8.3f} %")
        return "\n".join(rows)

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "clips": self.clips, "agreement": self.fractions, "equal": self.equal,
                "total": self.total, "token_rates": self.token_rates,
                "failed": [{"clip": c, "reason": r} for c, r in self.failed]}

    def line(self) -> str:
        return f"{format_agreement(self.fractions)} ({self.clips} clips)"


def _codec(model: Union[PathLike, Codec], device: Optional[str], batch_size: Optional[int]) -> Codec:
    if isinstance(model, Codec):
        return model
    return load_codec(model, device=device, precision="fp32", batch_size=batch_size)


def _check_layouts(a: Codec, b: Codec) -> None:
    """Codes of two models are comparable only with the same rate, hop and level strides."""
    for name in ("sampling_rate", "hop_length", "vq_strides"):
        va, vb = (list(v) if isinstance(v, (tuple, list)) else v for v in (getattr(a.cfg, name), getattr(b.cfg, name)))
        if va != vb:
            raise CodecError(f"the two models' codes cannot be compared: {name} {va} (model A) vs {vb} (model B)")


def is_token_folder(path: PathLike) -> bool:
    """True for a tokenizer output folder (it holds ``.tokenize/job.json``)."""
    return (Path(path) / JOB_RECORD).is_file()


def code_agreement(model_a: Union[PathLike, Codec], model_b: Union[PathLike, Codec], input: PathLike, *,
                   device: Optional[str] = None, batch_size: Optional[int] = None) -> AgreementResult:
    """Per-level fraction of model A's codes that model B assigns identically on ``input``.

    model_a, model_b: anything :func:`training.codec.load_codec` takes (our checkpoint or run
    directory, a SNAC directory, a hub id), or a loaded :class:`Codec` (encoding in float32).
    input: an audio file, a folder of audio files, or a tokenizer output folder made with model A.
    Unreadable clips are left out and listed in ``failed``. Raises CodecError for incompatible
    models, a token folder made by another model than A, or an input without clips.
    """
    a, b = _codec(model_a, device, batch_size), _codec(model_b, device, batch_size)
    _check_layouts(a, b)
    counter = AgreementCounter()
    if is_token_folder(input):
        failed, clips = _on_tokens(a, b, Path(input), counter)
        kind = "tokens"
    else:
        failed, clips = _on_audio(a, b, input, counter)
        kind = "audio"
    if not clips:
        raise CodecError(f"no clip of {input} could be compared ({len(failed)} unreadable"
                         f"{': ' + failed[0][1] if failed else ''})")
    return AgreementResult(counter.equal, counter.total, clips, kind, list(a.cfg.token_rates()), failed)


def _read(value: Any, rate: int) -> Tensor:
    """One clip as (T,) float32 at ``rate``: the tokenizer readers' decode (mono, soxr resample)."""
    from ..audio import decode_audio

    audio, _ = decode_audio(value, rate)
    return audio[0]


def _on_audio(a: Codec, b: Codec, input: PathLike, counter: AgreementCounter) -> Tuple[List[Tuple[str, str]], int]:
    from ..audio import AudioReadError

    files, _ = collect_inputs(input)
    failed, clips = [], 0
    for start in range(0, len(files), a.batch_size):
        items, names = [], []
        for path in files[start:start + a.batch_size]:
            try:
                items.append(_read(path, a.sample_rate))
                names.append(str(path))
            except AudioReadError as e:
                failed.append((str(path), str(e)))
        if not items:
            continue
        for name, ca, cb in zip(names, a.encode_many(items), b.encode_many(items)):
            counter.add(ca, cb, where=name)
            clips += 1
    return failed, clips


def _token_lines(folder: Path) -> Iterator[Dict[str, Any]]:
    """Every line of every complete shard of a tokenizer output folder, in file order."""
    from ..tokenize import SHARD_GLOB

    shards = sorted(folder.glob(SHARD_GLOB))
    if not shards:
        raise CodecError(f"{folder} holds no token shards ({SHARD_GLOB})")
    for shard in shards:
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _open_sources(job: Dict[str, Any]) -> Dict[str, Any]:
    """The tokenizer job's sources, reopened as the tokenizer opened them, by source key."""
    from ..tokenize import SourceSpec, open_source

    opened = {}
    for d in job["sources"]:
        fields = {k: v for k, v in d.items() if k in SourceSpec.__dataclass_fields__}
        src = open_source(SourceSpec(**fields))
        opened[d["key"]] = src
    return opened


def _on_tokens(a: Codec, b: Codec, folder: Path, counter: AgreementCounter) -> Tuple[List[Tuple[str, str]], int]:
    job = json.loads((folder / JOB_RECORD).read_text(encoding="utf-8"))
    made_by = job.get("weights")
    if made_by != a.identity()["fingerprint"]:
        raise CodecError(f"{folder} was tokenized by another model than model A (weights fingerprint {made_by}, "
                         f"model A has {a.identity()['fingerprint']}); pass the model that made the tokens first")
    sources = _open_sources(job)
    levels = a.cfg.n_levels
    failed, clips = [], 0
    batch: List[Tuple[str, Tensor, List[Tensor]]] = []

    def flush() -> None:
        nonlocal clips
        if not batch:
            return
        for (name, _, ref), cb in zip(batch, b.encode_many([x for _, x, _ in batch])):
            counter.add(ref, cb, where=name)
            clips += 1
        batch.clear()

    for line in _token_lines(folder):
        name = line["id"]
        try:
            audio = _read(sources[line["source"]].records.row(int(line["index"]))["audio"], a.sample_rate)
        except Exception as e:  # noqa: BLE001 - a source row that no longer reads is left out, and listed
            failed.append((name, str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        ref = [torch.tensor(line[f"snac_layer_{level + 1}"], dtype=torch.long) for level in range(levels)]
        batch.append((name, audio, ref))
        if len(batch) >= a.batch_size:
            flush()
    flush()
    return failed, clips
