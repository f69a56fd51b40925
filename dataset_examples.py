"""Runnable dataset configuration examples, one per source type.

    python dataset_examples.py                 # all offline examples on ljspeech-mini
    python dataset_examples.py --list          # names of all examples
    python dataset_examples.py folder manifest # chosen examples
    python dataset_examples.py --hub librispeech_streaming   # needs network (and hub access)

Offline examples use the LJ Speech-layout test corpus (``--audio-dir``, default
``tests/data/ljspeech-mini``) and write temporary files under ``--work-dir``. Each example
returns the first batch it loaded so tests can check it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict

from training.config import create_training_config
from training.dataset import AudioDataset, CombinedAudioDataset, DatasetError, build_dataloaders, collate_audio

DEFAULT_AUDIO = Path(__file__).resolve().parent / "tests" / "data" / "ljspeech-mini"
SAMPLE_RATE = 24000


def _first_batch(cfg) -> Dict:
    loader, val = build_dataloaders(cfg)
    batch = next(loader)
    loader.close()
    print(f"  batch audio {tuple(batch['audio'].shape)}, ids {batch['id'][:3]}..., {len(val)} validation batch(es)")
    return batch


def _cfg(**overrides):
    """A small CPU-friendly config (tiny model preset, 4 crops per batch, no worker processes)."""
    base = {"data.batch_size": 4, "data.num_workers": 0, "data.val_items": 4}
    return create_training_config(preset="tiny", overrides={**base, **overrides})


# ----------------------------------------------------------------------------- offline


def ljspeech_folder(audio_dir: Path, work: Path) -> Dict:
    """An LJ Speech folder (metadata.csv + wavs/), with the normalized transcript as text."""
    return _first_batch(_cfg(**{"data.dataset_path": str(audio_dir), "data.text_column": "normalized_text"}))


def folder(audio_dir: Path, work: Path) -> Dict:
    """A plain tree of audio files (any mix of wav/flac/mp3/ogg/opus/m4a); ids are relative paths."""
    return _first_batch(_cfg(**{"data.dataset_path": str(audio_dir / "wavs")}))


def manifest(audio_dir: Path, work: Path) -> Dict:
    """A JSONL manifest: one {"path": ..., "text": ...} per line, paths relative to the manifest."""
    lines = []
    for line in (audio_dir / "metadata.csv").read_text(encoding="utf-8").splitlines()[:12]:
        ident, _, text = line.split("|")
        path = next((audio_dir / "wavs").glob(f"{ident}.*"))
        lines.append(json.dumps({"path": os.path.relpath(path, work), "text": text}))
    (work / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return _first_batch(_cfg(**{"data.dataset_path": str(work / "train.jsonl"), "data.text_column": "text"}))


def prepared_registry(audio_dir: Path, work: Path) -> Dict:
    """Scan once with `python -m training.dataset prepare`, then train by registry name."""
    from training.dataset import prepare_dataset

    os.environ.setdefault("SNAC_DATA_REGISTRY", str(work / "registry"))
    prepare_dataset(audio_dir, "ljspeech_mini", work / "manifests", val_fraction=0.1)
    return _first_batch(_cfg(**{"data.dataset": "ljspeech_mini"}))


def hf_dataset_object(audio_dir: Path, work: Path) -> Dict:
    """A datasets.Dataset built in memory (any audio column form) passed straight to AudioDataset."""
    import datasets as hf

    paths = sorted(str(p) for p in (audio_dir / "wavs").glob("*.flac"))
    table = hf.Dataset.from_dict({"audio": paths, "speaker": ["LJ"] * len(paths)}).cast_column("audio", hf.Audio())
    ds = AudioDataset(table, SAMPLE_RATE, 20480, speaker_column="speaker")
    batch = collate_audio([ds[i] for i in range(4)])
    print(f"  batch audio {tuple(batch['audio'].shape)}, speakers {batch['speaker']}")
    return batch


def save_to_disk(audio_dir: Path, work: Path) -> Dict:
    """A dataset written with Dataset.save_to_disk, read back as a stream with a shuffle buffer."""
    import datasets as hf

    paths = sorted(str(p) for p in (audio_dir / "wavs").glob("*.flac"))
    hf.Dataset.from_dict({"audio": paths}).cast_column("audio", hf.Audio()).save_to_disk(str(work / "saved"))
    return _first_batch(_cfg(**{"data.dataset_path": str(work / "saved"), "data.streaming": True,
                                "data.shuffle_buffer": 8}))


def audiofolder(audio_dir: Path, work: Path) -> Dict:
    """A Hugging Face audiofolder: audio files + metadata.csv with a file_name column."""
    root = work / "audiofolder"
    root.mkdir(exist_ok=True)
    with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription"])
        for line in (audio_dir / "metadata.csv").read_text(encoding="utf-8").splitlines()[:10]:
            ident, _, text = line.split("|")
            src = next((audio_dir / "wavs").glob(f"{ident}.*"))
            (root / src.name).write_bytes(src.read_bytes())
            writer.writerow([src.name, text])
    return _first_batch(_cfg(**{"data.dataset_path": str(root), "data.text_column": "transcription"}))


def combined(audio_dir: Path, work: Path) -> Dict:
    """Two sources mixed 3:1 (here the FLAC and the MP3/WAV parts of the corpus)."""
    flac = AudioDataset(sorted((audio_dir / "wavs").glob("*.flac")), SAMPLE_RATE, 20480)
    other = AudioDataset(sorted(p for p in (audio_dir / "wavs").iterdir() if p.suffix != ".flac"), SAMPLE_RATE, 20480)
    mix = CombinedAudioDataset([flac, other], weights=[3.0, 1.0])
    batch = collate_audio([mix[(i, 0)] for i in range(8)])
    print(f"  batch audio {tuple(batch['audio'].shape)}, ids {batch['id']}")
    return batch


OFFLINE: Dict[str, Callable[[Path, Path], Dict]] = {
    "ljspeech_folder": ljspeech_folder, "folder": folder, "manifest": manifest,
    "prepared_registry": prepared_registry, "hf_dataset_object": hf_dataset_object,
    "save_to_disk": save_to_disk, "audiofolder": audiofolder, "combined": combined,
}

# ----------------------------------------------------------------------------- hub (network)


def hub_preset(name: str) -> Dict:
    """A DATASET_CONFIGS preset end to end (downloads or streams from the Hugging Face hub)."""
    cfg = create_training_config(preset="24khz", dataset=name,
                                 overrides={"data.batch_size": 4, "data.num_workers": 2, "data.val_items": 8})
    return _first_batch(cfg)


HUB = {
    "ljspeech": lambda: hub_preset("ljspeech"),
    "librispeech_streaming": lambda: hub_preset("librispeech"),
    "vctk": lambda: hub_preset("vctk"),
    "common_voice_streaming": lambda: hub_preset("common_voice"),  # parquet copy of Common Voice 17.0
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="offline examples to run (default: all)")
    parser.add_argument("--audio-dir", default=str(DEFAULT_AUDIO), help="LJ Speech-layout folder")
    parser.add_argument("--work-dir", default=None, help="folder for files the examples write (default: temp)")
    parser.add_argument("--hub", nargs="+", default=[], choices=sorted(HUB), help="hub examples (need network)")
    parser.add_argument("--list", action="store_true", help="list the examples and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("offline:", " ".join(OFFLINE), "\nhub:", " ".join(HUB))
        return 0
    unknown = [n for n in args.names if n not in OFFLINE]
    if unknown:
        print(f"error: unknown example(s) {unknown}; choose from {sorted(OFFLINE)}", file=sys.stderr)
        return 2
    audio_dir = Path(args.audio_dir)
    if not (audio_dir / "metadata.csv").is_file():
        print(f"error: {audio_dir} is not an LJ Speech-layout folder (pass --audio-dir)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            for name in args.names or (list(OFFLINE) if not args.hub else []):
                print(f"{name}: {OFFLINE[name].__doc__.strip()}")
                OFFLINE[name](audio_dir, work)
            for name in args.hub:
                print(f"hub {name}")
                HUB[name]()
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
