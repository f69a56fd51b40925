"""Export the codec as graphs for other runtimes (ONNX, ``torch.export``) and check their parity.

Two graphs per model, each with a dynamic batch and time axis:

- **encoder**: ``audio (B, 1, T)`` float32 at the model rate, any ``T >= 1`` (right-padded inside
  the graph to the pad multiple, as ``snac.SNAC.encode`` does) -> ``codes_0 .. codes_{L-1}``,
  int64 ``(B, n_l)``, coarsest first.
- **decoder**: ``codes_0 .. codes_{L-1}`` (int64 ``(B, n_0 * vq_strides[0] // vq_strides[l])``)
  and, with ``noise="input"``, one noise input per noise block ``noise_k (B, 1, n_0 *
  vq_strides[0] * up_k)`` (``up_k``: that block's upsampling from the latent rate, see
  :func:`noise_inputs`) -> ``audio (B, 1, n_0 * vq_strides[0] * hop)``. ``noise="off"`` removes
  the noise blocks (a deterministic decoder that differs from the trained one by its noise term).

Weight norm is folded into plain weights (``remove_parametrizations``), so the graphs hold one
tensor per convolution. To reproduce :class:`~training.codec.Codec`'s decode exactly, feed the
noise inputs :func:`keyed_noise_inputs` (the same keyed noise by position).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .._snac import snac
import torch
import torch.nn.functional as F
from snac.attention import LocalMHA, apply_rotary_pos_emb
from snac.layers import DecoderBlock, NoiseBlock
from torch import Tensor

from ..config import ModelConfig
from ..model import build_generator
from .engine import Codec
from .files import CodecError
from .windows import keyed_noise


FORMATS = ("onnx", "pt2")
NOISE_MODES = ("input", "off")
ONNX_OPSET = 18  # ours: what onnxruntime >= 1.16 runs and torch's exporter emits by default


class ExportError(CodecError):
    """An export that cannot be written (missing exporter package, existing outputs, bad options)."""


def plain_copy(model: snac.SNAC, cfg: ModelConfig) -> snac.SNAC:
    """A copy on CPU in eval mode with weight norm folded and every Snake a plain module (snac's
    own Snake1d calls a TorchScript function, which the exporters do not trace)."""
    # Not copy.deepcopy: a deep copy shares each parametrised module's generated class with the
    # original, and removing the parametrisation from the copy would strip the original's weights.
    model_ = build_generator(cfg, init=None)
    model_.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    model = model_.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LocalMHA):
                setattr(parent, name, WindowAttention(child))
    for m in model.modules():
        if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            torch.nn.utils.parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


class WindowAttention(torch.nn.Module):
    """snac's ``LocalMHA`` with the windows folded into the batch axis: the same operations on 4-D
    tensors, because ONNX's attention (and its exporter) takes 4-D query, key and value only."""

    def __init__(self, mha: LocalMHA):
        super().__init__()
        self.norm, self.to_qkv, self.to_out, self.rel_pos = mha.norm, mha.to_qkv, mha.to_out, mha.rel_pos
        self.heads, self.window = mha.heads, mha.window_size

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, T), T a multiple of the window -> (B, C, T)."""
        b, c, t = x.shape
        residual = x
        x = self.norm(x.transpose(1, 2))
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        d = c // self.heads

        def split(u: Tensor) -> Tensor:  # (B, T, h d) -> (B * windows, h, n, d)
            u = u.reshape(b, t // self.window, self.window, self.heads, d)
            return u.permute(0, 1, 3, 2, 4).reshape(-1, self.heads, self.window, d)

        q, k, v = split(q), split(k), split(v)
        if self.rel_pos is not None:
            pos_emb, scale = self.rel_pos(k)
            q, k = apply_rotary_pos_emb(q, k, pos_emb, scale)
        out = F.scaled_dot_product_attention(q, k, v)  # (B * windows, h, n, d)
        out = out.reshape(b, t // self.window, self.heads, self.window, d).permute(0, 1, 3, 2, 4).reshape(b, t, c)
        return self.to_out(out).transpose(1, 2) + residual


def noise_inputs(model: snac.SNAC) -> List[int]:
    """Per noise block (decoder order), its time upsampling from the latent rate."""
    ups, factor = [], 1
    for m in model.decoder.modules():
        if isinstance(m, torch.nn.ConvTranspose1d):
            factor *= m.stride[0]
        elif isinstance(m, NoiseBlock):
            ups.append(factor)
    return ups


def keyed_noise_inputs(model: snac.SNAC, frames: int, seed: int = 0, batch: int = 1) -> List[Tensor]:
    """The noise inputs that make the exported decoder equal ``Codec.decode`` with ``seed``, for
    ``frames`` level-0 codes: per block ``(batch, 1, frames * vq_strides[0] * up_k)``."""
    latent = frames * int(model.vq_strides[0])
    return [keyed_noise(seed, k, 0, latent * up)[None, None].expand(batch, 1, -1).contiguous()
            for k, up in enumerate(noise_inputs(model))]


class EncoderGraph(torch.nn.Module):
    """audio (B, 1, T) -> codes per level (B, n_l), as ``snac.SNAC.encode``."""

    def __init__(self, model: snac.SNAC):
        super().__init__()
        self.encoder, self.quantizer = model.encoder, model.quantizer
        self.pad_multiple = int(model.hop_length) * math.lcm(int(model.vq_strides[0]), model.attn_window_size or 1)

    def forward(self, audio: Tensor) -> Tuple[Tensor, ...]:
        pad = (self.pad_multiple - audio.shape[-1] % self.pad_multiple) % self.pad_multiple
        z = self.encoder(F.pad(audio, (0, pad)))
        _, codes = self.quantizer(z)
        return tuple(codes)


class DecoderGraph(torch.nn.Module):
    """codes per level (+ one noise tensor per noise block with ``noise="input"``) -> audio (B, 1, T)."""

    def __init__(self, model: snac.SNAC, noise: str = "input"):
        super().__init__()
        if noise not in NOISE_MODES:
            raise ExportError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
        self.quantizer, self.decoder, self.noise = model.quantizer, model.decoder, noise
        self.levels = len(model.vq_strides)

    def forward(self, *inputs: Tensor) -> Tensor:
        codes, noise = list(inputs[:self.levels]), list(inputs[self.levels:])
        x = self.quantizer.from_codes(codes)
        k = 0
        for layer in self.decoder.model:
            if not isinstance(layer, DecoderBlock):
                x = layer(x)
                continue
            for sub in layer.block:
                if isinstance(sub, NoiseBlock):
                    if self.noise == "input":
                        x = x + noise[k] * sub.linear(x)  # NoiseBlock's formula, its randn as an input
                    k += 1
                else:
                    x = sub(x)
        return x


def _example(model: snac.SNAC, frames: int, noise: str, batch: int = 2) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
    """(encoder args, decoder args) of a small example, for tracing."""
    hop, strides = int(model.hop_length), [int(s) for s in model.vq_strides]
    g = torch.Generator().manual_seed(0)
    audio = 0.1 * torch.randn(batch, 1, frames * strides[0] * hop - 5, generator=g)  # not a pad multiple
    codes = tuple(torch.randint(0, int(model.codebook_size), (batch, frames * strides[0] // s), generator=g)
                  for s in strides)
    noises = tuple(keyed_noise_inputs(model, frames, 0, batch)) if noise == "input" else ()
    return (audio,), codes + noises


def _names(model: snac.SNAC, noise: str) -> Tuple[List[str], List[str]]:
    levels = len(model.vq_strides)
    codes = [f"codes_{i}" for i in range(levels)]
    noises = [f"noise_{k}" for k in range(len(noise_inputs(model)))] if noise == "input" else []
    return codes, noises


def _dynamic_shapes(model: snac.SNAC, noise: str):
    """(encoder, decoder) dynamic-shape specs: the batch and every time axis are dynamic (the
    exporter derives how the decoder's time axes relate from the graph itself)."""
    from torch.export import Dim

    dyn = Dim.DYNAMIC
    enc = ({0: dyn, 2: dyn},)
    codes = tuple({0: dyn, 1: dyn} for _ in model.vq_strides)
    noises = tuple({0: dyn, 2: dyn} for _ in noise_inputs(model)) if noise == "input" else ()
    return enc, (codes + noises,)  # the decoder takes its inputs as one *args tuple


def _frames_quantum(model: snac.SNAC) -> int:
    """Level-0 codes per attention window (the decoder needs whole windows)."""
    w = model.attn_window_size or 1
    return math.lcm(int(model.vq_strides[0]), w) // int(model.vq_strides[0])


def export_graphs(model: snac.SNAC, cfg: ModelConfig, out_dir: os.PathLike, fmt: str = "onnx", noise: str = "input",
                  overwrite: bool = False) -> Dict[str, Path]:
    """Write ``encoder.<fmt>`` and ``decoder.<fmt>`` (+ ``export.json``: names, shapes, noise) to
    ``out_dir``. ``fmt``: ``onnx`` (needs the ``onnx`` and ``onnxscript`` packages) or ``pt2``
    (``torch.export``). Existing files are replaced only with ``overwrite``. Returns the paths."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if noise not in NOISE_MODES:
        raise ExportError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
    out = Path(out_dir)
    paths = {"encoder": out / f"encoder.{fmt}", "decoder": out / f"decoder.{fmt}", "meta": out / f"export_{fmt}.json"}
    if out.exists() and not out.is_dir():
        raise ExportError(f"export target {out} exists and is not a folder")
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise ExportError(f"{existing[0]} already exists; pass --overwrite to replace it")
    if fmt == "onnx":
        _require("onnx", "onnxscript")
    plain = plain_copy(model, cfg)
    frames = 2 * _frames_quantum(plain)
    enc_args, dec_args = _example(plain, frames, noise)
    enc_dyn, dec_dyn = _dynamic_shapes(plain, noise)
    code_names, noise_names = _names(plain, noise)
    out.mkdir(parents=True, exist_ok=True)
    graphs = [("encoder", EncoderGraph(plain), enc_args, enc_dyn, ["audio"], code_names),
              ("decoder", DecoderGraph(plain, noise), dec_args, dec_dyn, code_names + noise_names, ["audio"])]
    # Size-oblivious tracing: without it the exporter guards on the traced batch being > 1 (a
    # reshape of (B * n) rows back to (B, n) looks different when B == 1) and rejects batch 1.
    from torch.fx.experimental import _config as fx_config

    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        for name, module, args, dyn, inputs, outputs in graphs:
            tmp = paths[name].with_name(f".{name}.tmp{os.getpid()}.{fmt}")  # (torch.export.save wants the suffix)
            try:
                if fmt == "onnx":
                    _onnx(module, args, dyn, inputs, outputs, tmp)
                else:
                    torch.export.save(torch.export.export(module, args, dynamic_shapes=dyn), str(tmp))
                os.replace(tmp, paths[name])
            finally:
                if tmp.exists():
                    tmp.unlink()
    meta = {"format": fmt, "noise": noise, "model": cfg.snac_kwargs(), "encoder_inputs": ["audio"],
            "encoder_outputs": code_names, "decoder_inputs": code_names + noise_names, "decoder_outputs": ["audio"],
            "noise_upsampling": noise_inputs(plain) if noise == "input" else [],
            "decoder_frames_multiple": _frames_quantum(plain)}
    tmp = paths["meta"].with_name(f".{paths['meta'].name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, paths["meta"])
    return paths


def _require(*packages: str) -> None:
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: pip install 'snac-training[export]' "
                          f"(or pip install {' '.join(missing)})")


def _onnx(module: torch.nn.Module, args, dyn, inputs: List[str], outputs: List[str], path: Path) -> None:
    import logging
    import warnings

    # The exporter logs a warning per missing optional package (torchvision) on every call.
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, input_names=inputs, output_names=outputs, dynamic_shapes=dyn,
                                    opset_version=ONNX_OPSET, dynamo=True, verbose=False)
    registry_log.setLevel(level)
    # One self-contained file (weights inline; every preset is far below protobuf's 2 GB limit).
    program.save(str(path), external_data=False)


# ---- parity ----


class GraphRunner:
    """Runs exported graphs: ``onnx`` with onnxruntime on CPU, ``pt2`` with ``torch.export.load``."""

    def __init__(self, path: os.PathLike, fmt: str):
        self.fmt = fmt
        if fmt == "onnx":
            _require("onnxruntime")
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
        else:
            self.module = torch.export.load(str(path)).module()

    def __call__(self, *args: Tensor) -> List[Tensor]:
        if self.fmt == "onnx":
            feeds = {name: a.numpy() for name, a in zip(self.inputs, args)}
            return [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        with torch.no_grad():
            out = self.module(*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]


def check_parity(model: snac.SNAC, cfg: ModelConfig, out_dir: os.PathLike, audio: Tensor, fmt: str = "onnx",
                 noise: str = "input", noise_seed: int = 0) -> Dict[str, Any]:
    """Run the exported graphs in ``out_dir`` against the PyTorch model on ``audio`` ((T,) at the
    model rate).

    Encoder: codes vs ``snac.SNAC.encode`` (same weights). Decoder, on those codes: audio vs
    ``Codec.decode`` with keyed noise ``noise_seed`` (``noise="input"``, fed the same noise), or vs
    the PyTorch decoder without noise blocks (``noise="off"``). Returns a dict with
    ``codes_identical``, ``codes_differing`` (count), ``decoder_max_abs_error`` and sizes.
    """
    out = Path(out_dir)
    model = copy.deepcopy(model).cpu().eval()  # the Codec below hooks the model it is given
    x = audio.detach().float().cpu().reshape(1, 1, -1)
    with torch.inference_mode():
        ref_codes = [c.cpu() for c in model.encode(x)]
    codes = [c.long() for c in GraphRunner(out / f"encoder.{fmt}", fmt)(x)]
    differing = sum(int((a != b).sum()) if a.shape == b.shape else max(a.numel(), b.numel())
                    for a, b in zip(codes, ref_codes))
    identical = differing == 0 and all(a.shape == b.shape for a, b in zip(codes, ref_codes))
    frames = ref_codes[0].shape[-1]
    if noise == "input":
        ref_audio = Codec(model, cfg, device="cpu", precision="fp32", noise_seed=noise_seed).decode(ref_codes)
        noises = keyed_noise_inputs(model, frames, noise_seed)
    else:
        with torch.inference_mode():
            ref_audio = DecoderGraph(model, "off")(*ref_codes)
        noises = []
    got = GraphRunner(out / f"decoder.{fmt}", fmt)(*ref_codes, *noises)[0]
    if got.shape != ref_audio.shape:
        raise CodecError(f"exported decoder returned shape {tuple(got.shape)}, expected {tuple(ref_audio.shape)}")
    return {"format": fmt, "noise": noise, "samples": int(x.shape[-1]), "frames": int(frames),
            "codes_identical": bool(identical), "codes_differing": int(differing),
            "codes_total": int(sum(c.numel() for c in ref_codes)),
            "decoder_max_abs_error": float((got - ref_audio).abs().max())}
