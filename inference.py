#!/usr/bin/env python
"""Encode, decode, round-trip and export SNAC codecs (thin CLI over :mod:`training.codec`).

    python inference.py --checkpoint PATH --input audio.wav --output result.wav      # round trip
    python inference.py roundtrip --checkpoint PATH --input DIR --output OUT_DIR --metrics m.json
    python inference.py encode    --checkpoint PATH --input audio.flac --output audio.npz
    python inference.py decode    --checkpoint PATH --input audio.npz --output audio.wav
    python inference.py export    --checkpoint runs/x/checkpoints/best.pt --output my_snac/
    python inference.py export    --checkpoint my_snac/ --output onnx/ --format onnx --check audio.wav

Every user mistake prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

COMMANDS = ("roundtrip", "encode", "decode", "export")

COMPRESSION_HELP = ("compression ratio = bitrate of mono 16-bit PCM at the input's sample rate "
                    "(rate x 16 bit/s) divided by the codec bitrate (sum of token rates x log2(codebook size)); "
                    "real-time factor (RTF) = compute seconds per second of audio (< 1 is faster than real time)")


class UsageError(Exception):
    """A command-line mistake: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see {self.prog} --help)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", required=True, metavar="PATH",
                   help="model: our training checkpoint (.pt), a run directory (uses checkpoints/latest.pt), "
                        "a SNAC directory (config.json + pytorch_model.bin) or a hub id such as "
                        "hubertsiuzdak/snac_24khz (from the local Hugging Face cache when offline)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto = bf16 autocast on CUDA, fp32 elsewhere; the nearest-code search is always fp32")
    p.add_argument("--chunk-seconds", type=float, default=10.0, metavar="S",
                   help="long audio is processed in chunks of this many seconds plus the model's receptive "
                        "field on each side; results equal one-shot processing (default: 10)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="files read together and chunks per forward pass; memory grows with "
                        "N x (chunk + 2 x context) samples (default: 8 on CUDA, 2 on CPU)")
    p.add_argument("--noise-seed", type=int, default=0, metavar="N",
                   help="seed of the decoder's noise blocks: the same seed gives identical audio (default: 0)")
    p.add_argument("--no-recursive", action="store_true", help="for folder inputs, do not descend into sub-folders")
    p.add_argument("--quiet", "-q", action="store_true", help="print only errors")


def _io_args(p: argparse.ArgumentParser, inp: str, out: str) -> None:
    p.add_argument("--input", "-i", required=True, metavar="PATH", help=inp)
    p.add_argument("--output", "-o", required=True, metavar="PATH", help=out)
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files that already exist (default: refuse, before any work)")


