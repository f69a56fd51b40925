"""training.dataset: sources, bad data, HF value forms, sharding, resume, presets, prepare."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

import datasets as hf
from test_audio import BAD_NAMES, GOOD_SPECS, expected_mono, sine, write_mixed_folder
from training.audio import decode_audio
from training.config import DATASET_CONFIGS, create_training_config
from training.dataset import (
    AudioDataset, CombinedAudioDataset, DatasetError, EpochBatchSampler, InfiniteLoader,
    StreamingAudioDataset, build_dataloaders, collate_audio, load_registry, read_manifest,
)
from training.dataset.prepare import main as _cli

RATE = 24000


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    return write_mixed_folder(tmp_path_factory.mktemp("mixed"))


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SNAC_DATA_REGISTRY", str(tmp_path / "reg"))
    return tmp_path / "reg"


def tone_folder(root: Path, n: int, seconds: float = 0.3) -> Path:
    """n small FLAC files with distinct tones (fast to decode)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(root / f"f{i:03d}.flac", sine(16000, seconds, 100.0 + 20 * i), 16000)
    return root


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def test_ljspeech_folder(ljspeech_dir):
    ds = AudioDataset(ljspeech_dir, RATE, 12 * RATE, text_column="normalized_text", random_crop=False)
    assert len(ds) == 32
    suffixes = {Path(ds.records.row(i)["path"]).suffix for i in range(32)}
    assert suffixes == {".flac", ".mp3", ".wav"}
    meta = [line.split("|") for line in (ljspeech_dir / "metadata.csv").read_text().splitlines()]
    for i in (0, 5, 24, 27, 28, 31):  # FLAC, FLAC, MP3, MP3, WAV, WAV
        item = ds[i]
        assert item["audio"].shape == (1, 12 * RATE) and item["audio"].dtype == torch.float32
        assert item["id"] == meta[i][0] and item["text"] == meta[i][2]
        # Every clip is shorter than 12 s: `length` is its duration at 24 kHz, the rest is padding.
        info = sf.info(ds.records.row(i)["path"])
        assert abs(item["length"] - info.frames * RATE / info.samplerate) < 0.005 * RATE
        assert float(item["audio"][0, item["length"]:].abs().max()) == 0.0
        assert float(item["audio"][0, : item["length"]].abs().max()) > 0.05


def test_random_crops_deterministic_by_seed_epoch_index(ljspeech_dir):
    ds = AudioDataset(ljspeech_dir, RATE, 19456, seed=3)
    a, b, c = ds[(4, 0)], ds[(4, 0)], ds[(4, 1)]
    assert a["audio"].shape == (1, 19456) and a["length"] == 19456
    torch.testing.assert_close(a["audio"], b["audio"])
    assert not torch.equal(a["audio"], c["audio"])
    # The crop starts at the first seeded draw (speech is not silent) and is the resampled
    # stretch of the file there; away from the edges it matches the whole-file resample.
    path = ds.records.row(4)["path"]
    total, need = sf.info(path).frames, math.ceil(19456 * 22050 / RATE) + 2
    start = int(np.random.default_rng([3, 0, 4]).integers(0, total - need + 1))
    part, _ = decode_audio(path, RATE, start=start, num_frames=need)
    torch.testing.assert_close(a["audio"], part[:, :19456])
    full, _ = decode_audio(path, RATE)
    offset = round(start * RATE / 22050)
    diff = (full[0, offset + 500:offset + 18000] - a["audio"][0, 500:18000]).abs().max()
    assert float(diff) < 0.05


def test_mixed_folder_good_and_bad(mixed_dir):
    ds = AudioDataset(mixed_dir, RATE, 2 * RATE, random_crop=False)
    assert len(ds) == len(GOOD_SPECS) + len(BAD_NAMES)
    rows = [ds.records.row(i) for i in range(len(ds))]
    skipped = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, row in enumerate(rows):
            item = ds[i]  # never raises: a bad row is replaced by a good one
            name = Path(row["path"]).name
            skipped += item["skipped"]
            if name in dict((s[0], s) for s in GOOD_SPECS):
                assert item["id"] == Path(name).stem
                ref = expected_mono(name, RATE)
                assert item["length"] == len(ref)
                tol = 0.02 if "mono8" in name else 0.002
                np.testing.assert_allclose(item["audio"][0, : len(ref)].numpy(), ref, atol=tol)
            else:
                assert item["skipped"] and item["skipped"][0].startswith(Path(name).stem)
                assert item["id"] != Path(name).stem
    text = " ".join(skipped)
    for name in BAD_NAMES:
        assert name.split(".")[0] in text
    assert "empty" in text and "NaN" in text
    assert any("skipping unreadable audio" in str(w.message) and "corrupt.wav" in str(w.message) for w in caught)


