#!/usr/bin/env python3
"""The fine-tuning recipe, measured offline: pretrain on one domain, fine-tune on another in each mode.

    python benchmarks/finetune_recipe.py [--out runs/finetune_recipe] [--base_steps 300] [--steps 100]

1. "Pretrained" model: the ``tiny`` preset trained with the demo recipe (``training.demo``, seed 1)
   on the synthetic speech-like corpus (old domain), exported to ``<out>/base/export``.
2. Fine-tunes of that export on the real LJ Speech clips in ``tests/data/ljspeech-mini`` (new
   domain; 6 of the 32 clips held out), one run per ``train.finetune`` mode, same steps, data
   order and learning rate, with a discriminator warm-up before the adversarial losses start.
3. The table (printed, and written to ``<out>/finetune_table.md``): validation mel distance on the
   new domain before and after; code agreement per level with the starting model on the new
   domain's validation set (logged by the run at its last evaluation); validation mel distance on
   the old domain's 12 held-out clips before and after (forgetting). The same evaluation function
   and noise seed serve every number.

Everything runs on the CPU with one thread, in this process; times are printed per stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import FINETUNE_MODES, Config, create_training_config  # noqa: E402

LJSPEECH = ROOT / "tests" / "data" / "ljspeech-mini"
BASE_SEED = 1  # the demo seed that trains with one thread (TRAINING_GUIDE.md, "Short runs")


def finetune_config(out: Path, mode: str, init_from: Path, steps: int, lr: float, disc_warmup: int) -> Config:
    """The fine-tune of one mode: the demo's short-run settings on LJ Speech clips, from ``init_from``.

    The command-line equivalent is printed by :func:`command`."""
    return create_training_config(preset="tiny", dataset_path=str(LJSPEECH), batch_size=4, overrides={
        "train.finetune": mode, "train.init_from": str(init_from), "optim.lr": lr,
        "train.disc_warmup_steps": disc_warmup,
        "data.segment_seconds": 0.34, "data.val_segment_seconds": 2.0, "data.num_workers": 0,
        "train.run_dir": str(out / mode), "train.max_steps": steps, "train.eval_every": steps // 2,
        "train.eval_batches": 3, "train.checkpoint_every": steps, "train.log_every": 10, "train.device": "cpu",
        # the demo's guards for short high-lr runs (gradient clip, lr warm-up, capped usage rule)
        "optim.grad_clip_generator": 100.0, "optim.warmup_steps": 20, "optim.lr_decay": 1.0,
        "train.code_replacement": "usage", "train.dead_code_every": 10, "train.replace_max_fraction": 0.05,
        "train.seed": 0, "data.seed": 0,
    })


def command(cfg: Config) -> str:
    """``train_snac.py`` command line of a fine-tune config (what the guide shows)."""
    t, o = cfg.train, cfg.optim
    sets = {"optim.lr": f"{o.lr:g}", "optim.warmup_steps": o.warmup_steps, "optim.lr_decay": f"{o.lr_decay:g}",
            "optim.grad_clip_generator": f"{o.grad_clip_generator:g}", "data.segment_seconds": cfg.data.segment_seconds,
            "train.code_replacement": t.code_replacement, "train.dead_code_every": t.dead_code_every,
            "train.replace_max_fraction": t.replace_max_fraction}
    return (f"python train_snac.py --preset tiny --init_from {t.init_from} --finetune {t.finetune} "
            f"--disc_warmup_steps {t.disc_warmup_steps} --dataset_path tests/data/ljspeech-mini --batch_size 4 "
            f"--max_steps {t.max_steps} --run_dir {t.run_dir} --device cpu "
            + " ".join(f"--set {k}={v}" for k, v in sets.items()))


@torch.no_grad()
def val_mel(model_dir: Path, batches: List[Dict[str, torch.Tensor]], cfg: Config) -> float:
    """Validation mel distance of an exported model, computed as ``training.train.evaluate`` does
    (eval mode, the decoder noise seeded with ``train.seed``, mean over clips)."""
    from training.hub import load_generator
    from training.losses import GeneratorLoss
    from training.model import train_forward

    model, _ = load_generator(model_dir)
    loss = GeneratorLoss(cfg.loss, cfg.model.sampling_rate)
    torch.manual_seed(cfg.train.seed)
    total, count = 0.0, 0
    for batch in batches[:cfg.train.eval_batches]:
        real = batch["audio"]
        total += float(loss.mel_loss(real, train_forward(model, real).audio.float())) * real.shape[0]
        count += real.shape[0]
    return total / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/finetune_recipe"))
    p.add_argument("--base_steps", type=int, default=300, help="pretraining steps on the synthetic corpus")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps per mode")
    p.add_argument("--lrs", default="mode,1e-3", help="comma-separated fine-tuning learning rates; each runs every "
                   "mode. 'mode' = the mode's own rate (train.finetune's default, made for long runs of the published "
                   "models); a number = that rate for every mode (default: mode,1e-3)")
    p.add_argument("--disc_warmup", type=int, default=20, help="discriminator warm-up steps of each fine-tune")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from training.dataset import build_dataloaders
    from training.demo import demo_config, write_corpus
    from training.train import train_main

    t0 = time.perf_counter()
    base_cfg = demo_config(args.out, args.base_steps, seed=BASE_SEED,
                           overrides=[f"train.run_dir={args.out / 'base'}", "train.resume=false"])
    write_corpus(args.out / "corpus", 64)
    base = Path(train_main(base_cfg)["export_dir"])
    times = {"pretrain": time.perf_counter() - t0}
    print(f"pretrained {args.base_steps} steps on the synthetic corpus: {times['pretrain']:.0f} s -> {base}", flush=True)

    _, old_val = build_dataloaders(base_cfg)
    old_before = val_mel(base, old_val, base_cfg)
    rows = []
    for lr_text in args.lrs.split(","):
        for mode in FINETUNE_MODES:
            lr = FINETUNE_MODES[mode]["optim.lr"] if lr_text.strip() == "mode" else float(lr_text)
            start = time.perf_counter()
            cfg = finetune_config(args.out / f"lr{lr:g}", mode, base, args.steps, lr, args.disc_warmup)
            cfg.train.resume = False
            summary = train_main(cfg)
            seconds = time.perf_counter() - start
            metrics = [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
            evals = [m for m in metrics if "val/mel" in m]
            rows.append({"mode": mode, "lr": lr, "command": command(cfg), "new_before": evals[0]["val/mel"],
                         "new_after": evals[-1]["val/mel"], "agreement": summary["code_agreement"],
                         "old_before": old_before,
                         "old_after": val_mel(Path(summary["export_dir"]), old_val, base_cfg), "seconds": seconds})
            print(f"fine-tuned ({mode}, lr {lr:g}) {args.steps} steps: {seconds:.0f} s", flush=True)

    table = format_table(rows)
    total = time.perf_counter() - t0
    print("\n" + table)
    print(f"\nwall time: {total:.0f} s (pretraining {times['pretrain']:.0f} s; fine-tunes "
          + ", ".join(f"{r['mode']} lr {r['lr']:g} {r['seconds']:.0f} s" for r in rows) + ")")
    print("\ncommands of the fine-tunes:\n" + "\n".join(r["command"] for r in rows))
    (args.out / "finetune_table.md").write_text(table + "\n")
    (args.out / "finetune_table.json").write_text(json.dumps({"rows": rows, "seconds": total}, indent=2))
    return 0


def format_table(rows: List[Dict]) -> str:
    lines = ["| mode | trains | lr | val mel, new domain (LJ Speech): before -> after | code agreement L0 / L1 / L2 "
             "| val mel, old domain (synthetic): before -> after |",
             "|---|---|---|---|---|---|"]
    trains = {"decoder": "decoder", "decoder+encoder": "decoder, encoder", "full": "decoder, encoder, quantizer"}
    for r in rows:
        agree = " / ".join(f"{100 * a:.3f} %" for a in r["agreement"])
        lines.append(f"| `{r['mode']}` | {trains[r['mode']]} | {r['lr']:g} | {r['new_before']:.3f} -> {r['new_after']:.3f} | {agree} "
                     f"| {r['old_before']:.3f} -> {r['old_after']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