def _roundtrip_args(p: argparse.ArgumentParser) -> None:
    _io_args(p, "audio file or folder (WAV, FLAC, MP3, OGG, M4A, ...)",
             "output WAV file (one input) or folder (folder input: same relative paths, .wav)")
    _model_args(p)
    p.add_argument("--keep-rate", action="store_true",
                   help="resample the output back to each input's sample rate (default: the model's rate)")
    p.add_argument("--metrics", metavar="JSON", help="also write the metrics (per file and mean) to this JSON file")
    p.add_argument("--no-metrics", action="store_true", help="skip computing and printing metrics")
    p.add_argument("--plot", metavar="PNG",
                   help="spectrograms of original and reconstruction with the metrics in the title "
                        "(needs matplotlib); for a folder input, a folder receiving one PNG per file")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="inference.py", description=__doc__.split("\n\n")[0].split(" (")[0] + ". " + COMPRESSION_HELP + ".",
                     epilog="Without a command, the arguments are those of `roundtrip`: "
                            "python inference.py --checkpoint PATH --input audio.wav --output result.wav")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _roundtrip_args(sub.add_parser("roundtrip", help="encode and decode audio, print metrics",
                                   description="Encode and decode audio; print metrics. " + COMPRESSION_HELP + "."))
    enc = sub.add_parser("encode", help="audio -> codes files (.npz)",
                         description="Encode audio to codes files: .npz with one integer array per level "
                                     "(codes_0 coarsest), sample rates, original length and the model identity.")
    _io_args(enc, "audio file or folder", "codes file (.npz) for one input, or a folder (same relative paths, .npz)")
    _model_args(enc)
    dec = sub.add_parser("decode", help="codes files (.npz) -> WAV",
                         description="Decode codes files to WAV, trimmed to the original length.")
    _io_args(dec, "codes file (.npz) or a folder of them", "output WAV file, or a folder for a folder input")
    _model_args(dec)
    dec.add_argument("--keep-rate", action="store_true",
                     help="resample to the original input's sample rate and length (stored in the codes file)")
    exp = sub.add_parser("export", help="checkpoint -> SNAC directory, or ONNX / torch.export graphs",
                         description="Export a model: a SNAC directory (config.json + pytorch_model.bin, loads with "
                                     "snac.SNAC.from_pretrained), or encoder and decoder graphs for other runtimes "
                                     "(ONNX, or torch.export .pt2 programs) with dynamic batch and time axes and "
                                     "weight norm folded in.")
    exp.add_argument("--checkpoint", "-c", required=True, metavar="PATH",
                     help="our training checkpoint (.pt), a run directory, a SNAC directory or a hub id")
    exp.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to write")
    exp.add_argument("--overwrite", action="store_true", help="replace a model or graphs already in DIR")
    exp.add_argument("--format", default="snac", choices=("snac", "onnx", "pt2"),
                     help="snac: SNAC directory; onnx: DIR/encoder.onnx + DIR/decoder.onnx (needs pip install "
                          ".[export]); pt2: DIR/encoder.pt2 + DIR/decoder.pt2 (torch.export) (default: snac)")
    exp.add_argument("--noise", default=None, choices=("input", "off"),
                     help="graphs only: the decoder's noise blocks take their noise as inputs noise_0.. (feed "
                          "keyed noise to reproduce the decode of this toolkit exactly), or are removed "
                          "(default: input)")
    exp.add_argument("--check", metavar="AUDIO",
                     help="graphs only: run them (onnxruntime on CPU, or the loaded .pt2) on this audio file and "
                          "compare with the PyTorch model: codes vs snac.SNAC.encode, audio vs the PyTorch decode; "
                          "exit status 1 when codes differ or the error exceeds --tolerance")
    exp.add_argument("--tolerance", type=float, default=1e-4, metavar="E",
                     help="largest acceptable max abs difference of the decoded audio in --check (default: 1e-4)")
    exp.add_argument("--noise-seed", type=int, default=0, metavar="N",
                     help="seed of the keyed noise fed to the decoder in --check (default: 0)")
    exp.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    return parser


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def _say(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _codec(args: argparse.Namespace):
    from training.codec import load_codec

    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.chunk_seconds > 0:
        raise UsageError(f"--chunk-seconds must be positive, got {args.chunk_seconds}")
    return load_codec(args.checkpoint, device=args.device, precision=args.precision,
                      chunk_seconds=args.chunk_seconds, batch_size=args.batch_size, noise_seed=args.noise_seed)


# What each command writes, for the output-name check: a codes file under a .wav name (or WAV
# data under .mp3) would mislead every program that opens it.
WRITES = {".npz": "codes files (.npz)", ".wav": "WAV audio (.wav)"}


def check_writable(path: Path, flag: str) -> None:
    """UsageError now, before any work, when ``path`` (a file or folder to create) cannot be
    written: an existing folder in the way, a file where a folder is needed, no permission."""
    if path.is_dir() and flag != "--output-folder":
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    parent = path if flag == "--output-folder" else path.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {existing} (no permission, or a read-only filesystem)")


def _plan(args: argparse.Namespace, suffixes: Optional[tuple], out_suffix: str):
    """(inputs, outputs, folder_mode) with the output checks every command shares."""
    from training.codec import collect_inputs, output_paths, refuse_overwriting_inputs

    inputs, root = collect_inputs(args.input, suffixes, recursive=not args.no_recursive)
    out = Path(args.output)
    if root is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file; a folder input needs an output folder")
    if root is None and out.is_dir():
        out = out / (inputs[0].stem + out_suffix)  # an existing folder receives the file
    if root is None and out.suffix.lower() != out_suffix:
        raise UsageError(f"--output {out}: {args.command} writes {WRITES[out_suffix]}; "
                         f"use a name ending in {out_suffix}")
    check_writable(out, "--output-folder" if root is not None else "--output")
    outputs = output_paths(inputs, root, out, out_suffix)
    refuse_overwriting_inputs(inputs, outputs)
    existing = [o for o in outputs if o.exists()]
    if existing and not args.overwrite:
        more = f" (and {len(existing) - 1} more of the {len(outputs)} outputs)" if len(existing) > 1 else ""
        raise UsageError(f"--output: {existing[0]} already exists{more}; pass --overwrite to replace it")
    return inputs, outputs, root is not None


def _finish(failed: int, total: int, folder: bool) -> int:
    if failed and folder:
        _warn(f"{failed} of {total} inputs failed (reported above); the others were processed")
    return 2 if failed else 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from training.audio import save_audio
    from training.codec import compute_metrics, format_table, mean_metrics, metrics_title, plot_spectrograms, write_json

    inputs, outputs, folder = _plan(args, None, ".wav")
    if args.plot and not folder and Path(args.plot).suffix.lower() not in (".png", ".jpg", ".jpeg", ".svg", ".pdf"):
        raise UsageError(f"--plot {args.plot}: use an image file name such as out.png")
    if args.metrics and not args.no_metrics:
        check_writable(Path(args.metrics), "--metrics")
    if args.plot:
        check_writable(Path(args.plot), "--output-folder" if folder else "--plot")
    if args.plot:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install matplotlib")
    codec = _codec(args)
    out_of = dict(zip(inputs, outputs))
    rows: List[tuple] = []
    failed = 0
    for rt in codec.roundtrip_files(inputs, keep_rate=args.keep_rate):
        if rt.error is not None:
            _warn(f"skipped {rt.error}" if folder else str(rt.error))
            failed += 1
            continue
        save_audio(out_of[rt.path], rt.audio, rt.rate)
        _say(args, f"wrote {out_of[rt.path]} ({rt.audio.shape[-1]} samples at {rt.rate} Hz)")
        if args.no_metrics and not args.plot:
            continue
        name = str(rt.path.relative_to(args.input)) if folder else rt.path.name
        try:
            m = compute_metrics(rt.reference, rt.audio, rt.rate, codec.cfg, rt.encoded.input_sample_rate,
                                rt.encoded.codes, rt.encoded.encode_seconds, rt.decode_seconds)
            rows.append((name, {"file": str(rt.path), "output": str(out_of[rt.path]), **m}))
            if args.plot:
                plot = Path(args.plot) / Path(name).with_suffix(".png") if folder else Path(args.plot)
                plot_spectrograms(rt.reference, rt.audio, rt.rate, plot, f"{name}: {metrics_title(m)}")
        except (ValueError, RuntimeError) as e:  # one file's metrics never stop a folder
            _warn(f"{rt.path}: metrics failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            failed += 1
    if rows and not args.no_metrics:
        mean = mean_metrics([m for _, m in rows])
        _say(args, format_table(rows + ([("mean", mean)] if len(rows) > 1 else [])))
        if args.metrics:
            write_json(args.metrics, {"model": codec.identity(), "files": [m for _, m in rows], "mean": mean})
            _say(args, f"wrote {args.metrics}")
    return _finish(failed, len(inputs), folder)


def cmd_encode(args: argparse.Namespace) -> int:
    from training.codec import save_codes

    inputs, outputs, folder = _plan(args, None, ".npz")
    codec = _codec(args)
    out_of = dict(zip(inputs, outputs))
    failed = 0
    for path, enc in codec.encode_files(inputs):
        if isinstance(enc, Exception):
            _warn(f"skipped {enc}" if folder else str(enc))
            failed += 1
            continue
        save_codes(out_of[path], enc)
        _say(args, f"wrote {out_of[path]} ({'/'.join(str(c.shape[-1]) for c in enc.codes)} tokens, "
                   f"{enc.duration:.2f} s)")
    return _finish(failed, len(inputs), folder)


def _load_checked(codec, path: Path):
    from training.codec import load_codes

    enc = load_codes(path)
    codec.check_encoded(enc, str(path))
    fingerprint = enc.model.get("fingerprint") if isinstance(enc.model, dict) else None
    if fingerprint and fingerprint != codec.identity()["fingerprint"]:
        print(f"warning: {path} was made by a model with different weights "
              f"({enc.model.get('source', '?')}); decoding anyway", file=sys.stderr)
    return enc


def cmd_decode(args: argparse.Namespace) -> int:
    from training.audio import save_audio
    from training.codec import CodecError

    inputs, outputs, folder = _plan(args, (".npz",), ".wav")
    codec = _codec(args)
    failed = 0
    for first in range(0, len(inputs), codec.batch_size):
        batch = []
        for path, out in zip(inputs[first:first + codec.batch_size], outputs[first:first + codec.batch_size]):
            try:
                batch.append((path, out, _load_checked(codec, path)))
            except CodecError as e:
                if not folder:
                    raise
                _warn(f"skipped {e}")
                failed += 1
        if not batch:
            continue
        for (path, out, _), (audio, rate, _) in zip(batch, codec.decode_encoded([e for _, _, e in batch], args.keep_rate)):
            save_audio(out, audio, rate)
            _say(args, f"wrote {out} ({audio.shape[-1]} samples at {rate} Hz)")
    return _finish(failed, len(inputs), folder)


def cmd_export(args: argparse.Namespace) -> int:
    from training.hub import export_snac, load_generator

    if args.format == "snac":
        for flag, value in (("--noise", args.noise), ("--check", args.check)):
            if value is not None:
                raise UsageError(f"{flag} applies to --format onnx or pt2 (graphs), not to a SNAC directory")
        model, cfg = load_generator(args.checkpoint, device="cpu")
        out = export_snac(model, cfg, args.output, overwrite=args.overwrite)
        _say(args, f"exported {args.checkpoint} to {out} (load with snac.SNAC.from_pretrained({str(out)!r}))")
        return 0
    return _export_graphs(args)


def _export_graphs(args: argparse.Namespace) -> int:
    from training.audio import decode_audio
    from training.codec.export import check_parity, export_graphs
    from training.hub import load_generator

    noise = args.noise or "input"
    if not args.tolerance >= 0:
        raise UsageError(f"--tolerance must be a non-negative number, got {args.tolerance}")
    check_writable(Path(args.output), "--output-folder")
    model, cfg = load_generator(args.checkpoint, device="cpu")
    audio = None
    if args.check:
        # Read before the slow export, so a bad path fails at once.
        audio = decode_audio(args.check, cfg.sampling_rate)[0][0]
    paths = export_graphs(model, cfg, args.output, args.format, noise, overwrite=args.overwrite)
    _say(args, f"wrote {paths['encoder']}, {paths['decoder']} and {paths['meta']} (noise: {noise})")
    if audio is None:
        return 0
    r = check_parity(model, cfg, args.output, audio, args.format, noise, args.noise_seed)
    ok = r["codes_identical"] and r["decoder_max_abs_error"] <= args.tolerance
    _say(args, f"parity on {args.check} ({r['samples'] / cfg.sampling_rate:.2f} s, {args.format}, noise {noise}): "
               f"codes {'identical' if r['codes_identical'] else 'DIFFER'} ({r['codes_differing']} of "
               f"{r['codes_total']} differ), decoder max abs error {r['decoder_max_abs_error']:.3g} "
               f"(tolerance {args.tolerance:g}): {'ok' if ok else 'FAILED'}")
    if not ok:
        _warn(f"the exported {args.format} graphs do not match the PyTorch model (see the line above)")
    return 0 if ok else 1


HANDLERS = {"roundtrip": cmd_roundtrip, "encode": cmd_encode, "decode": cmd_decode, "export": cmd_export}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    # The documented short form (no command) is a round trip.
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["roundtrip"] + argv
    args = build_parser().parse_args(argv)
    if args.command is None:
        raise UsageError("no command given; use roundtrip, encode, decode or export (see inference.py --help)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    from training.cli import loaded_types
    from training.config import ConfigError

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return HANDLERS[args.command](args)
    except (UsageError, ConfigError) + loaded_types("training.codec.files:CodecError", "training.hub:ModelLoadError",
                                                    "training.audio:AudioReadError") as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        _warn(msg)
        return 2
    except OSError as e:  # permissions, a full disk, a missing folder: one line, never a traceback
        from training.cli import os_error_exit_code, os_error_message

        _warn(os_error_message(e))
        return os_error_exit_code(e)
    except KeyboardInterrupt:
        _warn("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
