"""Dataset tokenizer: shard contents, token equality with per-clip SNAC.encode, SIGKILL + resume
exactly-once, job splitting with --num_shards, save_settings and one-line errors for bad input.

Real audio: ljspeech-mini with every clip cut to 0.05-0.3 s (same formats FLAC/MP3/WAV, same
metadata.csv) so that several end-to-end runs fit in the test budget on 2 CPU cores.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from training.audio import decode_audio
from training.config import model_preset
from training.model import build_generator
from training.hub import export_snac
from training.tokenize import flatten_order, main

ROOT = Path(__file__).resolve().parents[1]
CORRUPT = {"broken.wav", "empty.flac", "truncated.wav"}


# --------------------------------------------------------------------------------------
# Fixtures: model, data
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    return export_snac(build_generator(cfg), cfg, tmp_path_factory.mktemp("model") / "snac_tiny")


@pytest.fixture(scope="module")
def lj_short(ljspeech_dir, tmp_path_factory) -> Path:
    """ljspeech-mini layout (metadata.csv + wavs/) with each clip cut to 0.05-0.3 s, formats kept."""
    out = tmp_path_factory.mktemp("lj") / "ljspeech-short"
    (out / "wavs").mkdir(parents=True)
    shutil.copy(ljspeech_dir / "metadata.csv", out / "metadata.csv")
    rng = np.random.default_rng(0)
    for f in sorted((ljspeech_dir / "wavs").iterdir()):
        data, sr = sf.read(f, dtype="float32")
        sf.write(out / "wavs" / f.name, data[: int(sr * rng.uniform(0.05, 0.3))], sr)
    return out


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    """A folder without text: good clips (two rates, a sub-folder, stereo) and corrupt files."""
    root = tmp_path_factory.mktemp("plain") / "folder"
    (root / "sub").mkdir(parents=True)
    t = np.arange(8000, dtype=np.float32)
    sf.write(root / "a.wav", 0.3 * np.sin(t * 0.05), 16000)
    sf.write(root / "sub" / "b.flac", 0.2 * np.sin(t[:5000] * 0.11), 44100)
    sf.write(root / "c.wav", np.stack([0.1 * np.sin(t * 0.02), 0.1 * np.cos(t * 0.03)], 1), 24000)
    (root / "broken.wav").write_bytes(b"RIFF....WAVEfmt not really audio")
    (root / "empty.flac").write_bytes(b"")
    sf.write(root / "truncated.wav", 0.3 * np.sin(t), 16000)
    data = (root / "truncated.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[: len(data) // 3])  # header says more than there is
    return root


@pytest.fixture(scope="module")
def manifest(plain_dir, tmp_path_factory) -> Path:
    """A JSONL manifest with text and speaker columns pointing at the good plain clips."""
    path = tmp_path_factory.mktemp("manifest") / "list.jsonl"
    rows = [{"path": str(plain_dir / "a.wav"), "text": "first", "spk": "alice"},
            {"path": str(plain_dir / "sub" / "b.flac"), "text": "second", "spk": "bob"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mixed_dir(lj_short, plain_dir, tmp_path_factory) -> Path:
    """Short LJ clips with unreadable files first and last (sorted names): a run killed after
    its first shard has failures behind it and ahead of it."""
    root = tmp_path_factory.mktemp("mixed") / "mixed"
    root.mkdir()
    shutil.copy(plain_dir / "broken.wav", root / "a_broken.wav")
    shutil.copy(plain_dir / "empty.flac", root / "b_empty.flac")
    for f in sorted((lj_short / "wavs").iterdir()):
        shutil.copy(f, root / f"c_{f.name}")
    shutil.copy(plain_dir / "truncated.wav", root / "z_truncated.wav")
    return root


@pytest.fixture(scope="module")
def long_dir(ljspeech_dir, tmp_path_factory) -> Path:
    """One 31 s clip of real speech (LJ clips joined; 4 encoder windows of the default 10 s) and
    one short clip."""
    root = tmp_path_factory.mktemp("long") / "long"
    root.mkdir()
    pieces, rate = [], None
    for f in sorted((ljspeech_dir / "wavs").glob("*.flac")):
        data, rate = sf.read(f, dtype="float32")
        pieces.append(data)
        if sum(len(p) for p in pieces) > 31 * rate:
            break
    sf.write(root / "long.flac", np.concatenate(pieces)[: 31 * rate], rate)
    sf.write(root / "short.flac", pieces[0][: rate // 2], rate)
    return root


@pytest.fixture(scope="module")
def diverse_model(long_dir, tmp_path_factory) -> Path:
    """The tiny preset made code-diverse on the long clip (see tests/diverse_model.py), exported."""
    from diverse_model import whiten_quantizer_inputs

    torch.manual_seed(0)
    cfg = model_preset("tiny")
    model = build_generator(cfg).eval()
    audio, _ = decode_audio(long_dir / "long.flac", 24000)
    whiten_quantizer_inputs(model, audio[None])
    return export_snac(model, cfg, tmp_path_factory.mktemp("diverse") / "snac_tiny_diverse")


def _lj_texts(lj: Path) -> dict:
    return {line.split("|")[0]: line.rstrip("\n").split("|")[1] for line in open(lj / "metadata.csv", encoding="utf-8")}


def _inputs(lj_short: Path, plain_dir: Path) -> int:
    return len(list((lj_short / "wavs").iterdir())) + sum(1 for p in plain_dir.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "training.tokenize", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=180, **kw)


def _lines(out: Path) -> list:
    rows = []
    for shard in sorted(out.glob("tokens-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows


def _failed(out: Path) -> list:
    return [json.loads(line) for log in sorted(out.glob("failed*.jsonl")) for line in log.read_text().splitlines()]


def _assert_tokens_are_snac_encode(rows: list, paths: dict, model_dir: Path) -> list:
    """Every row's codes equal the reference snac package encoding its clip alone (CPU fp32).
    ``paths``: row id -> audio file. Returns the reference codes of all rows, level by level."""
    import snac

    model = snac.SNAC.from_pretrained(str(model_dir)).eval()
    per_level = [[], [], []]
    with torch.inference_mode():
        for row in rows:
            audio, _ = decode_audio(paths[row["id"]], 24000)
            ref = [c[0] for c in model.encode(audio[None])]
            assert row["token_lengths"] == [len(c) for c in ref], row["id"]
            assert [row[f"snac_layer_{i}"] for i in (1, 2, 3)] == [c.tolist() for c in ref], row["id"]
            for level, c in enumerate(ref):
                per_level[level].append(c)
    return [torch.cat(c) for c in per_level]


def _common(model: Path, out: Path) -> list:
    return ["--audio_codec", str(model), "--out_dir", str(out), "--no_progress"]


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_flatten_order_documented_layout():
    assert flatten_order((4, 2, 1)) == [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3)]
    order = flatten_order((8, 4, 2, 1))
    assert len(order) == 15 and order[:5] == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1)]
    assert sorted(order) == sorted({(lvl, o) for lvl, n in enumerate((1, 2, 4, 8)) for o in range(n)})


@pytest.mark.slow
def test_yaml_run_shards_text_constants_tokens_and_save(tiny_model, lj_short, plain_dir, manifest, tmp_path):
    """One YAML-configured run over LJ Speech + a text-less folder + a manifest: every input is a
    line or a failure, fields are right, tokens equal per-clip snac.SNAC.encode, save_to_disk works."""
    import datasets
    import snac

    out, saved = tmp_path / "shards", tmp_path / "saved"
    cfg = {
        "base_settings": {"audio_codec": str(tiny_model), "num_readers": 2, "qsize": 16, "OUT_DIR": str(out),
                          "gzip_level": 1, "buffer_size": 65536, "lines_per_file": 8, "load_dataset_num_proc": 1,
                          "batch_size": 4, "flatten": True, "progress": False},
        "save_settings": {"local": str(saved)},
        "hf_datasets": [
            {"name": str(lj_short), "split": "train", "text_column_name": "text",
             "add_constant": [{"key": "lang", "value": "en"}]},
            {"name": str(plain_dir), "text_column_name": None, "add_constant": [{"key": "kind", "value": 7}]},
            {"name": str(manifest), "speaker_column_name": "spk", "id_prefix": "man"},
        ],
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = _cli("--config", str(tmp_path / "cfg.yaml"))
    assert r.returncode == 0, r.stderr
    assert "clips encoded: 37" in r.stdout and "failed: 3" in r.stdout and "job complete" in r.stdout

    rows, failed = _lines(out), _failed(out)
    assert len(rows) + len(failed) == _inputs(lj_short, plain_dir) + 2
    assert len({r["id"] for r in rows} | {f["id"] for f in failed}) == len(rows) + len(failed)
    assert {Path(f["name"]).name for f in failed} == {Path(n).stem for n in CORRUPT}
    assert all(f["reason"] for f in failed)
    assert len(list(out.glob("tokens-*.jsonl.gz"))) == 5  # 37 lines, 8 per file

    texts = _lj_texts(lj_short)
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
        assert row["id"] == f"{row['source']}/{row['index']}"
    assert {r["name"]: r["text"] for r in by_source["ljspeech-short"]} == texts
    # Values a source does not set are the empty value of their type, never null (see the docs).
    assert all(r["lang"] == "en" and r["kind"] == 0 and r["speaker"] == "" for r in by_source["ljspeech-short"])
    assert all(r["text"] == "" and r["kind"] == 7 and r["lang"] == "" for r in by_source["folder"])
    assert {r["text"]: r["speaker"] for r in by_source["man"]} == {"first": "alice", "second": "bob"}

    # Tokens: exactly the codes of the reference snac package encoding each clip alone (CPU fp32).
    model = snac.SNAC.from_pretrained(str(tiny_model)).eval()
    paths = {**{f"ljspeech-short/{i}": lj_short / "wavs" / n for i, n in
                enumerate(sorted(p.name for p in (lj_short / "wavs").iterdir()))}}
    folder_files = sorted(p for p in plain_dir.rglob("*") if p.is_file())
    paths.update({f"folder/{i}": p for i, p in enumerate(folder_files)})
    paths.update({"man/0": plain_dir / "a.wav", "man/1": plain_dir / "sub" / "b.flac"})
    with torch.inference_mode():
        for row in rows:
            audio, _ = decode_audio(paths[row["id"]], 24000)
            ref = [c[0].tolist() for c in model.encode(audio[None])]
            assert row["num_layers"] == 3 and row["token_lengths"] == [len(c) for c in ref]
            assert [row[f"snac_layer_{i}"] for i in (1, 2, 3)] == ref, row["id"]
            assert abs(row["duration"] - audio.shape[-1] / 24000) < 1e-5
            l1, l2, l3 = ref
            flat = [t for i in range(len(l1)) for t in
                    (l1[i], l2[2 * i], l3[4 * i], l3[4 * i + 1], l2[2 * i + 1], l3[4 * i + 2], l3[4 * i + 3])]
            assert row["snac_tokens"] == flat

    ds = datasets.load_dataset("json", data_files=sorted(str(p) for p in out.glob("tokens-*.jsonl.gz")),
                               split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(rows) and "snac_layer_3" in ds.column_names
    assert datasets.load_from_disk(str(saved)).num_rows == len(rows)

    # The same command again: nothing left to do, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = _cli("--config", str(tmp_path / "cfg.yaml"))
    assert r.returncode == 0, r.stderr
    assert "rows pending at start: 0" in r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("tokens-*")} == \
           {k: v for k, v in before.items() if k.startswith("tokens-")}


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_exactly_once(diverse_model, mixed_dir, tmp_path):
    """Killed after its first shard, with failures logged behind it and one still ahead: the
    resumed run writes every input exactly once (line or failure) and the tokens equal snac's."""
    out = tmp_path / "shards"
    args = [*_common(diverse_model, out), "--dataset", str(mixed_dir),
            "--lines_per_file", "3", "--batch_size", "2", "--bucket_clips", "2", "--num_readers", "1", "--qsize", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "training.tokenize", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    def progressed() -> bool:  # a complete shard and a logged failure (file size: no half-line reads)
        return bool(list(out.glob("tokens-*.jsonl.gz"))) and any(p.stat().st_size for p in out.glob("failed*.jsonl"))

    while not progressed() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    files = sorted(p for p in mixed_dir.iterdir())
    assert proc.returncode == -signal.SIGKILL
    failed_at_kill = {f["name"] for f in _failed(out)}
    assert failed_at_kill and "z_truncated" not in failed_at_kill, "failures must lie before and after the kill"
    at_kill = len(_lines(out)) + len(_failed(out))
    assert 0 < at_kill < len(files), "the kill must land mid-run for this test to mean anything"

    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    rows, failed = _lines(out), _failed(out)
    ids = [x["id"] for x in rows] + [f["id"] for f in failed]
    assert len(ids) == len(set(ids)) == len(files)  # no duplicate, none missing
    assert sorted(f["name"] for f in failed) == ["a_broken", "b_empty", "z_truncated"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # interrupted writes cleaned up
    codes = _assert_tokens_are_snac_encode(rows, {f"mixed/{i}": f for i, f in enumerate(files)}, diverse_model)
    # The clips' quiet starts use 21 / 30 / 47 codes per level (a plain random tiny model: 2 to 6).
    assert all(len(torch.unique(c)) >= 16 for c in codes)


@pytest.mark.slow
def test_long_clip_windowed_tokens_equal_snac_encode(diverse_model, long_dir, tmp_path):
    """A 31 s clip is encoded in overlapping windows (with a short clip in the same run); its
    tokens equal snac.SNAC.encode on the whole clip."""
    out = tmp_path / "shards"
    r = _cli(*_common(diverse_model, out), "--dataset", str(long_dir), "--num_readers", "1", "--batch_size", "2")
    assert r.returncode == 0, r.stderr
    rows = _lines(out)
    assert sorted(row["name"] for row in rows) == ["long", "short"] and not _failed(out)
    assert max(row["duration"] for row in rows) > 30  # longer than three 10 s windows
    files = sorted(long_dir.iterdir())
    codes = _assert_tokens_are_snac_encode(rows, {f"long/{i}": f for i, f in enumerate(files)}, diverse_model)
    assert min(len(torch.unique(c)) for c in codes) >= 128  # code-diverse: a wrong window shows


@pytest.mark.slow
def test_num_shards_two_invocations_cover_the_input_once(tiny_model, plain_dir, manifest, tmp_path):
    out = tmp_path / "shards"
    base = [*_common(tiny_model, out), "--dataset", str(plain_dir), "--dataset", str(manifest),
            "--num_shards", "2", "--num_readers", "1", "--lines_per_file", "4"]
    for k in (0, 1):
        r = _cli(*base, "--shard_index", str(k))
        assert r.returncode == 0, r.stderr
        assert ("job complete" in r.stdout) == (k == 1)  # only the last invocation completes it
    ids = [x["id"] for x in _lines(out)] + [f["id"] for f in _failed(out)]
    assert len(ids) == len(set(ids)) == sum(1 for p in plain_dir.rglob("*") if p.is_file()) + 2
    for k in (0, 1):
        for shard in out.glob(f"tokens-0000{k}-of-00002-*.jsonl.gz"):
            with gzip.open(shard, "rt") as f:
                assert all(json.loads(line)["index"] % 2 == k for line in f)
        log = out / f"failed-0000{k}-of-00002.jsonl"
        assert all(json.loads(line)["index"] % 2 == k for line in log.read_text().splitlines())
    assert not (out / "failed.jsonl").exists()


def test_upload_offline_fails_cleanly_and_keeps_shards(tiny_model, manifest, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "shards"
    code = main([*_common(tiny_model, out), "--dataset", str(manifest), "--num_readers", "1",
                 "--hf_upload", "someone/some_dataset"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "upload to someone/some_dataset failed" in err[0]
    assert len(_lines(out)) == 2  # the encoded shards are kept


def test_bad_input_is_one_line_and_exit_2(tiny_model, manifest, tmp_path, capsys):
    out = tmp_path / "shards"
    ok = [*_common(tiny_model, out), "--dataset", str(manifest), "--num_readers", "1"]
    (tmp_path / "bad.yaml").write_text("base_settings:\n  audio_codec: x\n  nme_readers: 3\n")
    (tmp_path / "broken.yaml").write_text("base_settings: [unclosed\n")
    cases = [
        (["--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["--config", str(tmp_path / "bad.yaml")], "nme_readers"),
        (["--config", str(tmp_path / "broken.yaml")], "cannot parse"),
        (["--audio_codec", str(tmp_path / "nope"), "--dataset", str(manifest)], "model not found"),
        ([*ok, "--num_shards", "2", "--shard_index", "2"], "shard_index"),
        ([*ok[:-4], "--dataset", str(tmp_path / "no_such_folder")], "not found"),
        ([*ok, "--speaker_column_name", "nope"], "nope"),
        ([*ok, "--gzip_level", "12"], "gzip_level"),
        ([*ok, "--add_constant", "id=3"], "reserved"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)

    # A finished job, then a different job into the same OUT_DIR: refused, nothing touched.
    assert main(ok) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "lock" not in p.name}
    assert main([*ok, "--flatten"]) == 2
    assert "different job" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "lock" not in p.name} == before
    # save_settings.local must not overwrite an existing folder.
    (tmp_path / "taken").mkdir()
    assert main([*ok, "--save_local", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_example_config_parses_with_every_documented_key():
    from training.tokenize import load_settings_file, validate

    s = load_settings_file(str(ROOT / "examples" / "tokenize_config.yaml"))
    validate(s)
    assert (s.audio_codec, s.num_readers, s.qsize, s.OUT_DIR, s.gzip_level, s.buffer_size, s.lines_per_file,
            s.load_dataset_num_proc) == ("hubertsiuzdak/snac_24khz", 8, 100000, "shards", 1, 16777216, 50000, 20)
    assert (s.save_local, s.hf_upload) == ("train_dataset", "your_username/your_dataset")
    src = s.sources[0]
    assert (src.name, src.sub_name, src.revision, src.split, src.text_column_name, src.audio_column_name,
            src.speaker_column_name, src.constants()) == (
        "fixie-ai/common_voice_17_0", "en", "97913806d567d9cc09d7a02d5b0dc7352f2b71b4", "train", "sentence",
        "audio", None, {"lang": "en"})
