"""Exact streaming decode: audio comes out while codes are still arriving, identical to decoding the
whole sequence at once.

A TTS model emits SNAC codes frame by frame (one coarse code plus the finer codes under it); a
server wants audio before the last frame exists. :class:`StreamingDecoder` runs snac's decoder
layer by layer on whatever has arrived. Each layer keeps exactly the state its own receptive field
needs and emits only the outputs whose right context is complete:

- a convolution keeps its last ``dilation * (kernel - 1)`` inputs (starting from its left zero
  padding) and emits an output once the ``padding`` inputs to its right have arrived;
- a transposed convolution keeps its last ``ceil(kernel / stride) - 1`` inputs and emits the
  ``stride`` outputs each new input completes, dropping its ``padding`` first outputs;
- a residual unit delays its skip path by the delay of its body;
- a noise block draws the keyed noise of :func:`~training.codec.windows.keyed_noise` at its
  absolute position, so the noise equals :class:`~training.codec.Codec`'s;
- local attention (32 / 44 kHz) runs a window once all of its ``window_size`` frames are in;
- Snake, tanh and 1x1 convolutions are pointwise.

At the end of the stream (:meth:`StreamingDecoder.flush`) every layer appends the zero padding the
whole-sequence decode sees at the right edge. Every output sample is computed once, from the same
inputs and weights as the whole-sequence decode, so the two agree to float32 rounding (chunked
convolutions may add in another order) for any split of the stream into pushes. The state per layer
is bounded by its kernel span, so memory does not grow with the stream.

:class:`SlidingWindowDecoder` is the common practice this replaces (decode the last few frames
again for every new frame and keep one frame from the middle): a baseline for tests and benchmarks.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

from .._snac import snac
import torch
import torch.nn.functional as F
from snac.attention import LocalMHA
from snac.layers import DecoderBlock, NoiseBlock, ResidualUnit
from torch import Tensor

from ..model import Snake
from .engine import Codec
from .files import CodecError
from .windows import NOISE_TILE, noise_tile


class _Op:
    """One decoder layer run incrementally on ``(B, C, n)`` chunks of its input."""

    def reset(self, batch: int, device: torch.device) -> None:
        """Start a new stream of ``batch`` items."""

    def step(self, x: Tensor, final: bool) -> Tensor:
        """x: (B, C_in, n) new inputs -> (B, C_out, m) outputs that are now final. With
        ``final``, ``x`` is the last input and every remaining output is returned."""
        raise NotImplementedError

    def ready(self, n: int) -> int:
        """Outputs final after ``n`` inputs of an unfinished stream (for the lookahead)."""
        return n

    def state(self) -> List[Tensor]:
        """The tensors this layer holds between steps."""
        return []


class _Pointwise(_Op):
    """A function of each time step alone (Snake, tanh): no state."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn

    def step(self, x: Tensor, final: bool) -> Tensor:
        return self.fn(x)


def _snake(alpha: Tensor) -> Callable[[Tensor], Tensor]:
    alpha = alpha.detach().clone()
    inv = (alpha + 1e-9).reciprocal()  # snac's expression and order, computed once

    def fn(x: Tensor) -> Tensor:
        return x + inv * torch.sin(alpha * x).pow(2)
    return fn