def test_hf_value_forms_match_folder(mixed_dir, tmp_path):
    names = [s[0] for s in GOOD_SPECS]
    paths = [str(mixed_dir / n) for n in names]
    folder = AudioDataset(paths, RATE, RATE, random_crop=False)
    ref = [folder[i]["audio"] for i in range(len(names))]
    arrays = [sf.read(p, dtype="float32")[0] for p in paths]
    arrays = [a.mean(axis=1) if a.ndim == 2 else a for a in arrays]
    rates = [sf.info(p).samplerate for p in paths]
    ids = [Path(n).stem for n in names]
    decoded = hf.Dataset.from_dict({"audio": paths, "id": ids}).cast_column("audio", hf.Audio())
    forms = {
        "decoder": decoded,
        "bytes": hf.Dataset.from_dict({"audio": [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in paths],
                                       "id": ids}).cast_column("audio", hf.Audio(decode=False)),
        "array": hf.Dataset.from_dict({"audio": [{"array": a, "sampling_rate": r} for a, r in zip(arrays, rates)],
                                       "id": ids}),
    }
    decoded.save_to_disk(str(tmp_path / "saved"))
    forms["save_to_disk"] = str(tmp_path / "saved")
    af = tmp_path / "af"
    af.mkdir()
    for p in paths:
        (af / Path(p).name).write_bytes(Path(p).read_bytes())
    (af / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{n},cap {i}\n" for i, n in enumerate(names)))
    forms["audiofolder"] = str(af)
    for form, source in forms.items():
        ds = AudioDataset(source, RATE, RATE, random_crop=False)
        assert len(ds) == len(names), form
        for i in range(len(names)):
            item = ds[i]
            assert item["id"] == ids[i], form
            torch.testing.assert_close(item["audio"], ref[i], atol=1e-6, rtol=0, msg=form)
    # A datasets>=4 AudioDecoder value itself decodes to the same tensor.
    torch.testing.assert_close(decode_audio(decoded[0]["audio"], RATE)[0][:, :RATE], ref[0][:, :RATE], atol=1e-6, rtol=0)
    ds = AudioDataset(forms["audiofolder"], RATE, RATE, text_column="caption")
    assert ds[2]["text"] == "cap 2"


def test_missing_columns_and_paths_are_clear_errors(tmp_path, mixed_dir):
    with pytest.raises(DatasetError, match="not found"):
        AudioDataset(str(tmp_path / "nope" / "x"), RATE, RATE)
    with pytest.raises(DatasetError, match="no audio files"):
        AudioDataset(str(tmp_path), RATE, RATE)
    with pytest.raises(DatasetError, match=r"column\(s\) \['sentence'\] not found"):
        AudioDataset(mixed_dir, RATE, RATE, text_column="sentence")
    cfg = create_training_config(preset="tiny")
    with pytest.raises(DatasetError, match="no training data"):
        build_dataloaders(cfg)
    cfg = create_training_config(preset="tiny", overrides={"data.dataset": "never_prepared"})
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataloaders(cfg)


def test_manifest_formats(tmp_path):
    root = tone_folder(tmp_path / "audio", 3)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": f"audio/f{i:03d}.flac", "text": f"t{i}"}) + "\n"
                                              for i in range(3)))
    (tmp_path / "m.csv").write_text("path,text\n" + "".join(f"{root}/f{i:03d}.flac,t{i}\n" for i in range(3)))
    (tmp_path / "m.txt").write_text("".join(f"audio/f{i:03d}.flac\n" for i in range(3)))
    for m in ("m.jsonl", "m.csv", "m.txt"):
        ds = AudioDataset(tmp_path / m, RATE, 4096, text_column=None if m == "m.txt" else "text")
        assert [ds[i]["id"] for i in range(3)] == ["f000", "f001", "f002"]
        if m != "m.txt":
            assert ds[1]["text"] == "t1"
    (tmp_path / "bad.csv").write_text("path,text\na.wav,one, two\n")
    with pytest.raises(DatasetError, match="bad.csv:2: more fields"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.wav"}\n{oops\n')
    with pytest.raises(DatasetError, match="bad.jsonl:2"):
        read_manifest(tmp_path / "bad.jsonl")


# --------------------------------------------------------------------------------------
# Processing
# --------------------------------------------------------------------------------------


def test_silence_rejection_and_loudness(tmp_path):
    x = np.zeros(16000 * 4, dtype=np.float32)
    x[-16000:] = 0.3 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)  # last second only
    sf.write(tmp_path / "quiet.wav", x, 16000)
    seg = RATE // 2

    def loud_share(retries):
        ds = AudioDataset([tmp_path / "quiet.wav"], RATE, seg, max_silence_retries=retries, silence_db=-40.0)
        return np.mean([float(ds[(0, e)]["audio"].abs().max()) > 0.1 for e in range(40)])

    assert loud_share(0) < 0.5 < 0.9 < loud_share(20)
    ds = AudioDataset([tmp_path / "quiet.wav"], RATE, seg, loudness_db=-20.0, max_silence_retries=20, silence_db=-40.0)
    a = ds[(0, 1)]["audio"]
    assert abs(10 * math.log10(float(a.pow(2).mean())) + 20.0) < 0.5


