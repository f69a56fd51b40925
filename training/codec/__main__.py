"""`python -m training.codec agree MODEL_A MODEL_B --input PATH`: how many of model A's tokens model
B reproduces, per level (see :mod:`training.codec.agree`).

Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..cli import OneLineParser, fail, guard


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m training.codec", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    a = sub.add_parser("agree", help="code agreement of two models on audio or a token folder",
                       description="Per level, the fraction of model A's codes that model B assigns identically "
                       "(pooled over all clips; 100 %% = B tokenizes the input exactly as A). Both encode in "
                       "float32, each clip alone (snac.SNAC.encode's codes).")
    a.add_argument("model_a", metavar="MODEL_A", help="reference model: our checkpoint or run directory, a SNAC "
                   "directory or a hub id (e.g. hubertsiuzdak/snac_24khz); for a token folder, the model that made it")
    a.add_argument("model_b", metavar="MODEL_B", help="the model to compare (e.g. a fine-tune's <run_dir>/export)")
    a.add_argument("--input", "-i", required=True, metavar="PATH",
                   help="an audio file, a folder of audio files (recursive), or a tokenizer output folder "
                   "(python -m training.tokenize OUT_DIR: its tokens are model A's codes)")
    a.add_argument("--device", default=None, help="auto (default: cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    a.add_argument("--batch_size", type=int, default=None, metavar="N",
                   help="clips (windows) per forward pass (default 8 on GPU, 2 on CPU)")
    a.add_argument("--json", metavar="FILE", help="also write the result (per-level counts, fractions, clips "
                   "left out) as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .agree import code_agreement
    from .files import CodecError

    with guard():
        if args.batch_size is not None and args.batch_size < 1:
            fail(f"--batch_size must be at least 1, got {args.batch_size}")
        try:
            result = code_agreement(args.model_a, args.model_b, args.input, device=args.device,
                                    batch_size=args.batch_size)
        except CodecError as e:
            fail(str(e).splitlines()[0])
        what = "token folder" if result.kind == "tokens" else "audio"
        print(f"code agreement of {args.model_b} with {args.model_a} on {args.input} ({what}, {result.clips} clips):")
        print(result.table())
        for clip, reason in result.failed:
            print(f"left out {clip}: {reason}", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
