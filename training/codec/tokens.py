"""Flat interleaved token streams <-> SNAC code frames, as TTS language models emit them.

A model built on the 24 kHz codec (Orpheus-style) writes 7 tokens per 85 ms frame: the coarse code,
then the finer codes depth first::

    position   0        1        2        3          4          5          6
    code       l0[f]    l1[2f]   l2[4f]   l2[4f+1]   l1[2f+1]   l2[4f+2]   l2[4f+3]

and each position has its own token offset (token = code + offset), so the model's vocabulary keeps
the seven positions apart (Orpheus: ``128266 + 4096 * position``). :class:`FrameLayout` converts
codes to such a stream and back for any nested ``vq_strides`` (15 tokens per frame for 4 levels);
:class:`TokenParser` does it incrementally, holding an incomplete frame until its last token comes.
A token outside its position's range is an error that names the token; nothing is ever shifted
into the wrong position.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from .files import CodecError


ORPHEUS_BASE = 128266  # Orpheus TTS: id of the first audio token (position 0, code 0)


class TokenLayoutError(CodecError):
    """A token stream that does not fit the layout (names the offending token)."""


def frame_order(vq_strides: Sequence[int]) -> List[Tuple[int, int]]:
    """``(level, index within the frame)`` of each token of one frame, coarse first, depth first.

    (4, 2, 1) -> [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3)].
    """
    for a, b in zip(vq_strides, vq_strides[1:]):
        if a % b:
            raise TokenLayoutError(f"vq_strides {list(vq_strides)} are not nested multiples: no frame layout")
    order: List[Tuple[int, int]] = []

    def visit(level: int, index: int) -> None:
        order.append((level, index))
        if level + 1 < len(vq_strides):
            ratio = vq_strides[level] // vq_strides[level + 1]
            for child in range(ratio):
                visit(level + 1, index * ratio + child)

    visit(0, 0)
    return order


class FrameLayout:
    """Codes per level <-> a flat stream of ``tokens_per_frame`` tokens per frame.

    ``offsets``: the token of code ``c`` at frame position ``p`` is ``c + offsets[p]``; one int for
    every position, or one per position (``len(frame_order(vq_strides))``). Default 0.
    """

    def __init__(self, vq_strides: Sequence[int] = (4, 2, 1), codebook_size: int = 4096,
                 offsets: Union[int, Sequence[int]] = 0):
        self.vq_strides = tuple(int(s) for s in vq_strides)
        self.codebook_size = int(codebook_size)
        self.order = frame_order(self.vq_strides)
        self.tokens_per_frame = len(self.order)
        self.per_frame = [self.vq_strides[0] // s for s in self.vq_strides]  # codes of each level per frame
        if isinstance(offsets, int):
            offsets = [offsets] * self.tokens_per_frame
        if len(offsets) != self.tokens_per_frame:
            raise TokenLayoutError(f"{len(offsets)} offsets for a frame of {self.tokens_per_frame} tokens")
        self.offsets = torch.tensor([int(o) for o in offsets], dtype=torch.long)

    @classmethod
    def orpheus(cls, base: int = ORPHEUS_BASE) -> "FrameLayout":
        """The 7-token layout of Orpheus-style TTS on the 24 kHz codec: position p is offset by
        ``base + 4096 * p``."""
        return cls((4, 2, 1), 4096, [base + 4096 * p for p in range(7)])

    def _positions(self) -> Tuple[Tensor, Tensor]:
        levels = torch.tensor([lv for lv, _ in self.order])
        index = torch.tensor([i for _, i in self.order])
        return levels, index

    def to_tokens(self, codes: Sequence[Tensor]) -> Tensor:
        """codes per level (B, n * r_l) or (n * r_l,) -> tokens (B, n * tokens_per_frame) or (n * tpf,)."""
        single = codes[0].dim() == 1
        codes = [c[None] if c.dim() == 1 else c for c in codes]
        if len(codes) != len(self.vq_strides):
            raise TokenLayoutError(f"{len(codes)} code levels for a layout of {len(self.vq_strides)}")
        batch, n = codes[0].shape[0], codes[0].shape[-1] // self.per_frame[0]
        columns = []
        for (level, index), offset in zip(self.order, self.offsets.tolist()):
            c = codes[level]
            if c.shape != (batch, n * self.per_frame[level]):
                raise TokenLayoutError(f"level {level} has shape {tuple(c.shape)}, expected "
                                       f"({batch}, {n * self.per_frame[level]}) for {n} frames")
            columns.append(c.long().cpu().reshape(batch, n, self.per_frame[level])[..., index] + offset)
        tokens = torch.stack(columns, dim=-1).reshape(batch, n * self.tokens_per_frame)
        return tokens[0] if single else tokens

    def _check(self, tokens: Tensor, first: int) -> None:
        """TokenLayoutError for the first token outside its position's range; ``first`` is the
        stream index of ``tokens[0]``, which must start a frame."""
        pos = (torch.arange(tokens.numel()) + first) % self.tokens_per_frame
        code = tokens - self.offsets[pos]
        bad = ((code < 0) | (code >= self.codebook_size)).nonzero()
        if len(bad):
            i = int(bad[0])
            p = int(pos[i])
            level, index = self.order[p]
            lo = int(self.offsets[p])
            raise TokenLayoutError(
                f"token {first + i} (value {int(tokens[i])}, frame {(first + i) // self.tokens_per_frame} position "
                f"{p}: level {level} code {index}) is outside [{lo}, {lo + self.codebook_size}) for that position")

    def _split(self, tokens: Tensor) -> List[Tensor]:
        """tokens (n * tpf,) checked -> codes per level (1, n * r_l)."""
        frames = tokens.reshape(-1, self.tokens_per_frame) - self.offsets
        n = frames.shape[0]
        codes = [torch.empty(n, r, dtype=torch.long) for r in self.per_frame]
        for p, (level, index) in enumerate(self.order):
            codes[level][:, index] = frames[:, p]
        return [c.reshape(1, -1) for c in codes]

    def to_codes(self, tokens: Union[Tensor, Sequence[int]]) -> List[Tensor]:
        """A whole token stream (n * tokens_per_frame,) -> codes per level (1, n * r_l).

        Raises TokenLayoutError naming the first token out of its position's range, or the
        incomplete last frame.
        """
        tokens = _as_tokens(tokens)
        self._check(tokens, 0)
        whole = tokens.numel() // self.tokens_per_frame * self.tokens_per_frame
        if whole != tokens.numel():
            raise TokenLayoutError(
                f"the stream ends inside frame {whole // self.tokens_per_frame}: tokens {whole}..{tokens.numel() - 1} are "
                f"{tokens.numel() - whole} of its {self.tokens_per_frame}")
        return self._split(tokens)

    def parser(self) -> "TokenParser":
        """An incremental parser for one stream."""
        return TokenParser(self)


class TokenParser:
    """Turns a token stream into frames as it arrives: ``feed(tokens)`` returns the codes of the
    frames it completes (a trailing incomplete frame is held), ``close()`` checks nothing is left.

    A feed with a token out of its position's range raises TokenLayoutError naming it (its index in
    the whole stream) and changes nothing, so the stream never shifts out of alignment.
    """

    def __init__(self, layout: FrameLayout):
        self.layout = layout
        self.held = torch.zeros(0, dtype=torch.long)  # tokens of the incomplete frame
        self.consumed = 0  # tokens before `held` in the stream

    def feed(self, tokens: Union[Tensor, Sequence[int]]) -> List[Tensor]:
        """tokens (k,) -> codes per level (1, n * r_l) of the n frames now complete (n may be 0)."""
        tokens = torch.cat([self.held, _as_tokens(tokens)])
        self.layout._check(tokens, self.consumed)
        whole = tokens.numel() // self.layout.tokens_per_frame * self.layout.tokens_per_frame
        self.held, self.consumed = tokens[whole:], self.consumed + whole
        return self.layout._split(tokens[:whole])

    @property
    def pending(self) -> int:
        """Tokens held for an incomplete frame."""
        return int(self.held.numel())

    def close(self) -> None:
        """End of stream: TokenLayoutError if an incomplete frame is held."""
        if self.pending:
            tpf = self.layout.tokens_per_frame
            raise TokenLayoutError(
                f"the stream ended inside frame {self.consumed // tpf}: tokens {self.consumed}..{self.consumed + self.pending - 1} "
                f"are {self.pending} of its {tpf}")


def _as_tokens(tokens: Union[Tensor, Sequence[int]]) -> Tensor:
    t = torch.as_tensor(tokens) if len(tokens) else torch.zeros(0, dtype=torch.long)  # [] reads as float
    if t.is_floating_point() or t.is_complex() or t.dim() > 1:
        raise TokenLayoutError(f"tokens must be a 1-D sequence of integers, got {t.dtype} of shape {tuple(t.shape)}")
    return t.reshape(-1).long().cpu()
