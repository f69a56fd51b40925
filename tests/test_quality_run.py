"""benchmarks/quality_run.py end to end: two arms, a few steps, held-out clips never trained on,
one table and one PNG holding real numbers."""

import json
import math
import os
import subprocess
import sys

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_arms_train_and_are_scored_on_held_out_clips(tmp_path, ljspeech_dir):
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality_run.py"), "--data", str(ljspeech_dir),
           "--out", str(out), "--arms", "a,b", "--steps", "2", "--eval_every", "1", "--batch_size", "2",
           "--segment", "0.17", "--val_seconds", "0.5", "--heldout", "2", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    held = sorted(p.name for p in (out / "data" / "validation").iterdir())
    trained = sorted(p.name for p in (out / "data" / "train").iterdir())
    assert len(held) == 2 and not set(held) & set(trained) and len(trained) == 30

    report = json.loads((out / "quality.json").read_text())["results"]
    assert sorted(report) == ["a", "b"]
    for arm, scores in report.items():
        for key in ("mel", "stft", "si_sdr", "pesq", "stoi", "usage0", "usage1", "usage2", "perplexity0"):
            assert math.isfinite(scores[key]), (arm, key)
        assert scores["mel"] > 0 and 1.0 <= scores["pesq"] <= 4.7 and 0 < scores["usage0"] <= 1
    # the two arms really trained differently (different losses): different held-out scores
    assert report["a"]["mel"] != report["b"]["mel"]

    table = (out / "quality.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| (")]
    assert len(rows) == 2 and f"{report['a']['mel']:.3f}" in rows[0] and f"{report['b']['mel']:.3f}" in rows[1]
    png = (out / "quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # every arm's validation curve is on the held-out clips: evaluations at steps 0, 1 and 2
    for arm in ("a", "b"):
        rows = [json.loads(l) for l in (out / arm / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "val/mel" in r] == [0, 1, 2]
    # arm b's config is the snac-forward baseline: frozen codebooks, no restart, STFT 5 early
    cfg_b = (out / "b" / "config.yaml").read_text()
    assert "commitment: 0.0" in cfg_b and "dead_code_steps: 0" in cfg_b and "stft: 5.0" in cfg_b
    assert "generator_init: snac" in cfg_b and "codebook_init: random" in cfg_b and "code_replacement: null" in cfg_b
    assert "data_dependent_init: false" in cfg_b and "data_dependent_init: true" in (out / "a" / "config.yaml").read_text()
    assert "generator_init: dac" in (out / "a" / "config.yaml").read_text()


def test_bad_arm_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_run.py"), "--arms", "a,z",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--arms" in r.stderr and "Traceback" not in r.stderr
