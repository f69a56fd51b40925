"""Hub dataset presets, offline: each preset's loading path runs against a local parquet repository
laid out like the hub repository at the preset's pinned revision (README ``configs:`` ->
``data_files``, parquet files with an ``Audio`` column and the preset's columns), through the real
``datasets.load_dataset``. Only the hub id -> folder step is local: a ``LocalHub`` serves each
(repo, revision) from a folder, and any other revision from a folder holding just the repository's
loading script, which is what the default branches of these repositories hold today.

Also: rows whose audio is a remote path (no bytes) are opened through ``datasets``' file layer with
the environment's token (a ``zip://member::archive`` URL takes the same fsspec path as
``hf://...`` and ``zip://...::https://...``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, List

import datasets
import pytest
import torch

from training.audio import decode_audio, normalize_loudness
from training.config import DATASET_CONFIGS, create_training_config
from training.dataset import AudioDataset, DatasetError, StreamingAudioDataset, build_dataloaders
from training.tokenize import SourceSpec, open_source, settings_from_dict

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_offline_test_token"
CLIPS = [f"LJ001-{i:04d}" for i in (1, 2, 3, 4, 25, 29)]  # FLAC, MP3 and WAV sources
EDGE = 512  # samples at a crop's end that depend on where the resampler's input stops

# The hub repositories at the pinned revisions (see training/config.py): config -> split -> the
# data_files pattern their README declares, and the columns their parquet files carry.
HUB_LAYOUTS: Dict[str, Dict[str, Any]] = {
    "ljspeech": {"script": "lj_speech.py", "splits": {"train": "main/train-*"},
                 "columns": ["id", "file", "text", "normalized_text"]},
    "common_voice": {"script": "common_voice_17_0.py",
                     "splits": {"train": "en/train-*", "validation": "en/validation-*", "test": "en/test-*"},
                     "columns": ["client_id", "path", "sentence", "locale"]},
    "librispeech": {"script": "librispeech_asr.py",
                    "splits": {"train.100": "clean/train.100-*", "train.360": "clean/train.360-*",
                               "validation": "clean/validation-*", "test": "clean/test-*"},
                    "columns": ["file", "text", "speaker_id", "chapter_id", "id"]},
    "vctk": {"script": "vctk.py", "splits": {"train": "main/train-*"},
             "columns": ["speaker_id", "file", "text", "text_id", "age", "gender", "accent"]},
}


INT_COLUMNS = {"speaker_id", "chapter_id"}


def _column_value(column: str, clip: str, row: int) -> Any:
    if column in INT_COLUMNS:
        return 100 + row % 2
    return clip if column == "id" else f"{column} of {clip}"


def _write_repo(folder: Path, preset: Dict[str, Any], layout: Dict[str, Any], ljspeech_dir: Path) -> None:
    """Parquet files + README ``configs:`` for one config, as the hub repository declares them."""
    config = preset["config_name"]
    files = {c: next((ljspeech_dir / "wavs").glob(f"{c}.*")) for c in CLIPS}
    yaml_splits = []
    for n, (split, pattern) in enumerate(layout["splits"].items()):
        chosen = CLIPS[n % 2::2] if split != "train" else CLIPS  # every split gets real, different clips
        rows = {"audio": [{"bytes": files[c].read_bytes(), "path": files[c].name} for c in chosen]}
        for column in layout["columns"]:
            rows[column] = [_column_value(column, c, i) for i, c in enumerate(chosen)]
        target = folder / (pattern.replace("*", "00000-of-00001") + ".parquet")
        target.parent.mkdir(parents=True, exist_ok=True)
        features = datasets.Features({"audio": datasets.Audio(), **{
            c: datasets.Value("int64" if c in INT_COLUMNS else "string") for c in layout["columns"]}})
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(target))
        yaml_splits.append(f"  - split: {split}\n    path: {pattern}\n")
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n"
                                      + "".join(yaml_splits) + "---\n# local copy for tests\n")


class LocalHub:
    """``datasets.load_dataset`` for hub ids, served from local folders per (repo, revision)."""

    def __init__(self, real):
        self.real, self.repos, self.calls = real, {}, []

    def add(self, repo_id: str, revision: Any, folder: Path) -> None:
        self.repos[(repo_id, revision)] = folder

    def __call__(self, path, name=None, **kwargs):
        self.calls.append({"repo": path, "config": name, **kwargs})
        if (path, kwargs.get("revision")) not in self.repos:
            raise datasets.exceptions.DatasetNotFoundError(
                f"Revision '{kwargs.get('revision')}' doesn't exist for dataset '{path}' on the Hub.")
        folder = self.repos[(path, kwargs.pop("revision"))]
        kwargs.pop("token")
        return self.real(str(folder), name, **kwargs)


@pytest.fixture(scope="module")
def repos(ljspeech_dir, tmp_path_factory) -> Dict[str, Path]:
    """One local parquet repository per preset, and one script-only folder per hub repository."""
    root = tmp_path_factory.mktemp("hub")
    out = {}
    for name, layout in HUB_LAYOUTS.items():
        _write_repo(root / name, DATASET_CONFIGS[name], layout, ljspeech_dir)
        script_dir = root / "default-branch" / layout["script"][:-3]
        script_dir.mkdir(parents=True)
        (script_dir / layout["script"]).write_text("# a loading script: datasets >= 4 refuses to run it\n")
        out[name], out[name + ":script"] = root / name, script_dir
    return out


@pytest.fixture
def hub(repos, monkeypatch) -> LocalHub:
    local = LocalHub(datasets.load_dataset)
    for name, preset in DATASET_CONFIGS.items():
        local.add(preset["dataset_path"], preset["revision"], repos[name])
        local.add(preset["dataset_path"], None, repos[name + ":script"])  # the default branch
    monkeypatch.setattr(datasets, "load_dataset", local)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return local


def _tiny_config(preset: str, **overrides: Any):
    base = {"data.batch_size": 2, "data.num_workers": 0, "data.val_items": 2, "data.segment_seconds": 0.1,
            "data.val_segment_seconds": 0.2, "data.shuffle_buffer": 4}
    return create_training_config(preset="tiny", dataset=preset, overrides={**base, **overrides})


def test_every_preset_is_pinned_and_its_repository_layout_is_known():
    assert set(DATASET_CONFIGS) == set(HUB_LAYOUTS)
    for name, preset in DATASET_CONFIGS.items():
        assert preset["revision"], name
        splits = HUB_LAYOUTS[name]["splits"]
        assert preset["split"] in splits and (preset["val_split"] is None or preset["val_split"] in splits), name
        columns = {"audio", *HUB_LAYOUTS[name]["columns"]}
        assert {preset["audio_column"], preset["text_column"], preset["speaker_column"]} - {None} <= columns, name


@pytest.mark.parametrize("name", sorted(DATASET_CONFIGS))
def test_preset_trains_and_validates_from_its_pinned_revision(name, hub, ljspeech_dir):
    cfg = _tiny_config(name)
    loader, val = build_dataloaders(cfg)
    batch = next(loader)
    assert batch["audio"].shape == (2, 1, cfg.segment_length()) and torch.isfinite(batch["audio"]).all()
    preset = DATASET_CONFIGS[name]
    assert all(t.startswith(f"{preset['text_column']} of LJ001-") for t in batch["text"]), batch["text"]
    if preset["speaker_column"]:
        assert all(spk in ("100", "101") or spk.startswith("client_id of ") for spk in batch["speaker"])
    # Validation crops (first segment) equal an independent decode of the same source file (up to
    # the crop's last samples, where resampling a range and a whole file see different edges).
    assert val and val[0]["audio"].shape[-1] == cfg.val_segment_length()
    for i, clip in enumerate(val[0]["id"]):
        ref, _ = decode_audio(next((ljspeech_dir / "wavs").glob(f"{Path(clip).stem}.*")), cfg.model.sampling_rate)
        ref = ref[:, :cfg.val_segment_length()]
        if cfg.data.loudness_db is not None:  # the crop is brought to the configured loudness
            ref = normalize_loudness(ref, cfg.data.loudness_db)
        n = int(val[0]["length"][i]) - EDGE
        assert torch.allclose(val[0]["audio"][i, :, :n], ref[:, :n], atol=1e-4), clip
    # Every hub load (training and validation; streamed for the streaming presets) asked for the
    # pinned revision with the environment's token.
    loads = [c for c in hub.calls if c["repo"] == preset["dataset_path"]]
    splits = {c["split"] for c in loads}
    assert splits == {preset["split"], *([preset["val_split"]] if preset["val_split"] else [])}
    assert all(c["revision"] == preset["revision"] and c["token"] == TOKEN for c in loads), loads
    assert all(c["streaming"] == preset["streaming"] for c in loads)


def test_unpinned_preset_says_why_in_one_line(hub):
    cfg = _tiny_config("ljspeech", **{"data.revision": None})
    with pytest.raises(DatasetError) as e:
        build_dataloaders(cfg)
    message = str(e.value)
    assert "\n" not in message
    assert "keithito/lj_speech" in message and "loading script (lj_speech.py)" in message
    assert "data.revision" in message


def test_repository_without_data_says_so_in_one_line(hub, repos, tmp_path):
    # mozilla-foundation/common_voice_17_0 today: a card and no data files.
    empty = tmp_path / "common_voice_17_0"
    empty.mkdir()
    (empty / "README.md").write_text("---\nlicense: cc0-1.0\n---\n# moved to the Mozilla Data Collective\n")
    hub.add("mozilla-foundation/common_voice_17_0", None, empty)
    cfg = _tiny_config("common_voice", **{"data.dataset_path": "mozilla-foundation/common_voice_17_0",
                                          "data.revision": None})
    with pytest.raises(DatasetError, match="holds no data files") as e:
        build_dataloaders(cfg)
    assert "\n" not in str(e.value) and "mozilla-foundation/common_voice_17_0" in str(e.value)


def test_unknown_revision_is_one_line(hub):
    cfg = _tiny_config("vctk", **{"data.revision": "no-such-branch"})
    with pytest.raises(DatasetError, match=r"Revision 'no-such-branch' doesn't exist") as e:
        build_dataloaders(cfg)
    assert "\n" not in str(e.value)


def test_train_cli_exit_2_with_one_line_for_a_script_only_revision(hub, tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    try:
        import train_snac
    finally:
        sys.path.remove(str(ROOT))
    with pytest.raises(SystemExit) as e:
        train_snac.main(["--dataset", "ljspeech", "--preset", "tiny", "--set", "data.revision=main",
                         "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "data.num_workers=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "Revision 'main' doesn't exist" in err[0]


def test_train_cli_offline_names_the_pinned_revision(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, str(ROOT / "train_snac.py"), "--dataset", "vctk", "--preset", "tiny",
                        "--set", f"train.run_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "CSTR-Edinburgh/vctk" in err[0] and DATASET_CONFIGS["vctk"]["revision"] in err[0]
    assert "Traceback" not in r.stderr


def test_tokenizer_loads_hub_sources_at_their_revision(hub):
    settings = settings_from_dict({"base_settings": {"audio_codec": "unused"}, "hf_datasets": [
        {"name": "keithito/lj_speech", "sub_name": "main", "split": "train",
         "revision": DATASET_CONFIGS["ljspeech"]["revision"], "text_column_name": "normalized_text"}]})
    src = open_source(settings.sources[0])
    assert len(src) == len(CLIPS) and src.text_column == "normalized_text"
    assert hub.calls[-1]["revision"] == DATASET_CONFIGS["ljspeech"]["revision"]
    assert hub.calls[-1]["token"] == TOKEN and hub.calls[-1]["streaming"] is False
    with pytest.raises(DatasetError, match="loading script"):
        open_source(SourceSpec(name="keithito/lj_speech", sub_name="main"))


# --------------------------------------------------------------------------------------
# Rows that carry a remote path instead of bytes
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(ljspeech_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("remote") / "clips.zip"
    with zipfile.ZipFile(path, "w") as z:
        for clip in CLIPS:
            f = next((ljspeech_dir / "wavs").glob(f"{clip}.*"))
            z.write(f, f"wavs/{f.name}")
    return path


def _remote_rows(archive: Path, ljspeech_dir: Path) -> datasets.Dataset:
    names = [next((ljspeech_dir / "wavs").glob(f"{c}.*")).name for c in CLIPS]
    urls = [f"zip://wavs/{n}::{archive}" for n in names]
    return datasets.Dataset.from_dict({"audio": [{"bytes": None, "path": u} for u in urls]},
                                      features=datasets.Features({"audio": datasets.Audio(decode=False)}))


@pytest.fixture
def xopen_calls(monkeypatch) -> List[Any]:
    from datasets.utils import file_utils

    calls, real = [], file_utils.xopen

    def spy(file, mode="r", *args, download_config=None, **kwargs):
        calls.append((file, download_config.token if download_config else None))
        return real(file, mode, *args, download_config=download_config, **kwargs)

    monkeypatch.setattr(file_utils, "xopen", spy)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return calls


def test_remote_paths_in_rows_open_through_datasets_file_layer(archive, ljspeech_dir, xopen_calls):
    ds = _remote_rows(archive, ljspeech_dir)
    assert ds[0]["audio"]["bytes"] is None and ds[0]["audio"]["path"].startswith("zip://")
    seg = 2048 * 4
    mapped = AudioDataset(ds, 24000, seg, random_crop=False)
    for i, clip in enumerate(CLIPS):
        item = mapped[i]
        assert item["skipped"] == [] and item["id"] == clip
        ref, _ = decode_audio(next((ljspeech_dir / "wavs").glob(f"{clip}.*")), 24000)
        n = item["length"] - EDGE
        assert torch.allclose(item["audio"][:, :n], ref[:, :n], atol=1e-4), clip
    streamed = StreamingAudioDataset(ds.to_iterable_dataset(), 24000, seg, random_crop=False, shuffle_buffer=0)
    assert sorted(item["id"] for item in streamed) == sorted(CLIPS)
    assert len(xopen_calls) >= 2 * len(CLIPS)
    assert all(token == TOKEN for _, token in xopen_calls)


def test_missing_remote_member_is_a_plain_skip(archive, ljspeech_dir, xopen_calls):
    missing = datasets.Dataset.from_dict(
        {"audio": [{"bytes": None, "path": f"zip://wavs/LJ999-0001.flac::{archive}"}]},
        features=datasets.Features({"audio": datasets.Audio(decode=False)}))
    good = _remote_rows(archive, ljspeech_dir)
    ds = datasets.concatenate_datasets([missing, good])
    with pytest.warns(UserWarning, match=r"LJ999-0001\.flac.*: file not found"):
        item = AudioDataset(ds, 24000, 4096, random_crop=False, max_failure_fraction=1.0)[0]
    assert item["skipped"] and "file not found" in item["skipped"][0]


def test_docs_tables_show_each_preset_pinned_revision():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    guide = (ROOT / "TRAINING_GUIDE.md").read_text(encoding="utf-8")
    for name, preset in DATASET_CONFIGS.items():
        for text in (readme, guide):
            rows = [line for line in text.splitlines() if line.strip().startswith(f"| `{name}` |")]
            assert len(rows) == 1, name
            cells = rows[0]
            assert f"`{preset['dataset_path']}`" in cells and f"`{preset['config_name']}`" in cells, cells
            assert f"`{preset['revision']}`" in cells, cells