def test_collate_pads_and_lists():
    items = [{"audio": torch.ones(1, 5), "length": 5, "id": "a", "text": "x", "skipped": ["z: bad"]},
             {"audio": torch.ones(1, 3), "length": 3, "id": "b", "text": "y"}]
    b = collate_audio(items)
    assert b["audio"].shape == (2, 1, 5) and b["audio"][1, 0, 3:].abs().sum() == 0
    assert b["length"].tolist() == [5, 3] and b["length"].dtype == torch.long
    assert b["id"] == ["a", "b"] and b["text"] == ["x", "y"] and b["skipped"] == ["z: bad"]
    with pytest.raises(DatasetError):
        collate_audio([])


def test_combined_weights(tmp_path):
    a = AudioDataset(tone_folder(tmp_path / "a", 4), RATE, 2048)
    b = AudioDataset(tone_folder(tmp_path / "b", 4), RATE, 2048)
    only_b = CombinedAudioDataset([a, b], [0.0, 1.0])
    assert {only_b.choose(p, 0)[0] for p in range(50)} == {1}
    mix = CombinedAudioDataset([a, b], [3.0, 1.0], seed=1)
    picks = [mix.choose(p, e)[0] for e in range(5) for p in range(len(mix))]
    assert 0.6 < picks.count(0) / len(picks) < 0.9
    item = mix[(3, 2)]
    assert item["source"] == mix.choose(3, 2)[0] and item["audio"].shape == (1, 2048)
    with pytest.raises(DatasetError):
        CombinedAudioDataset([a, b], [1.0])


# --------------------------------------------------------------------------------------
# Sharding and resume
# --------------------------------------------------------------------------------------


def test_two_ranks_two_workers_map_style(tmp_path):
    ds = AudioDataset(tone_folder(tmp_path / "t", 16), RATE, 1024)
    seen = []
    for rank in range(2):
        sampler = EpochBatchSampler(len(ds), 2, rank=rank, world_size=2, seed=5)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=collate_audio)
        seen.append([i for b in loader for i in b["id"]])
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"f{i:03d}" for i in range(16)]


