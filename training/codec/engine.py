"""The inference engine: exact chunked windows from the receptive field, masked batching and keyed
noise."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from .._snac import snac
import torch
import torch.nn.functional as F
from snac.attention import LocalMHA
from snac.layers import NoiseBlock
from torch import Tensor

from ..audio import AudioReadError, decode_audio, resample
from ..config import ModelConfig
from ..hub import load_generator
from .codes_file import EncodedAudio
from .files import CodecError, PathLike
from .windows import Window, _pack, _round_up, keyed_noise, plan_windows, receptive_field


DEFAULT_CHUNK_SECONDS = 10.0  # ours: 2 x 0.34 s context is ~7 % overhead at 24 kHz; activations stay small


DEFAULT_BATCH_SIZE = None  # ours: None = 8 windows per forward pass on GPU, 2 on CPU (see below)


# On CPU a batch adds no parallelism (one window already keeps every core busy) and large batches
# spend their time in page faults of multi-GB activations, so CPU batches stay small.
GPU_BATCH_SIZE, CPU_BATCH_SIZE = 8, 2


def select_device(name: Optional[str] = None) -> torch.device:
    """``None``/``"auto"``: cuda if available, else mps, else cpu. Otherwise validate ``name``."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CodecError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CodecError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CodecError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CodecError("device 'mps' requested but MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CodecError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``precision`` ("auto": bf16 on CUDA, fp32 elsewhere); None = fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise CodecError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise CodecError("bf16 inference is supported on CUDA only; use --precision fp32")
    return torch.bfloat16


class _Job(NamedTuple):
    item: int
    window: Window


