"""Audio I/O: decode any audio value to a mono float32 tensor, resample, crop, save.

Conventions: tensors are float32 ``(1, T)`` (one channel, ``T`` samples) in [-1, 1]; every
position or length is a sample count; ``start`` / ``num_frames`` arguments count samples at the
*source* rate (the rate stored in the file), outputs are at the requested target rate.

Backends, chosen per input because each is fastest where it is used:

- ``soundfile`` (libsndfile) for WAV / FLAC / AIFF / OGG: reads the header, seeks to the crop and
  decodes only those frames. This is the default for files, bytes and Hugging Face
  ``{"bytes", "path"}`` values.
- ``torchcodec`` (FFmpeg) for what libsndfile cannot read or seeks badly (MP3: libmpg123 prints
  bit-reservoir errors to stderr after every seek; M4A/AAC/Opus-in-WebM/...), with
  decode-time resampling and downmixing. Imported lazily so the package imports without FFmpeg.
- ``soxr`` resamples in-memory arrays and soundfile output (high quality, fast on CPU).

Unreadable, empty, truncated or non-finite input raises :class:`AudioReadError` naming the input
and the reason; callers (the dataset) skip and count such items.
"""

from __future__ import annotations

import io
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
import soundfile as sf
import soxr
import torch

from .errors import first_line


class AudioReadError(Exception):
    """An audio input could not be decoded; the message names the input and the reason."""


AUDIO_EXTENSIONS: Tuple[str, ...] = (
    ".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".wma", ".webm", ".mka",
)
# Containers/codecs that go straight to torchcodec: libsndfile cannot read them (m4a, aac, wma,
# webm, mka) or its MP3 seek spams stderr with libmpg123 errors (see module docstring).
_TORCHCODEC_EXTENSIONS = frozenset({".mp3", ".m4a", ".aac", ".wma", ".webm", ".mka"})
_TORCHCODEC_SF_FORMATS = frozenset({"MP3"})  # soundfile format names routed to torchcodec

PathLike = Union[str, os.PathLike]


