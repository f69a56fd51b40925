"""Inference with a trained SNAC codec: encode / decode / round trip tensors, files and folders.

:func:`load_codec` accepts everything :func:`training.hub.load_generator` does (our training
checkpoint, a run directory, a SNAC directory, a hub id) and returns a :class:`Codec`.

What it adds to ``snac.SNAC.encode`` / ``decode``:

- **Exact length.** Decoded audio is trimmed to the input length (snac leaves the right padding).
- **Chunking with exact seams.** Long inputs are cut into windows whose *kept* parts tile the
  signal and which extend ``context`` samples beyond them on both sides. ``context`` is the
  model's one-sided receptive field (computed from its layers, :func:`receptive_field`) rounded
  up to the pad multiple, and every boundary sits on a multiple of the pad multiple, so pooling
  groups of the quantizer and attention windows line up with the one-shot computation. A kept
  code or sample therefore sees exactly the inputs it sees in one shot: codes are identical and
  audio agrees to float32 rounding (tested: max abs difference < 1e-4 on 60 s).
- **Exact batching.** Windows of different lengths share a batch: shorter ones are right-padded,
  and a hook after every convolution / attention layer zeroes each item's activations past its
  own end, which is exactly the zero padding those layers apply to an item processed alone. So an
  item's result does not depend on what it is batched with.
- **Deterministic decoder noise.** snac's ``NoiseBlock`` draws ``randn`` from the global RNG, so
  two decodes of the same codes differ and chunked decoding could never match one-shot decoding.
  The codec replaces those draws by standard normal noise that is a function of (seed, block,
  absolute position) only: statistically the same noise, but reproducible and chunk-independent.
- **Memory bound.** Model activations scale with the samples in one batch, which is at most
  ``batch_size * (chunk + 2 * context)``; whole-file buffers are float32 (4 bytes per sample at
  the model rate) plus the codes (a few bytes per token).
- **Streaming.** :class:`StreamingDecoder` decodes codes as they arrive (a TTS model generating)
  with the same output as one whole decode; :class:`FrameLayout` turns the interleaved token
  streams of TTS models (7 tokens per frame at 24 kHz) into frames and back. Graph export (ONNX,
  ``torch.export``) with a parity check lives in :mod:`training.codec.export`.
- Device auto-selection (cuda > mps > cpu), bf16 autocast on CUDA (the nearest-code search
  stays float32), codes files (``.npz``) with validation, metrics and spectrogram plots.
"""

from .engine import (
    DEFAULT_CHUNK_SECONDS, DEFAULT_BATCH_SIZE, GPU_BATCH_SIZE, CPU_BATCH_SIZE, select_device,
    resolve_precision, Codec, RoundTrip, fit_length, load_codec,
)
from .codes_file import CODES_FORMAT_VERSION, EncodedAudio, save_codes, load_codes
from .files import PathLike, CodecError, collect_inputs, output_paths, refuse_overwriting_inputs
from .report import (
    METRIC_SEGMENT_SECONDS, compute_metrics, TABLE_COLUMNS, mean_metrics, format_table, write_json,
    plot_spectrograms, metrics_title,
)
from .windows import NOISE_TILE, Reach, receptive_field, Window, plan_windows, keyed_noise
from .streaming import StreamingDecoder, SlidingWindowDecoder
from .tokens import ORPHEUS_BASE, FrameLayout, TokenParser, TokenLayoutError, frame_order

__all__ = [
    'CODES_FORMAT_VERSION', 'CPU_BATCH_SIZE', 'Codec', 'CodecError', 'DEFAULT_BATCH_SIZE', 'FrameLayout',
    'ORPHEUS_BASE', 'SlidingWindowDecoder', 'StreamingDecoder', 'TokenLayoutError', 'TokenParser', 'frame_order',
    'DEFAULT_CHUNK_SECONDS', 'EncodedAudio', 'GPU_BATCH_SIZE', 'METRIC_SEGMENT_SECONDS', 'NOISE_TILE',
    'PathLike', 'Reach', 'RoundTrip', 'TABLE_COLUMNS', 'Window', 'collect_inputs', 'compute_metrics',
    'fit_length', 'format_table', 'keyed_noise', 'load_codec', 'load_codes', 'mean_metrics',
    'metrics_title', 'output_paths', 'plan_windows', 'plot_spectrograms', 'receptive_field',
    'refuse_overwriting_inputs', 'resolve_precision', 'save_codes', 'select_device', 'write_json',
]