def _weights(conv: torch.nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """Weight norm folded: ``conv.weight`` evaluates the parametrisation (as its forward does)."""
    bias = conv.bias.detach().clone() if conv.bias is not None else None
    return conv.weight.detach().clone(), bias


class _Conv(_Op):
    """A stride-1 ``Conv1d`` with zero padding: keeps its last ``dilation * (kernel - 1)`` inputs."""

    def __init__(self, conv: torch.nn.Conv1d):
        if conv.stride[0] != 1 or not isinstance(conv.padding[0], int) or conv.padding_mode != "zeros":
            raise CodecError(f"cannot stream {conv}: only stride-1 zero-padded convolutions are supported")
        self.weight, self.bias = _weights(conv)
        self.dilation, self.groups = conv.dilation[0], conv.groups
        self.span = conv.dilation[0] * (conv.kernel_size[0] - 1)
        self.left = conv.padding[0]
        self.right = self.span - self.left  # inputs right of an output that it waits for
        self.buf: Optional[Tensor] = None

    def reset(self, batch: int, device: torch.device) -> None:
        self.weight, self.bias = self.weight.to(device), None if self.bias is None else self.bias.to(device)
        # The left zero padding is the first thing the layer "received".
        self.buf = torch.zeros(batch, self.weight.shape[1] * self.groups, self.left, device=device)

    def step(self, x: Tensor, final: bool) -> Tensor:
        if self.span == 0:
            return F.conv1d(x, self.weight, self.bias) if x.shape[-1] else x.new_zeros(x.shape[0], self.weight.shape[0], 0)
        cat = torch.cat([self.buf, x], dim=-1) if self.buf.shape[-1] else x
        if final:
            cat = F.pad(cat, (0, self.right))
        self.buf = cat[..., max(0, cat.shape[-1] - self.span):]
        if cat.shape[-1] <= self.span:
            return x.new_zeros(x.shape[0], self.weight.shape[0], 0)
        return F.conv1d(cat, self.weight, self.bias, dilation=self.dilation, groups=self.groups)

    def ready(self, n: int) -> int:
        return max(0, n - self.right)

    def state(self) -> List[Tensor]:
        return [] if self.buf is None else [self.buf]


class _ConvTranspose(_Op):
    """A ``ConvTranspose1d``: input ``i`` adds ``kernel`` outputs from ``i * stride - padding``.

    With ``ctx = ceil(kernel / stride) - 1`` previous inputs kept, each new input completes exactly
    ``stride`` outputs; the first ``padding`` outputs are cropped, as the layer itself does.
    """

    def __init__(self, conv: torch.nn.ConvTranspose1d):
        if conv.groups != 1 or conv.dilation[0] != 1:
            raise CodecError(f"cannot stream {conv}: grouped or dilated transposed convolution")
        self.weight, self.bias = _weights(conv)
        self.stride, self.kernel = conv.stride[0], conv.kernel_size[0]
        self.padding, self.output_padding = conv.padding[0], conv.output_padding[0]
        self.ctx = -(-self.kernel // self.stride) - 1
        self.prev: Optional[Tensor] = None
        self.n_in = 0
        self.skip = 0

    def reset(self, batch: int, device: torch.device) -> None:
        self.weight, self.bias = self.weight.to(device), None if self.bias is None else self.bias.to(device)
        # Inputs before the stream are zeros: they add nothing (the bias is added once per output).
        self.prev = torch.zeros(batch, self.weight.shape[0], self.ctx, device=device)
        self.n_in, self.skip = 0, self.padding

    def _full(self, x: Tensor, keep: int) -> Tensor:
        """The first ``keep`` uncropped outputs at and after input ``n_in``, given new inputs x."""
        z = F.conv_transpose1d(torch.cat([self.prev, x], dim=-1), self.weight, self.bias, stride=self.stride)
        return z[..., self.ctx * self.stride:self.ctx * self.stride + keep]

    def step(self, x: Tensor, final: bool) -> Tensor:
        n = x.shape[-1]
        parts = []
        if n:
            parts.append(self._full(x, n * self.stride))
            self.prev = torch.cat([self.prev, x], dim=-1)[..., n:] if self.ctx else self.prev
            self.n_in += n
        if final and self.n_in:
            # The outputs past the last input's stride: they see only inputs we already have.
            tail = self.kernel - self.stride - self.padding + self.output_padding
            if tail > 0:
                zeros = x.new_zeros(x.shape[0], x.shape[1], -(-tail // self.stride))
                parts.append(self._full(zeros, tail))
        if not parts:
            return x.new_zeros(x.shape[0], self.weight.shape[1], 0)
        y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if self.skip:
            dropped = min(self.skip, y.shape[-1])
            y, self.skip = y[..., dropped:], self.skip - dropped
        return y

    def ready(self, n: int) -> int:
        return max(0, n * self.stride - self.padding)

    def state(self) -> List[Tensor]:
        return [] if self.prev is None else [self.prev]


class _Noise(_Op):
    """snac's ``NoiseBlock`` with keyed noise: ``x + noise[t] * linear(x)``, t the absolute position."""

    def __init__(self, block: NoiseBlock, index: int, seed: int):
        self.weight, _ = _weights(block.linear)
        self.index, self.seed = index, seed
        self.pos = 0
        self.tile: Tuple[int, Optional[Tensor]] = (-1, None)  # the last tile drawn, reused by the next step

    def reset(self, batch: int, device: torch.device) -> None:
        self.weight = self.weight.to(device)
        self.pos = 0

    def _noise(self, start: int, length: int, device: torch.device) -> Tensor:
        pieces, t = [], start
        while t < start + length:
            k = t // NOISE_TILE
            if self.tile[0] != k:
                self.tile = (k, torch.from_numpy(noise_tile(self.seed, self.index, k)).to(device))
            stop = min(start + length, (k + 1) * NOISE_TILE)
            pieces.append(self.tile[1][t - k * NOISE_TILE:stop - k * NOISE_TILE])
            t = stop
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def step(self, x: Tensor, final: bool) -> Tensor:
        n = x.shape[-1]
        if not n:
            return x
        noise = self._noise(self.pos, n, x.device)
        self.pos += n
        return x + noise[None, None, :].to(x.dtype) * F.conv1d(x, self.weight)

    def state(self) -> List[Tensor]:
        return [] if self.tile[1] is None else [self.tile[1]]


class _Chain(_Op):
    """Layers applied in order."""

    def __init__(self, ops: Sequence[_Op]):
        self.ops = list(ops)

    def reset(self, batch: int, device: torch.device) -> None:
        for op in self.ops:
            op.reset(batch, device)

    def step(self, x: Tensor, final: bool) -> Tensor:
        for op in self.ops:
            x = op.step(x, final)
        return x

    def ready(self, n: int) -> int:
        for op in self.ops:
            n = op.ready(n)
        return n

    def state(self) -> List[Tensor]:
        return [t for op in self.ops for t in op.state()]


class _Residual(_Op):
    """snac's ``ResidualUnit``: ``x + body(x)``; the skip path waits for the body's delay."""

    def __init__(self, body: _Chain):
        self.body = body
        self.queue: Optional[Tensor] = None  # inputs whose body output has not come out yet

    def reset(self, batch: int, device: torch.device) -> None:
        self.body.reset(batch, device)
        self.queue = None

    def step(self, x: Tensor, final: bool) -> Tensor:
        y = self.body.step(x, final)
        q = x if self.queue is None else torch.cat([self.queue, x], dim=-1)
        m = y.shape[-1]
        self.queue = q[..., m:]
        return q[..., :m] + y

    def ready(self, n: int) -> int:
        return self.body.ready(n)

    def state(self) -> List[Tensor]:
        return self.body.state() + ([] if self.queue is None else [self.queue])


class _Attention(_Op):
    """snac's ``LocalMHA``: attention inside fixed windows of ``window_size`` frames from frame 0,
    so a window can run as soon as its last frame arrives."""

    def __init__(self, mha: LocalMHA):
        self.mha, self.window = mha, mha.window_size
        self.buf: Optional[Tensor] = None

    def reset(self, batch: int, device: torch.device) -> None:
        self.buf = None

    def step(self, x: Tensor, final: bool) -> Tensor:
        cat = x if self.buf is None else torch.cat([self.buf, x], dim=-1)
        whole = cat.shape[-1] // self.window * self.window
        self.buf = cat[..., whole:]
        if final and self.buf.shape[-1]:
            raise CodecError(f"the stream ended inside an attention window: this model decodes multiples of "
                             f"{self.window} latent frames; pad the codes to whole windows")
        if not whole:
            return cat[..., :0]
        return self.mha(cat[..., :whole])

    def ready(self, n: int) -> int:
        return n // self.window * self.window

    def state(self) -> List[Tensor]:
        return [] if self.buf is None else [self.buf]


def _is_snake(m: torch.nn.Module) -> bool:
    # snac's Snake1d, or the dtype-following Snake our generators use (same math)
    return isinstance(m, (snac.layers.Snake1d, Snake))


def _compile(module: torch.nn.Module, seed: int, noise: List[int]) -> _Op:
    """The streaming version of a decoder module (recursively). ``noise`` counts NoiseBlocks, in
    the order :class:`Codec` keys their noise."""
    if isinstance(module, (torch.nn.Sequential, DecoderBlock, snac.layers.Decoder)):
        children = module.model if isinstance(module, snac.layers.Decoder) else \
            module.block if isinstance(module, DecoderBlock) else module
        return _Chain([_compile(m, seed, noise) for m in children])
    if isinstance(module, ResidualUnit):
        return _Residual(_compile(module.block, seed, noise))
    if isinstance(module, torch.nn.ConvTranspose1d):
        return _ConvTranspose(module)
    if isinstance(module, torch.nn.Conv1d):
        return _Conv(module)
    if isinstance(module, NoiseBlock):
        noise.append(len(noise))
        return _Noise(module, noise[-1], seed)
    if isinstance(module, LocalMHA):
        return _Attention(module)
    if _is_snake(module):
        return _Pointwise(_snake(module.alpha))
    if isinstance(module, torch.nn.Tanh):
        return _Pointwise(torch.tanh)
    raise CodecError(f"cannot stream decoder layer {type(module).__name__}")


def _model_and_seed(model_or_codec: Union[snac.SNAC, Codec], noise_seed: Optional[int],
                    device: Optional[Union[str, torch.device]]) -> Tuple[snac.SNAC, int, torch.device]:
    if isinstance(model_or_codec, Codec):
        seed = model_or_codec.noise_seed if noise_seed is None else noise_seed
        return model_or_codec.model, seed, torch.device(device) if device else model_or_codec.device
    if isinstance(model_or_codec, snac.SNAC):
        dev = torch.device(device) if device else next(model_or_codec.parameters()).device
        return model_or_codec, 0 if noise_seed is None else noise_seed, dev
    raise CodecError(f"StreamingDecoder needs a snac.SNAC model or a Codec, got {type(model_or_codec).__name__}")


class StreamingDecoder:
    """Decode SNAC codes as they arrive; the audio equals ``Codec.decode`` of the whole sequence.

    ``model_or_codec``: a :class:`~training.codec.Codec` (its model, device and noise seed) or a
    ``snac.SNAC``. ``noise_seed`` overrides the seed of the decoder's keyed noise (a model's default
    is 0, as :class:`Codec`'s). The decoder's weights are copied (weight norm folded) when this
    object is made: later changes to the model do not reach it. Computation is float32.

    A *frame* is one coarse code and the finer codes under it: ``vq_strides[0] // vq_strides[l]``
    codes of level ``l`` (24 kHz: 1 + 2 + 4 codes per 2048 samples, 85.3 ms).

    - ``push(codes)``: codes per level, ``(B, n * r_l)`` (or ``(n * r_l,)`` for one stream) for
      ``n >= 0`` new frames -> ``(B, 1, m)`` float32 audio that is now final.
    - ``flush()`` -> ``(B, 1, m)`` the rest; the decoder is then ready for a new stream.

    The ``B`` streams of a batch advance together and are independent: each item's audio equals the
    single-item decode of its own codes. ``lookahead_frames`` / ``lookahead_samples`` /
    ``lookahead_ms`` say how far the audio lags the pushed codes.
    """

    def __init__(self, model_or_codec: Union[snac.SNAC, Codec], noise_seed: Optional[int] = None,
                 device: Optional[Union[str, torch.device]] = None):
        model, seed, self.device = _model_and_seed(model_or_codec, noise_seed, device)
        self.noise_seed = int(seed)
        self.sample_rate = int(model.sampling_rate)
        self.hop_length = int(model.hop_length)
        self.vq_strides = [int(s) for s in model.vq_strides]
        self.codebook_size = int(model.codebook_size)
        self.frame_latents = self.vq_strides[0]
        self.frame_samples = self.frame_latents * self.hop_length
        self.codes_per_frame = [self.frame_latents // s for s in self.vq_strides]
        with torch.no_grad():
            # Codebook embedding + out_proj of every level, exactly as quantizer.from_codes runs it.
            self._levels = []
            for q in model.quantizer.quantizers:
                w, b = _weights(q.out_proj)
                self._levels.append((q.codebook.weight.detach().clone().to(self.device), w.to(self.device),
                                     b.to(self.device), int(q.stride)))
            self._net = _compile(model.decoder, self.noise_seed, [])
        self.lookahead_samples, self.lookahead_frames = self._lookahead()
        self._batch: Optional[int] = None
        self.frames_pushed = 0
        self.samples_out = 0

    @property
    def lookahead_ms(self) -> float:
        """Worst-case delay of the audio behind the pushed codes, in milliseconds."""
        return 1000.0 * self.lookahead_samples / self.sample_rate

    def _lookahead(self) -> Tuple[int, int]:
        """(samples, frames): the most audio pushed but not yet out, and the most frames that must
        follow a frame before all of its audio is out (steady state, any alignment)."""
        first = 4096  # far from the start; the pattern repeats with the attention window
        period = max(1, math.lcm(*[getattr(op, "window", 1) for op in _walk(self._net)]))
        def out(n: int) -> int:
            return self._net.ready(n * self.frame_latents)

        samples = max(n * self.frame_samples - out(n) for n in range(first, first + period))
        frames = 0
        for f in range(first, first + period):
            k = 0
            while out(f + 1 + k) < (f + 1) * self.frame_samples:
                k += 1
            frames = max(frames, k)
        return samples, frames

    def state_bytes(self) -> int:
        """Bytes of the tensors kept between pushes (bounded by the layers' spans, not the stream)."""
        return sum(t.numel() * t.element_size() for t in self._net.state())

    def _latents(self, codes: Sequence[Tensor]) -> Tensor:
        """codes per level (B, n * r_l) -> (B, latent_dim, n * vq_strides[0]) as ``from_codes``."""
        if not codes[0].shape[-1]:
            return torch.zeros(codes[0].shape[0], self._levels[0][1].shape[0], 0, device=self.device)
        z = 0.0
        for c, (codebook, w, b, stride) in zip(codes, self._levels):
            z_l = F.conv1d(F.embedding(c, codebook).transpose(1, 2), w, b)
            z = z + z_l.repeat_interleave(stride, dim=-1)
        return z

    def _check(self, codes: Sequence[Tensor]) -> Tuple[List[Tensor], int]:
        if len(codes) != len(self.vq_strides):
            raise CodecError(f"push: {len(codes)} code levels, but the model has {len(self.vq_strides)}")
        codes = [torch.as_tensor(c) for c in codes]
        codes = [c[None] if c.dim() == 1 else c for c in codes]
        if any(c.dim() != 2 for c in codes):
            raise CodecError("push: codes per level must be (B, n) or (n,) tensors")
        if any(c.is_floating_point() or c.is_complex() for c in codes):
            raise CodecError("push: codes must be integers")
        batch = codes[0].shape[0]
        n = codes[0].shape[-1] // self.codes_per_frame[0]
        for level, (c, r) in enumerate(zip(codes, self.codes_per_frame)):
            if c.shape != (batch, n * r):
                raise CodecError(f"push: level {level} has shape {tuple(c.shape)}, expected ({batch}, {n * r}) for "
                                 f"{n} frame(s) of {r} code(s) per frame")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook_size):
                raise CodecError(f"push: level {level} codes lie in [{int(c.min())}, {int(c.max())}], outside the "
                                 f"codebook [0, {self.codebook_size})")
        if self._batch is not None and batch != self._batch:
            raise CodecError(f"push: {batch} streams, but this stream has {self._batch}; flush() first")
        return [c.long().to(self.device) for c in codes], n

    @torch.inference_mode()
    def push(self, codes: Sequence[Tensor]) -> Tensor:
        """codes: per level (B, n * r_l) for n new frames -> (B, 1, m) audio now final (m may be 0)."""
        codes, n = self._check(codes)
        if self._batch is None:
            self._batch = codes[0].shape[0]
            self._net.reset(self._batch, self.device)
        audio = self._net.step(self._latents(codes), final=False)
        self.frames_pushed += n
        self.samples_out += audio.shape[-1]
        return audio.float()

    @torch.inference_mode()
    def flush(self) -> Tensor:
        """End the stream -> (B, 1, m) the remaining audio; the decoder then starts a new stream."""
        if self._batch is None:
            return torch.zeros(1, 1, 0, device=self.device)
        empty = torch.zeros(self._batch, self._levels[0][1].shape[0], 0, device=self.device)
        try:
            audio = self._net.step(empty, final=True)
        finally:
            self._batch, self.frames_pushed, self.samples_out = None, 0, 0
        return audio.float()


def _walk(op: _Op) -> List[_Op]:
    kids = op.ops if isinstance(op, _Chain) else [op.body] if isinstance(op, _Residual) else []
    return [op] + [o for k in kids for o in _walk(k)]


class SlidingWindowDecoder:
    """The common practice, as a baseline: for every new frame, decode the last ``window`` frames
    and keep the frame at ``keep`` (0-based) inside that window.

    Window edges get the zero padding of a sequence that ends there, so the kept audio differs from
    the whole-sequence decode wherever the decoder's receptive field reaches past the window; every
    frame is decoded ``window`` times. The noise is keyed by absolute position like
    :class:`Codec`'s, so the truncation is the only difference. Models without local attention only.
    Same interface as :class:`StreamingDecoder` (``push`` / ``flush``).
    """

    def __init__(self, codec: Codec, window: int = 4, keep: int = 1):
        if codec.cfg.attn_window_size:
            raise CodecError("the sliding-window baseline supports models without local attention")
        if not 0 <= keep < window:
            raise CodecError(f"keep must lie in [0, window), got keep={keep}, window={window}")
        self.codec, self.window, self.keep = codec, window, keep
        self.strides = list(codec.cfg.vq_strides)
        self.per = self.codes_per_frame = [self.strides[0] // s for s in self.strides]
        self.frame_samples = self.strides[0] * codec.hop_length
        self._codes: List[List[Tensor]] = []  # per level, the last `window` frames' codes
        self._start = 0  # absolute frame index of the first kept code frame
        self._emitted = 0  # frames whose audio has been returned

    def _decode(self, first: int, count: int, frames: range) -> Tensor:
        """Decode buffered frames ``[first, first + count)`` and return the audio of ``frames``."""
        lo = first - self._start
        codes = [torch.cat(level, dim=-1)[:, lo * r:(lo + count) * r] for level, r in zip(self._codes, self.per)]
        audio = self.codec._decode_batch(codes, [count * self.strides[0]] * codes[0].shape[0],
                                         [first * self.strides[0]] * codes[0].shape[0])
        f = self.frame_samples
        return audio[..., (frames.start - first) * f:(frames.stop - first) * f].cpu()

    def _append(self, codes: Sequence[Tensor]) -> None:
        if not self._codes:
            self._codes = [[] for _ in codes]
        for level, c in enumerate(codes):
            self._codes[level].append(c.long().to(self.codec.device))

    def _frames(self) -> int:
        return self._start + (sum(c.shape[-1] for c in self._codes[0]) if self._codes else 0)

    def _trim(self) -> None:
        """Keep only the frames a future window can still need (bounded memory)."""
        need = max(0, self._frames() - self.window)
        if need > self._start:
            for level, r in enumerate(self.per):
                self._codes[level] = [torch.cat(self._codes[level], dim=-1)[:, (need - self._start) * r:]]
            self._start = need

    def push(self, codes: Sequence[Tensor]) -> Tensor:
        """codes: per level (B, n * r_l) -> (B, 1, m) audio of the frames whose window is complete."""
        codes = [c[None] if c.dim() == 1 else c for c in codes]
        out = []
        for i in range(codes[0].shape[-1] // self.per[0]):
            self._append([c[:, i * r:(i + 1) * r] for c, r in zip(codes, self.per)])
            total = self._frames()
            if total < self.window:
                continue
            first = total - self.window
            # The first full window also gives the frames before `keep` (there is nothing earlier).
            upto = first + self.keep + 1
            if upto > self._emitted:
                out.append(self._decode(first, self.window, range(self._emitted, upto)))
                self._emitted = upto
            self._trim()
        batch = codes[0].shape[0]
        return torch.cat(out, dim=-1) if out else torch.zeros(batch, 1, 0)

    def flush(self) -> Tensor:
        """The frames after the last kept one, from the last window (shorter if the stream was)."""
        total = self._frames()
        if not self._codes or self._emitted >= total:
            out = torch.zeros(1, 1, 0)
        else:
            first = max(self._start, total - self.window)
            out = self._decode(first, total - first, range(self._emitted, total))
        self._codes, self._start, self._emitted = [], 0, 0
        return out
