"""Data-loading throughput: crops per CPU-second of one process (= per DataLoader worker, per core).

Compares, per input format (FLAC / MP3 / WAV, 22.05 kHz LJ Speech clips -> 24 kHz crops of
``Config.segment_length()`` samples, i.e. 0.8 s rounded up to the model's pad unit):

- default: the path AudioDataset uses (header read, seek, decode only the crop, soxr resample),
- naive:   torchcodec decode of the whole file per item (resampled while decoding), then crop,

and, for a Hugging Face ``datasets.Dataset`` of the FLAC clips, the row-reading paths:

- default: ``Audio(decode=False)`` rows (``{"bytes", "path"}``) decoded by soundfile with seek,
- naive:   ``Audio()`` rows (torchcodec ``AudioDecoder`` objects), whole clip decoded.

Usage:
    python benchmarks/bench_data.py [--audio-dir DIR] [--seconds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import Config  # noqa: E402
from training.dataset import SegmentReader  # noqa: E402

TARGET_RATE = 24000


def rate_of(fn: Callable[[int], None], seconds: float) -> float:
    """Calls of ``fn(i)`` per CPU-second of this process over about ``seconds`` of CPU time.

    CPU time, not wall time: it is what one worker process costs a core, and it does not drop
    when other processes compete for the machine's cores.
    """
    fn(0)
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        fn(n)
        n += 1
    return n / (time.process_time() - start)


def default_crop(paths: List[str], seg: int) -> Callable[[int], None]:
    reader = SegmentReader(TARGET_RATE, seg)

    def run(i: int) -> None:
        audio, _ = reader(paths[i % len(paths)], np.random.default_rng(i))
        assert audio.shape[-1] == seg

    return run


def naive_crop(values: list, seg: int, make_decoder: Callable) -> Callable[[int], None]:
    def run(i: int) -> None:
        samples = make_decoder(values[i % len(values)]).get_all_samples().data.mean(0, keepdim=True)
        start = int(np.random.default_rng(i).integers(0, max(1, samples.shape[-1] - seg)))
        audio = samples[:, start:start + seg]
        assert audio.shape[-1] == seg

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio-dir", default=str(ROOT / "tests" / "data" / "ljspeech-mini"),
                        help="LJ Speech-layout folder with FLAC, MP3 and WAV clips")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per cell")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core, like one DataLoader worker
    from torchcodec.decoders import AudioDecoder

    wavs = Path(args.audio_dir) / "wavs"
    if not wavs.is_dir():
        print(f"error: {wavs} not found (pass --audio-dir)", file=sys.stderr)
        return 2
    seg = Config().segment_length()
    print(f"crops per CPU-second, one process: 22050 Hz source -> {TARGET_RATE} Hz, {seg} samples "
          f"({seg / TARGET_RATE:.3f} s) per crop, {args.seconds:.0f} s per cell")
    print(f"{'input':<22}{'default':>12}{'naive':>12}{'ratio':>8}")
    decode_whole = lambda src: AudioDecoder(src, sample_rate=TARGET_RATE, num_channels=1)  # noqa: E731
    for ext in ("flac", "mp3", "wav"):
        paths = sorted(str(p) for p in wavs.glob(f"*.{ext}"))
        if not paths:
            continue
        d = rate_of(default_crop(paths, seg), args.seconds)
        n = rate_of(naive_crop(paths, seg, decode_whole), args.seconds)
        print(f"{ext.upper() + ' file':<22}{d:>12.0f}{n:>12.0f}{d / n:>7.1f}x")
    paths = sorted(str(p) for p in wavs.glob("*.flac"))
    import datasets as hf

    table = hf.Dataset.from_dict({"audio": paths})
    raw = hf.Dataset.from_dict({"audio": [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in paths]}
                               ).cast_column("audio", hf.Audio(decode=False))
    decoded = table.cast_column("audio", hf.Audio(sampling_rate=TARGET_RATE))
    reader = SegmentReader(TARGET_RATE, seg)
    d = rate_of(lambda i: reader(raw[i % len(raw)]["audio"], np.random.default_rng(i)), args.seconds)
    n = rate_of(naive_crop(list(range(len(decoded))), seg, lambda j: decoded[j]["audio"]), args.seconds)
    print(f"{'FLAC HF Dataset row':<22}{d:>12.0f}{n:>12.0f}{d / n:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
