#!/usr/bin/env python3
"""Train a SNAC codec.

Examples:
  python train_snac.py --dataset ljspeech                       # hub preset, 24 kHz model
  python train_snac.py --dataset_path /data/wavs --batch_size 8 # any folder of audio files
  python train_snac.py --config my_config.json --set optim.lr=3e-4 --set train.max_steps=20000
  torchrun --nproc_per_node 8 train_snac.py --config my_config.yaml   # multi-GPU (DDP)

Rerunning the same command resumes from the newest readable checkpoint in <run_dir>/checkpoints
(latest.pt, else the newest readable step_*.pt). One trainer per run directory: a second one exits 2
naming the first. SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 stop training at the next step with a
checkpoint; exit status 128 + signal number (143, 130, 138). Exit status: 0 done, 2 bad input or a
refused resume, 1 other failures (e.g. a DDP collective that timed out: train.ddp_timeout_s).
"""

from __future__ import annotations

import argparse
import sys

from training.cli import OneLineParser, guard
from training.config import (DATASET_CONFIGS, FINETUNE_MODES, MODEL_PRESETS, ConfigError, apply_dataset_preset,
                             apply_finetune_mode, apply_overrides, create_training_config, load_config, model_preset,
                             set_dotted)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train_snac.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="JSON or YAML config file (sections model/data/loss/"
                   "discriminator/optim/train, or the legacy model/training/data/paths layout)")
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), help="model preset (default: 24khz, or the "
                   "config file's model)")
    p.add_argument("--dataset", metavar="NAME", help=f"dataset preset ({', '.join(DATASET_CONFIGS)}) or the "
                   "name of a dataset registered with `python -m training.dataset prepare`")
    p.add_argument("--dataset_path", metavar="PATH", help="hub id, save_to_disk directory, audio folder, "
                   "LJ Speech-layout folder or manifest file")
    p.add_argument("--batch_size", type=int, help="clips per step per process (paper: 16)")
    p.add_argument("--streaming", action="store_true", default=None, help="stream a hub dataset instead of "
                   "downloading it")
    p.add_argument("--run_dir", metavar="DIR", help="checkpoints, logs and exports go here (default runs/snac)")
    p.add_argument("--max_steps", type=int, help="total training steps (paper: 800000)")
    p.add_argument("--init_from", metavar="MODEL", help="fine-tune from a SNAC directory, hub id "
                   "(e.g. hubertsiuzdak/snac_24khz) or checkpoint")
    p.add_argument("--finetune", choices=list(FINETUNE_MODES), help="what a fine-tune from --init_from trains "
                   "(train.finetune): decoder (encoder and quantizer frozen: the tokens stay identical; lr "
                   f"{FINETUNE_MODES['decoder']['optim.lr']:g}), decoder+encoder (quantizer frozen; lr "
                   f"{FINETUNE_MODES['decoder+encoder']['optim.lr']:g}) or full (everything; lr "
                   f"{FINETUNE_MODES['full']['optim.lr']:g}). Sets train.freeze_encoder / freeze_quantizer and "
                   "optim.lr; --set optim.lr=... wins")
    p.add_argument("--disc_warmup_steps", type=int, metavar="N", help="train the discriminators alone for the "
                   "first N steps, the generator untouched (train.disc_warmup_steps; default 0)")
    p.add_argument("--device", help="auto (default: cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--no-resume", dest="no_resume", action="store_true",
                   help="start fresh even if the run directory has checkpoints (the previous run's "
                   "checkpoints/, metrics.jsonl, export/, config.yaml and logs/ are kept, renamed to <name>.prevN)")
    p.add_argument("--allow_config_change", action="store_true", default=None,
                   help="resume even though keys that cannot change mid-run differ from the checkpoint's "
                   "(model.*, discriminator.*, the data source, seeds, batch size, number of processes); "
                   "without it such a resume exits 2 listing the differences. Model and discriminator keys "
                   "keep the checkpoint's values. Changeable keys (optim.lr, loss weights, intervals, "
                   "max_steps...) are always applied and listed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=3e-4 --set loss.commitment=0 "
                   "(repeatable; applied last)")
    return p


def config_from_args(args: argparse.Namespace):
    if args.config:
        cfg = load_config(args.config)
        if args.preset:
            cfg.model = model_preset(args.preset)
    else:
        cfg = create_training_config(preset=args.preset or "24khz")
    if args.dataset and args.dataset_path:
        # One of them would be silently ignored; say which to keep instead of guessing.
        raise ConfigError(f"--dataset {args.dataset} and --dataset_path {args.dataset_path} both name the training "
                          "data; give only one of them")
    if args.dataset:
        if args.dataset in DATASET_CONFIGS:
            apply_dataset_preset(cfg, args.dataset)
        else:
            set_dotted(cfg, "data.dataset", args.dataset)  # a registry name, resolved by the data layer
    flags = {"data.dataset_path": args.dataset_path, "data.batch_size": args.batch_size,
             "data.streaming": args.streaming, "train.run_dir": args.run_dir, "train.max_steps": args.max_steps,
             "train.init_from": args.init_from, "train.device": args.device, "train.seed": args.seed,
             "train.allow_config_change": args.allow_config_change, "train.disc_warmup_steps": args.disc_warmup_steps}
    for key, value in flags.items():
        if value is not None:
            set_dotted(cfg, key, value)
    if args.finetune:
        apply_finetune_mode(cfg, args.finetune)  # before --set: an explicit optim.lr wins
    if args.no_resume:
        cfg.train.resume = False
    apply_overrides(cfg, args.overrides)
    if not (cfg.data.dataset or cfg.data.dataset_path):
        print("no dataset given: using the ljspeech preset (pass --dataset or --dataset_path to choose)",
              file=sys.stderr)
        apply_dataset_preset(cfg, "ljspeech")
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with guard():
        cfg = config_from_args(args)
        from training.train import train_main

        summary = train_main(cfg)
        if summary.get("export_dir"):
            print(f"done: step {summary['step']}, exported SNAC model to {summary['export_dir']}")
        if summary.get("code_agreement"):
            from training.agreement import format_agreement

            print(f"code agreement with the starting model on the validation set: "
                  f"{format_agreement(summary['code_agreement'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
