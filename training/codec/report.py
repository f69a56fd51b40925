"""Quality reports for inference: per-file metrics, tables, JSON and spectrogram plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import metrics as M
from ..config import ModelConfig
from .files import CodecError, PathLike


METRIC_SEGMENT_SECONDS = 30.0  # mel / STFT distances are averaged over segments of this length


def _segmented(fn: Callable[[Tensor, Tensor], Optional[float]], ref: Tensor, est: Tensor, seg: int) -> Optional[float]:
    """Length-weighted mean of ``fn`` over segments (bounds the memory of spectral metrics);
    None when ``fn`` is not defined for the signal (a clip too short for its STFT)."""
    total, acc = ref.shape[-1], 0.0
    if total <= seg:
        return fn(ref, est)
    starts = list(range(0, total, seg))
    if len(starts) > 1 and total - starts[-1] < seg // 4:
        starts.pop()  # fold a short tail into the previous segment
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else total
        acc += fn(ref[..., s:e], est[..., s:e]) * (e - s)
    return acc / total


def compute_metrics(reference: Tensor, estimate: Tensor, rate: int, cfg: ModelConfig, input_rate: int,
                    codes: Sequence[Tensor], encode_seconds: float, decode_seconds: float) -> Dict[str, Any]:
    """All metrics of one round trip. ``reference``/``estimate``: (T,) at ``rate`` Hz.

    compression_ratio = (input_rate * 16 bit) / codec bitrate: mono 16-bit PCM at the input's rate
    versus the codes. Real-time factors are compute seconds per second of audio (< 1 = faster
    than real time).
    """
    ref, est = reference.float()[None, None], estimate.float()[None, None]
    duration = ref.shape[-1] / rate
    seg = int(METRIC_SEGMENT_SECONDS * rate)
    return {
        "duration_s": duration,
        "input_sample_rate": int(input_rate),
        "model_sample_rate": int(cfg.sampling_rate),
        "output_sample_rate": int(rate),
        "tokens_per_level": [int(c.shape[-1]) for c in codes],
        "token_rates_hz": [float(r) for r in M.token_rates(cfg)],
        "bitrate_kbps": float(M.bitrate_kbps(cfg)),
        "compression_ratio": float(M.compression_ratio(cfg, input_rate)),
        "si_sdr_db": float(M.si_sdr(ref, est)[0]),
        "mel_distance": _segmented(lambda a, b: M.mel_distance(a, b, rate), ref, est, seg),
        "stft_distance": _segmented(M.stft_distance, ref, est, seg),
        "pesq": M.pesq_score(ref, est, rate),
        "stoi": M.stoi_score(ref, est, rate),
        "encode_rtf": encode_seconds / duration,
        "decode_rtf": decode_seconds / duration,
    }


TABLE_COLUMNS = (  # (key, header, format)
    ("duration_s", "dur(s)", "{:.2f}"), ("input_sample_rate", "in Hz", "{}"), ("output_sample_rate", "out Hz", "{}"),
    ("tokens_per_level", "tokens/level", "{}"), ("bitrate_kbps", "kbps", "{:.2f}"),
    ("compression_ratio", "ratio", "{:.0f}"), ("si_sdr_db", "SI-SDR", "{:.2f}"), ("mel_distance", "mel", "{:.3f}"),
    ("stft_distance", "stft", "{:.3f}"), ("pesq", "PESQ", "{:.2f}"), ("stoi", "STOI", "{:.3f}"),
    ("encode_rtf", "enc RTF", "{:.3f}"), ("decode_rtf", "dec RTF", "{:.3f}"),
)


def mean_metrics(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean of every numeric metric over the rows where it is defined (None where no row has it:
    a metric is None for clips too short for it)."""
    out: Dict[str, Any] = {}
    for key in rows[0]:
        vals = [r.get(key) for r in rows]
        defined = [v for v in vals if v is not None]
        if not defined:
            out[key] = None
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in defined):
            out[key] = float(np.mean(defined))
        elif all(isinstance(v, list) for v in vals) and len({len(v) for v in vals}) == 1:
            out[key] = [float(x) for x in np.mean(np.array(vals, dtype=float), axis=0)]
    return out


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return "/".join(fmt.format(v) if not isinstance(v, float) else f"{v:.1f}" for v in value)
    return fmt.format(value)


def format_table(rows: Sequence[Tuple[str, Dict[str, Any]]]) -> str:
    """Fixed-width text table: one ``(name, metrics)`` row per file."""
    header = ["file"] + [h for _, h, _ in TABLE_COLUMNS]
    body = [[name] + [_cell(m.get(k), f) for k, _, f in TABLE_COLUMNS] for name, m in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def write_json(path: PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def plot_spectrograms(reference: Tensor, estimate: Tensor, rate: int, path: PathLike, title: str = "") -> Path:
    """Save original (top) and reconstruction (bottom) log-magnitude spectrograms as an image.

    reference/estimate: (T,) at ``rate`` Hz. Needs matplotlib (CodecError with the install hint).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CodecError("--plot needs matplotlib: pip install matplotlib") from None
    n_fft = 1024
    window = torch.hann_window(n_fft)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, x, name in zip(axes, (reference, estimate), ("original", "reconstruction")):
        spec = torch.stft(x.float(), n_fft, hop_length=n_fft // 4, window=window, return_complex=True).abs()
        db = 20 * torch.log10(spec.clamp_min(1e-5))
        ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=float(db.max()) - 90,
                  extent=(0, x.shape[-1] / rate, 0, rate / 2000))
        ax.set_ylabel(f"{name}\nkHz")
    axes[-1].set_xlabel("seconds")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def metrics_title(m: Dict[str, Any]) -> str:
    """One-line summary of the metrics for a plot title."""
    na = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731 - clips too short for the STFT
    parts = [f"{m['bitrate_kbps']:.2f} kbps", f"SI-SDR {m['si_sdr_db']:.2f} dB", f"mel {na(m['mel_distance'])}",
             f"STFT {na(m['stft_distance'])}"]
    parts += [f"{k.upper()} {m[k]:.2f}" for k in ("pesq", "stoi") if m.get(k) is not None]
    return " | ".join(parts)