class Codec:
    """A SNAC model ready for inference (eval mode, no grad) with chunking and batching.

    Tensor API (audio at the model rate, float in [-1, 1]):

    - ``encode(audio (B, 1, T)) -> [codes (B, n_l)]`` per level, coarsest first
    - ``decode(codes, length=T) -> (B, 1, T)``
    - ``roundtrip(audio) -> (B, 1, T)``

    File API: :meth:`encode_file`, :meth:`decode_encoded`, :meth:`encode_files` (batched folders).
    """

    def __init__(self, model: snac.SNAC, cfg: ModelConfig, device: Optional[str] = None, precision: str = "auto",
                 chunk_seconds: float = DEFAULT_CHUNK_SECONDS, batch_size: Optional[int] = DEFAULT_BATCH_SIZE,
                 noise_seed: int = 0, source: str = ""):
        self.device = select_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.source = str(source)
        self.noise_seed = int(noise_seed)
        if batch_size is None:
            batch_size = GPU_BATCH_SIZE if self.device.type == "cuda" else CPU_BATCH_SIZE
        if batch_size < 1:
            raise CodecError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.reach = receptive_field(model)
        q = cfg.pad_multiple
        # Context: the receptive field rounded up to whole pad multiples keeps every boundary aligned.
        self.context = _round_up(max(self.reach.encoder, self.reach.decoder), q)
        self.chunk = self._chunk_samples(chunk_seconds)
        self._valid: Optional[Tuple[Tensor, int]] = None  # (per-item valid units, padded units)
        self._noise_starts: Optional[List[int]] = None  # per-item first latent frame of this batch
        self._fingerprint: Optional[str] = None
        self._install_hooks()

    # ---- properties ----

    @property
    def sample_rate(self) -> int:
        return self.cfg.sampling_rate

    @property
    def hop_length(self) -> int:
        return self.cfg.hop_length

    @property
    def n_levels(self) -> int:
        return self.cfg.n_levels

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def _chunk_samples(self, seconds: float) -> int:
        if not seconds > 0:
            raise CodecError(f"chunk length must be positive, got {seconds} s")
        return _round_up(max(1, int(seconds * self.sample_rate)), self.cfg.pad_multiple)

    def identity(self) -> Dict[str, Any]:
        """Model identity stored in codes files: config, weight fingerprint and source."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return {"config": self.cfg.snac_kwargs(), "fingerprint": self._fingerprint, "source": self.source}

    # ---- masking hooks: exact batching of unequal lengths ----

    def _install_hooks(self) -> None:
        """Zero every item's activations past its end after each conv / attention layer.

        Without this, a shorter item padded inside a batch would feed its neighbours' layers
        non-zero values (biases) where a lone item's convolutions see zero padding.
        """
        for part in (self.model.encoder, self.model.decoder):
            for m in part.modules():
                if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, LocalMHA)):
                    m.register_forward_hook(self._mask_hook)
        self.model.decoder.register_forward_pre_hook(lambda _m, args: (self._mask(args[0]),))

    def _mask(self, x: Tensor) -> Tensor:
        if self._valid is None:
            return x
        valid, padded = self._valid
        length = x.shape[-1]
        # Every layer's length is the padded length times a fixed ratio, and so is each item's.
        keep = torch.arange(length, device=x.device)[None, :] < (valid[:, None] * length) // padded
        return x * keep[:, None, :].to(x.dtype)

    def _mask_hook(self, _module, _inputs, output):
        return self._mask(output)

    def _masked(self, valid: Sequence[int], padded: int):
        self_ = self

        class _Ctx:
            def __enter__(self):
                full = all(v == padded for v in valid)
                self_._valid = None if full else (torch.tensor(list(valid), device=self_.device), padded)

            def __exit__(self, *exc):
                self_._valid = None

        return _Ctx()

    # ---- keyed noise ----

    def _noise_blocks(self) -> List[Tuple[NoiseBlock, int]]:
        """(NoiseBlock, upsampling factor from the latent rate) in decoder order."""
        blocks, factor = [], 1
        for m in self.model.decoder.modules():
            if isinstance(m, torch.nn.ConvTranspose1d):
                factor *= m.stride[0]
            elif isinstance(m, NoiseBlock):
                blocks.append((m, factor))
        return blocks

    def _keyed_noise_forward(self, index: int, block: NoiseBlock, factor: int) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            length = x.shape[-1]
            starts = self._noise_starts or [0] * x.shape[0]
            noise = torch.stack([keyed_noise(self.noise_seed, index, s * factor, length) for s in starts])
            return x + noise[:, None, :].to(device=x.device, dtype=x.dtype) * block.linear(x)
        return forward

    def _with_keyed_noise(self):
        """Context that swaps the NoiseBlocks' global-RNG draws for :func:`keyed_noise`."""
        blocks = self._noise_blocks()
        codec = self

        class _Ctx:
            def __enter__(self):
                for i, (b, f) in enumerate(blocks):
                    b.forward = codec._keyed_noise_forward(i, b, f)

            def __exit__(self, *exc):
                for b, _ in blocks:
                    del b.forward  # back to the class method

        return _Ctx()

    # ---- core batched passes ----

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def _encode_batch(self, x: Tensor, valid: Sequence[int]) -> List[Tensor]:
        """x: (B, 1, T) with T a pad multiple; valid: per-item lengths (pad multiples). -> [(B, n_l)]."""
        with self._masked(valid, x.shape[-1]), self._autocast():
            z = self.model.encoder(x)
        # The nearest-code search runs in float32 even under bf16: codes must not depend on it.
        _, codes = self.model.quantizer(z.float())
        return codes

    @torch.inference_mode()
    def _decode_batch(self, codes: List[Tensor], valid: Sequence[int], starts: Sequence[int]) -> Tensor:
        """codes: [(B, n_l)]; valid / starts in latent frames. -> (B, 1, frames * hop) float32."""
        z = self.model.quantizer.from_codes(codes)
        self._noise_starts = list(starts)
        try:
            with self._masked(valid, z.shape[-1]), self._with_keyed_noise(), self._autocast():
                audio = self.model.decoder(z)
        finally:
            self._noise_starts = None
        return audio.float()

    # ---- windowed processing of many items ----

    def encode_many(self, items: Sequence[Tensor]) -> List[List[Tensor]]:
        """items: (T_i,) float tensors at the model rate -> per item, per level codes (n_l,)."""
        q, hop = self.cfg.pad_multiple, self.hop_length
        padded = [_round_up(int(x.shape[-1]), q) for x in items]
        jobs = [_Job(i, w) for i, p in enumerate(padded) for w in plan_windows(p, self.chunk, self.context)]
        out = [[torch.empty(p // (hop * s), dtype=torch.long) for s in self.cfg.vq_strides] for p in padded]
        budget = self.batch_size * (self.chunk + 2 * self.context)
        for group in _pack([j.window.stop - j.window.start for j in jobs], budget, self.batch_size):
            batch = [jobs[g] for g in group]
            lengths = [j.window.stop - j.window.start for j in batch]
            x = torch.zeros(len(batch), 1, max(lengths))
            for b, j in enumerate(batch):
                seg = items[j.item][j.window.start:j.window.stop]
                x[b, 0, :seg.shape[-1]] = seg
            codes = self._encode_batch(x.to(self.device), lengths)
            for level, s in enumerate(self.cfg.vq_strides):
                unit = hop * s
                c = codes[level].cpu()
                for b, j in enumerate(batch):
                    w = j.window
                    out[j.item][level][w.keep_start // unit:w.keep_stop // unit] = \
                        c[b, (w.keep_start - w.start) // unit:(w.keep_stop - w.start) // unit]
        return out

    def decode_many(self, items: Sequence[List[Tensor]]) -> List[Tensor]:
        """items: per item, per level codes (n_l,) -> per item audio (n_latent * hop,) float32 (CPU)."""
        hop, q = self.hop_length, self.cfg.pad_multiple // self.hop_length
        frames = [int(c[0].shape[-1]) * self.cfg.vq_strides[0] for c in items]
        chunk, context = self.chunk // hop, self.context // hop
        jobs = [_Job(i, w) for i, f in enumerate(frames) for w in plan_windows(f, chunk, context)]
        out = [torch.empty(f * hop) for f in frames]
        budget = self.batch_size * (chunk + 2 * context)
        for group in _pack([j.window.stop - j.window.start for j in jobs], budget, self.batch_size):
            batch = [jobs[g] for g in group]
            lengths = [j.window.stop - j.window.start for j in batch]
            longest = max(lengths)
            assert longest % q == 0 and all(n % q == 0 for n in lengths)
            codes = []
            for level, s in enumerate(self.cfg.vq_strides):
                c = torch.zeros(len(batch), longest // s, dtype=torch.long)
                for b, j in enumerate(batch):
                    c[b, :lengths[b] // s] = items[j.item][level][j.window.start // s:j.window.stop // s]
                codes.append(c.to(self.device))
            audio = self._decode_batch(codes, lengths, [j.window.start for j in batch]).cpu()
            for b, j in enumerate(batch):
                w = j.window
                out[j.item][w.keep_start * hop:w.keep_stop * hop] = \
                    audio[b, 0, (w.keep_start - w.start) * hop:(w.keep_stop - w.start) * hop]
        return out

    # ---- public tensor API ----

    def _as_batch(self, audio: Tensor) -> Tensor:
        if not isinstance(audio, Tensor) or not audio.is_floating_point():
            raise CodecError("audio must be a floating-point torch.Tensor")
        if audio.dim() == 1:
            audio = audio[None, None]
        elif audio.dim() == 2:
            audio = audio[:, None]
        if audio.dim() != 3 or audio.shape[1] != 1 or audio.shape[-1] == 0:
            raise CodecError(f"audio must have shape (T,), (B, T) or (B, 1, T) with T > 0, got {tuple(audio.shape)}")
        return audio.detach().float().cpu()

    def encode(self, audio: Tensor) -> List[Tensor]:
        """audio: (B, 1, T) (or (B, T), (T,)) at the model rate -> per level (B, n_l) int64 codes."""
        x = self._as_batch(audio)
        per_item = self.encode_many([row[0] for row in x])
        return [torch.stack([item[level] for item in per_item]) for level in range(self.n_levels)]

    def check_codes(self, codes: Sequence[Tensor], where: str = "codes") -> None:
        """Raise CodecError unless ``codes`` fit this model: level count, lengths, value range."""
        if len(codes) != self.n_levels:
            raise CodecError(f"{where}: {len(codes)} code levels, but the model has {self.n_levels} "
                             "(codes from a different model?)")
        n0 = codes[0].shape[-1]
        for level, (c, s) in enumerate(zip(codes, self.cfg.vq_strides)):
            if c.is_floating_point():
                raise CodecError(f"{where}: level {level} codes are not integers")
            expected = n0 * self.cfg.vq_strides[0] // s
            if c.shape[-1] != expected:
                raise CodecError(f"{where}: level {level} has {c.shape[-1]} codes, expected {expected} for "
                                 f"{n0} level-0 codes with strides {list(self.cfg.vq_strides)}")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook_size):
                raise CodecError(f"{where}: level {level} codes lie in [{int(c.min())}, {int(c.max())}], outside "
                                 f"the codebook [0, {self.codebook_size}) (codes from a different model?)")
        if n0 == 0:
            raise CodecError(f"{where}: no codes")

    def decode(self, codes: Sequence[Tensor], length: Optional[int] = None) -> Tensor:
        """codes: per level (B, n_l) (or (n_l,)) -> (B, 1, length) float32; ``length`` defaults to
        the padded length ``n_0 * stride_0 * hop``."""
        codes = [c[None] if c.dim() == 1 else c for c in codes]
        self.check_codes(codes)
        items = [[c[b].long().cpu() for c in codes] for b in range(codes[0].shape[0])]
        audio = torch.stack(self.decode_many(items))[:, None]
        return audio if length is None else audio[..., :length]

    def roundtrip(self, audio: Tensor) -> Tensor:
        """Encode and decode: (B, 1, T) -> (B, 1, T) at the model rate."""
        x = self._as_batch(audio)
        return self.decode(self.encode(x), length=x.shape[-1])

    # ---- files ----

    def load_input(self, path: PathLike) -> Tuple[Tensor, Tensor, int]:
        """Read an audio file -> ((T,) at the model rate, (T0,) at its own rate, its rate).

        The file is decoded once at its own rate and resampled here, so the input length used by
        ``--keep-rate`` is the decoded length (MP3 headers can be off by hundreds of samples).
        """
        native, rate = decode_audio(path)
        return resample(native[0], rate, self.sample_rate), native[0], rate

    def encode_file(self, path: PathLike) -> EncodedAudio:
        """Encode one audio file (any format :mod:`training.audio` reads)."""
        return next(iter(self.encode_files([path])))[1]

    def _encode_group(self, group: Sequence[Path]) -> List[Tuple[Path, Any, Optional[Tensor], Optional[Tensor]]]:
        """Read and encode ``group`` in shared batches.

        Returns per path ``(path, EncodedAudio or AudioReadError, audio (T,) at the model rate,
        audio (T0,) at the file's rate)``.
        """
        loaded, errors, natives = [], {}, {}
        for p in group:
            try:
                x, native, rate = self.load_input(p)
                loaded.append((p, x, rate, native.shape[-1]))
                natives[p] = native
            except AudioReadError as e:
                errors[p] = e
        start = time.perf_counter()
        codes = self.encode_many([x for _, x, _, _ in loaded]) if loaded else []
        elapsed = time.perf_counter() - start
        total = sum(x.shape[-1] for _, x, _, _ in loaded) or 1
        done = {}
        for (p, x, rate, n), c in zip(loaded, codes):
            # A batch's time is shared out by length: per-file real-time factors stay comparable.
            enc = EncodedAudio(codes=c, length=int(x.shape[-1]), sample_rate=self.sample_rate, input_sample_rate=rate,
                               input_length=n, model=self.identity(), encode_seconds=elapsed * x.shape[-1] / total)
            done[p] = (enc, x, natives[p])
        return [(p, errors[p], None, None) if p in errors else (p, *done[p]) for p in group]

    def _groups(self, paths: Sequence[PathLike]) -> Iterator[List[Path]]:
        for first in range(0, len(paths), self.batch_size):
            yield [Path(p) for p in paths[first:first + self.batch_size]]

    def encode_files(self, paths: Sequence[PathLike]) -> Iterator[Tuple[Path, Union[EncodedAudio, Exception]]]:
        """Encode files in batches of ``batch_size``; yields ``(path, EncodedAudio)`` or
        ``(path, error)`` for a file that cannot be read (the others are still processed)."""
        for group in self._groups(paths):
            for p, result, _, _ in self._encode_group(group):
                yield p, result

    def roundtrip_files(self, paths: Sequence[PathLike], keep_rate: bool = False) -> Iterator["RoundTrip"]:
        """Encode and decode files in batches; yields a :class:`RoundTrip` per path (``error`` set
        for unreadable files). ``reference`` is the original at the output rate, for metrics."""
        for group in self._groups(paths):
            rows = self._encode_group(group)
            ok = [enc for _, enc, _, _ in rows if isinstance(enc, EncodedAudio)]
            decoded = iter(self.decode_encoded(ok, keep_rate=keep_rate))
            for p, enc, x, native in rows:
                if not isinstance(enc, EncodedAudio):
                    yield RoundTrip(p, error=enc)
                    continue
                audio, rate, seconds = next(decoded)
                reference = x if rate == self.sample_rate else native
                yield RoundTrip(p, encoded=enc, audio=audio, rate=rate, reference=reference,
                                decode_seconds=seconds)

    def check_encoded(self, enc: EncodedAudio, where: str = "codes") -> None:
        """Validate a loaded codes file against this model (structure, range, rate, length)."""
        cfg = enc.model.get("config", {}) if isinstance(enc.model, dict) else {}
        if cfg.get("codebook_size") not in (None, self.codebook_size):
            raise CodecError(f"{where}: made by a model with codebook size {cfg['codebook_size']}, "
                             f"this model has {self.codebook_size}")
        self.check_codes(enc.codes, where)
        if enc.sample_rate != self.sample_rate:
            raise CodecError(f"{where}: codes are for a {enc.sample_rate} Hz model, this model runs at "
                             f"{self.sample_rate} Hz")
        padded = enc.codes[0].shape[-1] * self.cfg.vq_strides[0] * self.hop_length
        if not 0 < enc.length <= padded:
            raise CodecError(f"{where}: stored length {enc.length} does not fit {padded} samples of codes")

    def decode_encoded(self, encs: Sequence[EncodedAudio], keep_rate: bool = False) -> List[Tuple[Tensor, int, float]]:
        """Decode several codes records in shared batches -> per record ``((T,) audio, rate, seconds)``.

        Audio is trimmed to the original length; with ``keep_rate`` it is resampled to the input's
        rate and its length equals the input's length exactly.
        """
        if not encs:
            return []
        for e in encs:
            self.check_encoded(e)
        start = time.perf_counter()
        audio = self.decode_many([[c.long() for c in e.codes] for e in encs])
        elapsed = time.perf_counter() - start
        total = sum(e.length for e in encs) or 1
        out = []
        for e, a in zip(encs, audio):
            a, rate = a[:e.length], self.sample_rate
            if keep_rate and e.input_sample_rate != self.sample_rate:
                a = fit_length(resample(a, self.sample_rate, e.input_sample_rate), e.input_length)
                rate = e.input_sample_rate
            out.append((a, rate, elapsed * e.length / total))
        return out


@dataclass
class RoundTrip:
    """Result of one file's round trip: audio (T,) at ``rate`` Hz and the reference at that rate."""

    path: Path
    encoded: Optional[EncodedAudio] = None
    audio: Optional[Tensor] = None
    rate: int = 0
    reference: Optional[Tensor] = None
    decode_seconds: float = 0.0
    error: Optional[Exception] = None


def fit_length(x: Tensor, length: int) -> Tensor:
    """Trim or zero-pad the last axis to ``length`` (resampling may be off by a sample)."""
    return x[..., :length] if x.shape[-1] >= length else F.pad(x, (0, length - x.shape[-1]))


def load_codec(path_or_id: PathLike, device: Optional[str] = None, precision: str = "auto",
               chunk_seconds: float = DEFAULT_CHUNK_SECONDS, batch_size: Optional[int] = DEFAULT_BATCH_SIZE,
               noise_seed: int = 0) -> Codec:
    """A :class:`Codec` from our checkpoint (file or run dir), a SNAC directory or a hub id.

    ``device``: None/"auto" picks cuda > mps > cpu. ``precision``: "auto" = bf16 on CUDA.
    Raises :class:`training.hub.ModelLoadError` for a bad source, CodecError for bad options.
    """
    dev = select_device(device)
    model, cfg = load_generator(path_or_id, device="cpu")
    return Codec(model, cfg, device=str(dev), precision=precision, chunk_seconds=chunk_seconds,
                 batch_size=batch_size, noise_seed=noise_seed, source=str(path_or_id))
