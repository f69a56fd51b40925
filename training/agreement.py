"""Code agreement: the fraction of one model's codes that another model assigns identically.

A TTS or audio language model trained on a SNAC model's tokens breaks when a fine-tune changes
those tokens. Agreement measures it per level::

    agreement_l = #{frames t of level l : codes_A[l][t] == codes_B[l][t]} / #{frames of level l}

pooled over every clip (not a mean of per-clip fractions), so long clips weigh by their length.
1.0 means model B tokenizes the audio exactly as model A does.

In a training run that starts from ``train.init_from``, :class:`ReferenceCodes` holds the codes
the starting model gives the validation set (encoded once, before step 1, and kept in
``<run_dir>/reference_codes.pt`` so a resumed run compares with the same codes); every evaluation
then logs ``val/code_agreement_levelN``. :mod:`training.codec.agree` measures the same number for
any two models on a folder of audio or a tokenizer output folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from ._snac import snac
import torch
from torch import Tensor

from .model import _quantize, pad_to_unit

REFERENCE_NAME = "reference_codes.pt"
AGREEMENT_KEY = "val/code_agreement_level{}"


class AgreementCounter:
    """Per level, how many codes were compared and how many were equal (pooled over clips)."""

    def __init__(self) -> None:
        self.equal: List[int] = []
        self.total: List[int] = []

    def add(self, reference: Sequence[Tensor], codes: Sequence[Tensor], where: str = "codes") -> None:
        """reference, codes: per level, integer tensors of equal shape ((B, T_l) or (T_l,))."""
        if len(reference) != len(codes):
            raise ValueError(f"{where}: {len(reference)} code levels against {len(codes)} (models of another layout?)")
        if not self.total:
            self.equal, self.total = [0] * len(codes), [0] * len(codes)
        elif len(codes) != len(self.total):
            raise ValueError(f"{where}: {len(codes)} code levels, earlier clips had {len(self.total)}")
        for level, (a, b) in enumerate(zip(reference, codes)):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"{where}: level {level} has {tuple(a.shape)} codes against {tuple(b.shape)} "
                                 "(models of another hop or vq_strides?)")
            self.equal[level] += int((a.to(b.device).long() == b.long()).sum())
            self.total[level] += b.numel()

    @property
    def levels(self) -> int:
        return len(self.total)

    def fractions(self) -> List[float]:
        """Agreement per level, coarsest first (1.0 for a level with no codes compared)."""
        return [e / t if t else 1.0 for e, t in zip(self.equal, self.total)]

    def summary(self, key: str = AGREEMENT_KEY) -> Dict[str, float]:
        """``{key.format(level): fraction}`` for every level."""
        return {key.format(level): f for level, f in enumerate(self.fractions())}


def format_agreement(fractions: Sequence[float]) -> str:
    """``level 0 100.000 %, level 1 99.512 %, ...`` (three decimals: one code in 100,000)."""
    return ", ".join(f"level {i} {100 * f:.3f} %" for i, f in enumerate(fractions))


@torch.no_grad()
def encode_codes(model: snac.SNAC, audio: Tensor) -> List[Tensor]:
    """Codes of ``audio`` (B, 1, T) at the model's rate: per level (B, T_l) int64, coarsest first.

    The same fp32 encoder + code search as :func:`training.model.train_forward` (whose codes the
    evaluation compares with these), which equals ``snac.SNAC.encode``.
    """
    with torch.autocast(device_type=audio.device.type, enabled=False):
        z = model.encoder(pad_to_unit(model, audio.float()))
        return _quantize(model, z)[1]


def audio_digest(audio: Tensor) -> str:
    """Short SHA-256 of a batch's float32 samples and shape: which audio a reference belongs to."""
    x = audio.detach().float().cpu().contiguous()
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()[:16]


class ReferenceCodes:
    """The starting model's codes of every validation batch, with each batch's audio digest.

    ``codes[i]``: per level (B, T_l) int32 codes of batch ``i``. A batch whose audio no longer
    matches its digest (a resume with another ``data.val_segment_seconds``) is not compared.
    """

    def __init__(self, source: str, digests: List[str], codes: List[List[Tensor]]):
        self.source, self.digests, self.codes = source, digests, codes

    @classmethod
    def encode(cls, model: snac.SNAC, batches: Iterable[Dict[str, Tensor]], device: torch.device,
               source: str = "") -> "ReferenceCodes":
        """Encode every batch (``{"audio": (B, 1, T)}``) with ``model`` in eval mode."""
        was_training = model.training
        model.eval()
        digests, codes = [], []
        try:
            for batch in batches:
                audio = batch["audio"]
                digests.append(audio_digest(audio))
                codes.append([c.to(torch.int32).cpu() for c in encode_codes(model, audio.to(device))])
        finally:
            model.train(was_training)
        return cls(source, digests, codes)

    def compare(self, index: int, audio: Tensor, codes: Sequence[Tensor], counter: AgreementCounter) -> bool:
        """Add batch ``index``'s agreement to ``counter``; False (nothing added) when the reference
        has no such batch or it was encoded from other audio."""
        if index >= len(self.codes) or audio_digest(audio) != self.digests[index]:
            return False
        counter.add(self.codes[index], codes, where=f"validation batch {index}")
        return True

    def save(self, path: Path) -> None:
        """Atomic write (temp file + rename): a kill never leaves a half-written reference."""
        payload = {"format": 1, "source": self.source, "digests": self.digests, "codes": self.codes}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> Optional["ReferenceCodes"]:
        """The reference saved at ``path``; None when there is none or it cannot be read."""
        if not path.is_file():
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            return cls(str(d["source"]), list(d["digests"]), [list(c) for c in d["codes"]])
        except Exception:  # noqa: BLE001 - a damaged reference only costs the agreement metric
            return None