class AudioInfo(NamedTuple):
    """Header facts of an audio input: length in frames (samples per channel), rate in Hz."""

    num_frames: int
    sample_rate: int
    channels: int
    duration: float  # seconds


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def list_audio_files(root: PathLike, recursive: bool = True) -> List[Path]:
    """Audio files (by :data:`AUDIO_EXTENSIONS`, case-insensitive) under ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")
    pattern = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in pattern if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


# torchcodec prefixes FFmpeg's error with the C++ function and source location that raised it
# ("SingleStreamDecoder, /__w/torchcodec/.../SingleStreamDecoder.cpp:41, Could not open input file:
# <path> Invalid data found when processing input"); users get what the FFmpeg part means.
_FFMPEG_MEANINGS: Tuple[Tuple[str, str], ...] = (
    ("Invalid data found when processing input", "damaged, or not in an audio format FFmpeg knows"),
    ("best audio stream is unknown", "no audio stream found"),
    ("No audio stream", "no audio stream found"),
    ("Invalid argument", "damaged, or not in an audio format FFmpeg knows"),
    ("No such file or directory", "file not found"),
    ("Permission denied", "permission denied"),
    ("End of file", "it ends before its first audio frame (truncated)"),
)
_SOURCE_LOCATION = re.compile(r"(?:\b\w+,\s*)?/\S+\.(?:cpp|cc|cxx|h|hpp):\d+,?\s*")


def plain_reason(error: BaseException) -> str:
    """One line saying why a decoder failed, without library source paths."""
    text = str(error).strip()
    for needle, meaning in _FFMPEG_MEANINGS:
        if needle in text:
            return meaning
    first = _SOURCE_LOCATION.sub("", text.splitlines()[0] if text else "").strip(" ,")
    return first or type(error).__name__


def _torchcodec_decoder(source: Any, **kwargs: Any):
    """Build a torchcodec AudioDecoder; a missing FFmpeg becomes a one-line AudioReadError."""
    try:
        from torchcodec.decoders import AudioDecoder
    except Exception as e:  # ImportError, or RuntimeError when FFmpeg libraries are missing
        raise AudioReadError(f"torchcodec (FFmpeg) is needed for this input but cannot load: "
                             f"{first_line(e)}") from None
    return AudioDecoder(source, **kwargs)


def audio_info(path: PathLike) -> AudioInfo:
    """Length, rate and channel count from the file header only (no full decode)."""
    with open_audio(path) as reader:
        return reader.info


# --------------------------------------------------------------------------------------
# Readers: one per backend, same interface (info + read a frame range at a target rate)
# --------------------------------------------------------------------------------------


class _Reader:
    """Open audio input. ``read(start, num_frames, target_rate)`` returns ``(1, T)`` float32."""

    name: str = "audio"
    info: AudioInfo

    def read(self, start: int = 0, num_frames: Optional[int] = None,
             target_rate: Optional[int] = None) -> Tuple[torch.Tensor, int]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _span(self, start: Optional[int], num_frames: Optional[int]) -> Tuple[int, int]:
        """Clamp a requested ``[start, start + num_frames)`` range to the input; validate it."""
        start = int(start or 0)
        if start < 0:
            raise AudioReadError(f"{self.name}: negative start {start}")
        total = self.info.num_frames
        stop = total if num_frames is None else min(total, start + int(num_frames))
        if num_frames is not None and num_frames <= 0:
            raise AudioReadError(f"{self.name}: num_frames must be positive, got {num_frames}")
        if start >= total:
            raise AudioReadError(f"{self.name}: start {start} is past the end ({total} frames)")
        return start, stop


class _SoundFileReader(_Reader):
    """libsndfile: exact seeks in WAV/FLAC/AIFF/OGG, decodes only the requested frames."""

    def __init__(self, f: sf.SoundFile, name: str):
        self.f, self.name = f, name
        frames = f.frames
        self.info = AudioInfo(frames, f.samplerate, f.channels, frames / f.samplerate)
        self._check_header()

    def _check_header(self) -> None:
        if self.info.num_frames <= 0:
            raise AudioReadError(f"{self.name}: empty audio (0 frames)")
        # libsndfile silently shortens a WAV whose data chunk is cut off; its parse log says so.
        if self.f.format in ("WAV", "WAVEX", "RF64") and "should be" in self.f.extra_info:
            raise AudioReadError(f"{self.name}: truncated file (data chunk shorter than its header says)")

    def read(self, start=0, num_frames=None, target_rate=None):
        start, stop = self._span(start, num_frames)
        try:
            self.f.seek(start)
            data = self.f.read(stop - start, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioReadError(f"{self.name}: decode failed ({plain_reason(e)})") from None
        if data.shape[0] < stop - start:
            raise AudioReadError(f"{self.name}: truncated (read {data.shape[0]} of {stop - start} frames "
                                 f"at offset {start})")
        mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
        return _finish(mono, self.info.sample_rate, target_rate, self.name)

    def close(self):
        self.f.close()


class _DecoderReader(_Reader):
    """A torchcodec ``AudioDecoder`` or any object with ``get_samples_played_in_range``.

    ``factory(rate)`` (when given) builds a fresh decoder that resamples and downmixes while
    decoding; objects handed in by the caller (Hugging Face ``datasets`` >= 4 audio values) are
    used as they are and their output is mixed down / resampled with soxr.
    """

    def __init__(self, decoder: Any, name: str, factory=None):
        self.decoder, self.name, self.factory = decoder, name, factory
        self._by_rate = {}
        self._begin = 0.0
        self.info = self._probe()
        if self.info.num_frames <= 0:
            raise AudioReadError(f"{self.name}: empty audio (0 frames)")

    def _probe(self) -> AudioInfo:
        meta = getattr(self.decoder, "metadata", None)
        rate = getattr(meta, "sample_rate", None)
        duration = getattr(meta, "duration_seconds_from_header", None) or getattr(meta, "duration_seconds", None)
        channels = getattr(meta, "num_channels", None) or 1
        # Streams may start after t=0 (MP3 encoder delay): sample 0 of a full decode is played
        # at `begin`, so ranges are offset by it and the length excludes it.
        self._begin = float(getattr(meta, "begin_stream_seconds_from_header", None) or 0.0) if rate else 0.0
        if rate and duration:
            frames = int(round((duration - self._begin) * rate))
            return AudioInfo(frames, int(rate), int(channels), frames / rate)
        # No header duration (some containers / duck-typed objects): decode once to count.
        samples = self._all(self.decoder)
        rate = int(samples.sample_rate)
        self._cached = samples
        frames = samples.data.shape[-1]
        return AudioInfo(frames, rate, int(samples.data.shape[0]), frames / rate)

    def _all(self, decoder):
        try:
            return decoder.get_all_samples()
        except Exception as e:  # FFmpeg errors surface as RuntimeError/ValueError
            raise AudioReadError(f"{self.name}: decode failed ({plain_reason(e)})") from None

    def _decoder_for(self, target_rate):
        if self.factory is None or target_rate is None:
            return self.decoder
        if target_rate not in self._by_rate:
            self._by_rate = {target_rate: self.factory(target_rate)}
        return self._by_rate[target_rate]

    def read(self, start=0, num_frames=None, target_rate=None):
        start, stop = self._span(start, num_frames)
        sr = self.info.sample_rate
        whole = start == 0 and stop >= self.info.num_frames
        if whole and getattr(self, "_cached", None) is not None and target_rate in (None, sr):
            samples = self._cached
        else:
            decoder = self._decoder_for(target_rate)
            try:
                if whole:
                    samples = decoder.get_all_samples()
                else:
                    samples = decoder.get_samples_played_in_range(self._begin + start / sr, self._begin + stop / sr)
            except AudioReadError:
                raise
            except Exception as e:
                raise AudioReadError(f"{self.name}: decode failed ({plain_reason(e)})") from None
        data = samples.data
        data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        data = data.astype(np.float32, copy=False)
        mono = data.mean(axis=0) if data.ndim == 2 and data.shape[0] > 1 else data.reshape(-1)
        out_rate = int(samples.sample_rate)
        expected = (stop - start) * out_rate / sr
        # Compressed streams may end a frame early/late; a big shortfall means a cut-off file.
        if mono.shape[0] < 0.9 * expected - out_rate * 0.05:
            raise AudioReadError(f"{self.name}: truncated (decoded {mono.shape[0]} of ~{expected:.0f} samples)")
        return _finish(mono, out_rate, target_rate, self.name)


class _ArrayReader(_Reader):
    """In-memory samples: ``(T,)``, ``(C, T)`` or ``(T, C)`` (the shorter axis is channels)."""

    def __init__(self, array: Any, sample_rate: Optional[int], name: str):
        if sample_rate is None or int(sample_rate) <= 0:
            raise AudioReadError(f"{name}: an array needs its sampling rate (source_rate= or 'sampling_rate')")
        arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array, dtype=np.float32)
        if arr.dtype.kind not in "fiu":
            raise AudioReadError(f"{name}: array of dtype {arr.dtype} is not audio")
        if arr.dtype.kind in "iu":  # integer PCM -> [-1, 1]
            arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max + 1)
        arr = arr.astype(np.float32, copy=False)
        if arr.ndim == 2:
            arr = arr.mean(axis=0 if arr.shape[0] <= arr.shape[1] else 1)
        elif arr.ndim != 1:
            raise AudioReadError(f"{name}: expected a 1-D or 2-D array, got shape {arr.shape}")
        self.name, self.mono = name, arr
        self.info = AudioInfo(arr.shape[0], int(sample_rate), 1, arr.shape[0] / int(sample_rate))
        if arr.shape[0] == 0:
            raise AudioReadError(f"{name}: empty audio (0 samples)")

    def read(self, start=0, num_frames=None, target_rate=None):
        start, stop = self._span(start, num_frames)
        return _finish(self.mono[start:stop], self.info.sample_rate, target_rate, self.name)


def _finish(mono: np.ndarray, rate: int, target_rate: Optional[int], name: str) -> Tuple[torch.Tensor, int]:
    """Check finiteness, resample with soxr if needed, return ``((1, T) float32 tensor, rate)``."""
    if mono.size == 0:
        raise AudioReadError(f"{name}: empty audio (0 samples decoded)")
    if not np.isfinite(mono).all():
        raise AudioReadError(f"{name}: audio contains NaN or Inf samples")
    if target_rate is not None and int(target_rate) != rate:
        mono = resample(mono, rate, int(target_rate))
        rate = int(target_rate)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)).unsqueeze(0), rate


# --------------------------------------------------------------------------------------
# Opening any audio value
# --------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Mapping) and value.get("path"):
        return str(value["path"])
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return f"<{type(value).__name__}>"


def _open_encoded(source: Any, name: str, suffix: str) -> _Reader:
    """Open a path or bytes: soundfile first, torchcodec for formats routed away from it."""
    if suffix not in _TORCHCODEC_EXTENSIONS:
        fobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        try:
            f = sf.SoundFile(fobj)
        except (sf.LibsndfileError, RuntimeError, TypeError):
            f = None  # not a libsndfile format: let FFmpeg try
        if f is not None:
            if f.format not in _TORCHCODEC_SF_FORMATS:
                try:
                    return _SoundFileReader(f, name)
                except Exception:
                    f.close()
                    raise
            f.close()
    return _open_torchcodec(source, name)


def _open_torchcodec(source: Any, name: str) -> _Reader:
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    src = os.fspath(source) if isinstance(source, os.PathLike) else source
    try:
        decoder = _torchcodec_decoder(src)
    except AudioReadError:
        raise
    except Exception as e:
        raise AudioReadError(f"{name}: not a readable audio file ({plain_reason(e)})") from None
    return _DecoderReader(decoder, name, factory=lambda rate: _torchcodec_decoder(src, sample_rate=rate, num_channels=1))


def open_audio(value: Any, *, source_rate: Optional[int] = None) -> _Reader:
    """Open any supported audio value for header inspection and ranged reads.

    ``value``: a path, encoded bytes, ``{"array", "sampling_rate"}``, ``{"bytes", "path"}``, an
    ``AudioDecoder``-like object, or a numpy array / list / tensor (``source_rate`` required).
    Returns a reader with ``.info`` (:class:`AudioInfo`) and
    ``.read(start, num_frames, target_rate) -> ((1, T) float32, rate)``; use it as a context manager.
    """
    name = _describe(value)
    if isinstance(value, str) and is_remote_path(value):
        return _open_remote(value, name)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise AudioReadError(f"{path}: file not found")
        if path.stat().st_size == 0:
            raise AudioReadError(f"{path}: empty file (0 bytes)")
        return _open_encoded(str(path), name, path.suffix.lower())
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise AudioReadError(f"{name}: empty bytes")
        return _open_encoded(bytes(value), name, "")
    if isinstance(value, Mapping):
        return _open_mapping(value, name, source_rate)
    if hasattr(value, "get_samples_played_in_range") or hasattr(value, "get_all_samples"):
        # `datasets` >= 4 decoders keep their encoded source; soundfile on it is faster than
        # FFmpeg and seeks exactly, so use it when the object exposes it.
        encoded = getattr(value, "_hf_encoded", None)
        if isinstance(encoded, Mapping) and (encoded.get("bytes") is not None or encoded.get("path")):
            try:
                return _open_mapping(encoded, name, source_rate)
            except AudioReadError:
                pass  # e.g. a relative path only the decoder can resolve: decode through it
        return _DecoderReader(value, name)
    if isinstance(value, (np.ndarray, list, tuple, torch.Tensor)):
        return _ArrayReader(value, source_rate, name)
    raise AudioReadError(f"{name}: unsupported audio value of type {type(value).__name__}")


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote_path(path: str) -> bool:
    """True for fsspec URLs (``hf://...``, ``https://...``, ``zip://member::<archive URL>``)."""
    return bool(_URL_SCHEME.match(path))


def hub_token() -> Optional[str]:
    """The Hugging Face token from the environment (``HF_TOKEN``), or None to read anonymously."""
    return os.environ.get("HF_TOKEN") or None


def _read_remote(url: str, name: str) -> bytes:
    """Whole file behind an fsspec URL, read through ``datasets``' file layer (as ``datasets``
    itself opens the paths it stores in streaming rows), with the environment's token."""
    from datasets import DownloadConfig
    from datasets.utils.file_utils import xopen

    try:
        with xopen(url, "rb", download_config=DownloadConfig(token=hub_token())) as f:
            return f.read()
    except FileNotFoundError:
        raise AudioReadError(f"{name}: file not found") from None
    except Exception as e:  # noqa: BLE001 - network, auth, bad archive member: one readable line
        raise AudioReadError(f"{name}: cannot read ({plain_reason(e)})") from None


def _open_remote(url: str, name: str) -> _Reader:
    data = _read_remote(url, name)
    if not data:
        raise AudioReadError(f"{name}: empty file (0 bytes)")
    # The first hop names the file itself ("zip://wavs/a.flac::https://host/a.zip").
    suffix = Path(url.split("::", 1)[0]).suffix.lower()
    return _open_encoded(data, name, suffix)


def _open_mapping(value: Mapping, name: str, source_rate: Optional[int]) -> _Reader:
    if value.get("array") is not None:
        return _ArrayReader(value["array"], value.get("sampling_rate") or source_rate, name)
    if value.get("bytes") is not None:
        if len(value["bytes"]) == 0:
            raise AudioReadError(f"{name}: empty bytes")
        suffix = Path(str(value.get("path") or "")).suffix.lower()
        return _open_encoded(bytes(value["bytes"]), name, suffix)
    if value.get("path"):
        return open_audio(value["path"])
    raise AudioReadError(f"{name}: mapping has none of 'array', 'bytes', 'path' (keys: {sorted(value)})")


def decode_audio(value: Any, target_rate: Optional[int] = None, *, start: Optional[int] = None,
                 num_frames: Optional[int] = None, source_rate: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """Decode ``value`` to mono float32 ``(1, T)`` at ``target_rate`` (None: keep the source rate).

    ``start`` / ``num_frames`` select samples ``[start, start + num_frames)`` at the *source* rate
    and only that range is decoded where the format can seek (WAV, FLAC, MP3, OGG, ...). A range
    running past the end is clipped to the end. Returns ``(audio, rate)``.
    Raises :class:`AudioReadError` for unreadable, empty, truncated or non-finite input.
    """
    with open_audio(value, source_rate=source_rate) as reader:
        return reader.read(start, num_frames, target_rate)


def load_audio(path: PathLike, target_rate: Optional[int] = None) -> torch.Tensor:
    """Whole file as mono float32 ``(1, T)`` at ``target_rate``."""
    return decode_audio(path, target_rate)[0]


# --------------------------------------------------------------------------------------
# Processing
# --------------------------------------------------------------------------------------


def resample(x: Union[torch.Tensor, np.ndarray], orig_rate: int, target_rate: int,
             quality: str = "HQ") -> Union[torch.Tensor, np.ndarray]:
    """Resample along the last axis with soxr; returns the input's type, dtype and leading shape.

    ``x``: ``(T,)``, ``(C, T)`` or ``(B, C, T)`` (tensor or ndarray). Output length is
    ``round(T * target_rate / orig_rate)``.
    """
    orig_rate, target_rate = int(orig_rate), int(target_rate)
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    is_tensor = isinstance(x, torch.Tensor)
    arr = x.detach().cpu().numpy() if is_tensor else np.asarray(x)
    if orig_rate == target_rate:
        return x
    dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float32
    lead = arr.shape[:-1]
    # soxr wants (frames, channels): flatten every leading axis into channels.
    flat = arr.reshape(-1, arr.shape[-1]).T.astype(dtype, copy=False)
    out = soxr.resample(np.ascontiguousarray(flat), orig_rate, target_rate, quality=quality)
    out = np.ascontiguousarray(out.T).reshape(*lead, -1)
    if is_tensor:
        return torch.from_numpy(out).to(device=x.device)
    return out


def rms_db(x: Union[torch.Tensor, np.ndarray], eps: float = 1e-10) -> float:
    """Root-mean-square level in dBFS (0 dB = full-scale square wave); silence -> -200 dB."""
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if arr.size == 0:
        return -200.0
    return 10.0 * math.log10(float(np.mean(np.square(arr, dtype=np.float64))) + eps)


def normalize_loudness(x: torch.Tensor, target_db: float, *, max_peak: float = 0.999) -> torch.Tensor:
    """Scale ``x`` to ``target_db`` RMS dBFS, limiting the gain so the peak stays <= ``max_peak``."""
    level = rms_db(x)
    if level <= -100.0:  # digital silence: no meaningful gain
        return x
    gain = 10.0 ** ((target_db - level) / 20.0)
    peak = float(x.abs().max())
    if peak > 0:
        gain = min(gain, max_peak / peak)
    return x * gain


def crop_or_pad(x: torch.Tensor, length: int, start: int = 0) -> Tuple[torch.Tensor, int]:
    """Take ``length`` samples of ``(..., T)`` from ``start``; right-pad with zeros when short.

    Returns ``(segment, valid)`` where ``valid`` is the number of real (unpadded) samples.
    """
    seg = x[..., start:start + length]
    valid = seg.shape[-1]
    if valid < length:
        seg = torch.nn.functional.pad(seg, (0, length - valid))
    return seg, valid


def save_audio(path: PathLike, audio: Union[torch.Tensor, np.ndarray], sample_rate: int,
               subtype: str = "PCM_16") -> Path:
    """Write ``(1, T)`` or ``(T,)`` audio (or ``(C, T)``) as WAV, atomically (temp file + rename)."""
    path = Path(path)
    arr = audio.detach().float().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr.T  # soundfile wants (frames, channels)
    elif arr.ndim != 1:
        raise ValueError(f"save_audio expects (T,) or (C, T) audio, got shape {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are mode 0600; soundfile creates this one with the user's umask (0644 usually).
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        sf.write(tmp, np.clip(arr, -1.0, 1.0) if subtype.startswith("PCM") else arr, int(sample_rate),
                 format="WAV", subtype=subtype)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def iter_audio_info(paths: Iterable[PathLike]):
    """Yield ``(path, AudioInfo or None, error or None)`` for each path (header reads only)."""
    for p in paths:
        try:
            yield p, audio_info(p), None
        except AudioReadError as e:
            yield p, None, str(e)