@pytest.mark.parametrize("kind", ["hf_stream", "file_stream"])
def test_two_ranks_two_workers_streaming(tmp_path, kind):
    root = tone_folder(tmp_path / "t", 16)
    paths = sorted(str(p) for p in root.glob("*.flac"))
    seen = []
    for rank in range(2):
        if kind == "hf_stream":
            src = hf.Dataset.from_dict({"audio": paths}).cast_column("audio", hf.Audio()).to_iterable_dataset(num_shards=4)
        else:
            src = root
        ds = AudioDataset(src, RATE, 1024, streaming=True, shuffle_buffer=4, rank=rank, world_size=2)
        assert isinstance(ds, StreamingAudioDataset)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_audio)
        seen.append([i for b in loader for i in b["id"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"f{i:03d}" for i in range(16)]


def _cfg(source, **over):
    overrides = {"data.num_workers": 0, "data.val_items": 2, "data.segment_seconds": 0.1,
                 "data.val_segment_seconds": 0.1, **over}
    return create_training_config(dataset_path=str(source), batch_size=3, preset="tiny", overrides=overrides)


@pytest.mark.parametrize("workers,streaming", [(0, False), (2, False), (0, True)])
def test_resume_continues_exact_position(tmp_path, workers, streaming):
    root = tone_folder(tmp_path / "t", 14)
    cfg = _cfg(root, **{"data.num_workers": workers, "data.streaming": streaming, "data.shuffle_buffer": 4})
    loader, val = build_dataloaders(cfg)
    assert len(val) == 1 and val[0]["audio"].shape == (2, 1, cfg.val_segment_length())
    batches = [next(loader) for _ in range(7)]  # 12 train items / 3 = 4 batches per epoch
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches"] == 3
    assert all(b["audio"].shape == (3, 1, cfg.segment_length()) for b in batches)
    epoch0 = [i for b in batches[:4] for i in b["id"]]
    assert len(set(epoch0)) == 12 and not set(epoch0) & set(val[0]["id"])
    for cut in (2, 5):
        fresh, _ = build_dataloaders(cfg)
        state = dict(epoch=cut // 4, batches=cut % 4, seed=cfg.data.seed, rank=0, world_size=1)
        fresh.load_state_dict(state)
        for k in range(cut, 7):
            b = next(fresh)
            assert b["id"] == batches[k]["id"], (cut, k)
            torch.testing.assert_close(b["audio"], batches[k]["audio"])
        fresh.close()
    loader.close()


def test_loader_ranks_and_seeds_differ(tmp_path):
    root = tone_folder(tmp_path / "t", 14)
    r0, _ = build_dataloaders(_cfg(root), rank=0, world_size=2)
    r1, _ = build_dataloaders(_cfg(root), rank=1, world_size=2)
    ids0 = [i for _ in range(2) for i in next(r0)["id"]]
    ids1 = [i for _ in range(2) for i in next(r1)["id"]]
    assert not set(ids0) & set(ids1)
    other, _ = build_dataloaders(_cfg(root, **{"data.seed": 9}))
    first, _ = build_dataloaders(_cfg(root))
    assert next(other)["id"] != next(first)["id"]
    with pytest.raises(DatasetError, match="rank"):
        build_dataloaders(_cfg(root), rank=2, world_size=2)


def test_mostly_broken_corpus_raises_instead_of_looping(tmp_path):
    root = tone_folder(tmp_path / "t", 2)
    for i in range(10):
        (root / f"bad{i}.wav").write_text("not audio")
    loader, _ = build_dataloaders(_cfg(root, **{"data.val_items": 0}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match="failed"):
            for _ in range(50):
                next(loader)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    for i in range(4):
        (only_bad / f"x{i}.flac").write_bytes(b"")
    loader, _ = build_dataloaders(_cfg(only_bad, **{"data.val_items": 0}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError):
            next(loader)


# --------------------------------------------------------------------------------------
# Presets (offline: local datasets with each preset's column names)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(DATASET_CONFIGS))
def test_preset_column_mapping(tmp_path, preset):
    fields = DATASET_CONFIGS[preset]
    root = tone_folder(tmp_path / "t", 6)
    paths = sorted(str(p) for p in root.glob("*.flac"))
    cols = {fields["audio_column"]: paths}
    if fields["text_column"]:
        cols[fields["text_column"]] = [f"words {i}" for i in range(6)]
    if fields["speaker_column"]:
        cols[fields["speaker_column"]] = [f"spk{i % 2}" for i in range(6)]
    split = hf.Dataset.from_dict(cols).cast_column(fields["audio_column"], hf.Audio())
    splits = {fields["split"]: split}
    if fields["val_split"]:
        splits[fields["val_split"]] = split.select(range(2))
    hf.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    cfg = create_training_config(dataset=preset, preset="tiny", batch_size=2,
                                 overrides={"data.num_workers": 0, "data.val_items": 2,
                                            "data.dataset_path": str(tmp_path / "saved"), "data.shuffle_buffer": 4})
    assert cfg.data.streaming == fields["streaming"]
    loader, val = build_dataloaders(cfg)
    batch = next(loader)
    assert batch["audio"].shape == (2, 1, cfg.segment_length())
    for key, col in (("text", "text_column"), ("speaker", "speaker_column")):
        if fields[col]:
            idx = [paths.index(next(p for p in paths if Path(p).stem == i)) for i in batch["id"]]
            expected = [cols[fields[col]][j] for j in idx]
            assert batch[key] == expected
        else:
            assert key not in batch
    # A validation split gives val_items items; otherwise a fifth of these 6 rows is held out.
    assert sum(len(b["id"]) for b in val) == (2 if fields["val_split"] else 1)


# --------------------------------------------------------------------------------------
# Preparation + registry
# --------------------------------------------------------------------------------------


def test_prepare_ljspeech_and_load_by_name(ljspeech_dir, tmp_path, registry, capsys):
    out = tmp_path / "manifests"
    rc = _cli(["prepare", str(ljspeech_dir), "--name", "ljmini", "--out", str(out), "--val-fraction", "0.1",
               "--quiet"])
    assert rc == 0 and "registered 'ljmini'" in capsys.readouterr().out
    entry = load_registry()["ljmini"]
    assert entry["counts"] == {"train": 29, "validation": 3, "test": 0} and entry["dropped"] == 0
    rows = read_manifest(out / "train.jsonl") + read_manifest(out / "validation.jsonl")
    assert sorted(r["id"] for r in rows) == [f"LJ001-{i:04d}" for i in range(1, 33)]
    for r in rows:
        info = sf.info(r["path"])
        if not r["path"].endswith(".mp3"):  # MP3 lengths are estimates in either tool
            assert r["num_frames"] == info.frames
        assert abs(r["duration"] - info.frames / info.samplerate) < 0.05
        assert r["text"] and r["sample_rate"] == 22050
    # The registry gives the same items (audio, text) as the folder itself.
    kw = dict(text_column="normalized_text", random_crop=False)
    by_name = AudioDataset("ljmini", RATE, 19456, split="train", **kw)
    folder = AudioDataset(ljspeech_dir, RATE, 19456, **kw)
    folder_index = {folder.records.row(i)["id"]: i for i in range(len(folder))}
    for i in (0, 10, 22, 28):  # FLAC, FLAC, MP3/WAV rows
        a = by_name[i]
        b = folder[folder_index[a["id"]]]
        assert a["text"] == b["text"] and a["length"] == b["length"]
        torch.testing.assert_close(a["audio"], b["audio"])
    cfg = create_training_config(preset="tiny", batch_size=4, overrides={"data.dataset": "ljmini", "data.num_workers": 0})
    loader, val = build_dataloaders(cfg)
    assert sorted(i for b in val for i in b["id"]) == sorted(r["id"] for r in read_manifest(out / "validation.jsonl"))
    assert next(loader)["audio"].shape == (4, 1, cfg.segment_length())


def test_prepare_drops_bad_files_and_cli_errors(mixed_dir, tmp_path, registry, capsys):
    args = ["prepare", str(mixed_dir), "--name", "mixed", "--quiet", "--min-seconds", "0.55"]
    assert _cli(args + ["--out", str(tmp_path / "m")]) == 0
    dropped = (tmp_path / "m" / "dropped.tsv").read_text()
    for name in ("corrupt.wav", "empty.wav", "notes.wav"):  # visible from the header
        assert name in dropped
    assert "truncated.flac" not in dropped  # its header is intact
    assert "mono8_48k.wav\tshorter than 0.55 s" in dropped
    assert _cli(args + ["--out", str(tmp_path / "v"), "--verify"]) == 0
    dropped = (tmp_path / "v" / "dropped.tsv").read_text()
    assert "truncated.flac" in dropped and "NaN" in dropped
    entry = load_registry()["mixed"]
    assert sum(entry["counts"].values()) == len(GOOD_SPECS) - 1
    assert _cli(["prepare", str(tmp_path / "missing"), "--name", "x", "--quiet"]) == 2
    assert "error: prepare: source not found" in capsys.readouterr().err
