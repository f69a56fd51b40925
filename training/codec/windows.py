"""Receptive fields, window plans and batch packing for exact chunked inference, and keyed decoder
noise."""

from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence

import numpy as np
from .._snac import snac
import torch
from snac.attention import LocalMHA
from torch import Tensor


NOISE_TILE = 4096  # samples per independently seeded noise tile


class Reach(NamedTuple):
    """One-sided receptive fields, in samples at the model rate.

    encoder: how far from a code's span an input sample can change that code.
    decoder: how far from a code's span that code can change an output sample.
    """

    encoder: int
    decoder: int


def _conv_reach(conv: torch.nn.Conv1d) -> int:
    """Frames on the wider side of a (possibly asymmetric) convolution, at its input rate."""
    k, d, p = conv.kernel_size[0], conv.dilation[0], conv.padding[0]
    return max(p, d * (k - 1) - p)


def _encoder_reach(model: snac.SNAC) -> int:
    reach, jump = 0, 1  # jump: input samples per frame at the current layer's input
    for m in model.encoder.modules():
        if isinstance(m, torch.nn.Conv1d):
            reach += _conv_reach(m) * jump
            jump *= m.stride[0]
        elif isinstance(m, LocalMHA):
            reach += m.window_size * jump
    # A coarse code pools `stride` latent frames: it sees the whole group.
    return reach + max(model.vq_strides) * int(model.hop_length)


def _decoder_reach(model: snac.SNAC) -> int:
    jump = int(model.hop_length)  # output samples per frame at the current layer's input
    reach = max(model.vq_strides) * jump  # a coarse code is repeated over `stride` latent frames
    for m in model.decoder.modules():
        if isinstance(m, torch.nn.ConvTranspose1d):
            s = m.stride[0]
            reach += math.ceil(m.kernel_size[0] / s) * jump
            jump //= s
        elif isinstance(m, torch.nn.Conv1d):
            reach += _conv_reach(m) * jump
        elif isinstance(m, LocalMHA):
            reach += m.window_size * jump
    return reach


def receptive_field(model: snac.SNAC) -> Reach:
    """Upper bounds of the encoder's and decoder's one-sided receptive fields (samples)."""
    return Reach(_encoder_reach(model), _decoder_reach(model))


class Window(NamedTuple):
    """A slice ``[start, stop)`` that is computed, of which ``[keep_start, keep_stop)`` is kept."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


def plan_windows(total: int, chunk: int, context: int) -> List[Window]:
    """Cover ``[0, total)`` with kept ranges of ``chunk`` units, each computed with ``context``
    units of extra input on each side (clipped at the signal's true ends).

    All arguments must be multiples of the caller's alignment quantum. A signal no longer than
    ``chunk + context`` is a single window (chunking it would only add work).
    """
    if total <= chunk + context:
        return [Window(0, total, 0, total)]
    windows = []
    for keep_start in range(0, total, chunk):
        keep_stop = min(total, keep_start + chunk)
        windows.append(Window(max(0, keep_start - context), min(total, keep_stop + context), keep_start, keep_stop))
    return windows


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pack(lengths: Sequence[int], budget: int, max_items: int) -> List[List[int]]:
    """Group indices (longest first) so that ``len(group) * max_length <= budget`` per group."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: List[List[int]] = []
    for i in order:
        if groups and len(groups[-1]) < max_items and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def keyed_noise(seed: int, block: int, start: int, length: int) -> Tensor:
    """Standard normal float32 ``(length,)`` for absolute positions ``[start, start + length)``.

    Each tile of :data:`NOISE_TILE` positions has its own generator seeded by
    ``(seed, block, tile)``, so any slice is reproducible without drawing what precedes it.
    """
    first, last = start // NOISE_TILE, (start + length - 1) // NOISE_TILE
    tiles = [noise_tile(seed, block, t) for t in range(first, last + 1)]
    offset = start - first * NOISE_TILE
    return torch.from_numpy(np.concatenate(tiles)[offset:offset + length])


def noise_tile(seed: int, block: int, tile: int) -> np.ndarray:
    """Tile ``tile`` of block ``block``'s keyed noise: float32 ``(NOISE_TILE,)`` for absolute
    positions ``[tile * NOISE_TILE, (tile + 1) * NOISE_TILE)``."""
    return np.random.default_rng([seed, block, tile]).standard_normal(NOISE_TILE, dtype=np.float32)
