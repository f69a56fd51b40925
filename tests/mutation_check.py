#!/usr/bin/env python3
"""Mutation check: break each core claim in a temporary copy of the repository and make sure the
test that names it fails.

    python tests/mutation_check.py            # baseline + all mutants (~5 min on 2 CPU cores)
    python tests/mutation_check.py --list
    python tests/mutation_check.py --only ddp_desync --skip-baseline

For every mutant: copy the working tree (tracked and untracked, not ignored files) to a temporary
folder, rewrite the product source there, run the named test with pytest, and require that it
*fails* (pytest exit code 1: a test failed, not a collection or syntax error). The baseline run
first checks that each named test passes on the unmodified copy, so a test that is simply broken
does not count as catching anything. Exit code 0 when every mutant is caught, 1 otherwise.

Mutants are regular-expression rewrites searched for in every ``training/**/*.py`` file, so they
survive code moving between modules; a rewrite that no longer matches anything is reported as
"not applicable" (and fails the check) rather than silently skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Rewrite:
    pattern: str  # regular expression (re.MULTILINE)
    replacement: str
    min_count: int = 1  # matches required over all product files; 0 = optional


@dataclass(frozen=True)
class Mutant:
    name: str
    claim: str
    test: str  # pytest node id, relative to the repository root
    rewrites: Tuple[Rewrite, ...]


MUTANTS: Tuple[Mutant, ...] = (
    Mutant("encoder_context_halved",
           "chunked encoding sees the encoder's whole receptive field: codes equal snac.SNAC.encode on 60 s",
           "tests/test_codec.py::test_chunked_matches_one_shot_on_60s",
           (Rewrite(r"plan_windows\((\w+), self\.chunk, self\.context\)", r"plan_windows(\1, self.chunk, self.context // 2)"),)),
    Mutant("ddp_desync",
           "DDP ranks keep identical weights and codebooks (dead-code restart draws the same codes on every rank)",
           "tests/test_train.py::test_two_process_gloo_ranks_stay_identical",
           # ranks draw different replacement codes (the restart's random stream is seeded per rank)
           (Rewrite(r"self\.generator = torch\.Generator\(\)\.manual_seed\(seed\)",
                    "self.generator = torch.Generator().manual_seed(seed + (dist.get_rank() if _distributed() else 0))"),
            # and the run's own consistency report compares each rank with itself
            Rewrite(r"dist\.broadcast\(ref, src=0\)", "pass", min_count=0))),
    Mutant("spectral_loss_autocast",
           "spectral losses run in float32 inside a bf16 autocast region",
           "tests/test_losses.py::test_spectral_losses_are_fp32_under_bf16_autocast",
           (Rewrite(r"with _no_autocast\(\w+\):", 'with __import__("contextlib").nullcontext():', min_count=2),)),
    Mutant("never_resume",
           "rerunning a training command resumes from checkpoints/latest.pt",
           "tests/test_examples.py::test_resume",
           (Rewrite(r"^(\s*)if point is not None:\n(\s*)load_checkpoint\(", r"\1if False:\n\2load_checkpoint("),)),
    Mutant("snac_default_init",
           "generators built from scratch get DAC's zero conv biases, so speech does not collapse onto a few codes at step 0",
           "tests/test_codebooks.py::test_snac_default_init_collapses_and_dac_init_does_not",
           (Rewrite(r'if init == "snac":\n(\s*)return model', r"if True:\n\1return model"),)),
    Mutant("no_init_of_ours_overfit",
           "the tiny preset, initialised as training initialises it, overfits one real clip with many codes per level",
           "tests/test_overfit.py::test_tiny_preset_overfits_one_clip",
           # snac's default init and no data-dependent scale (which would re-set the biases from data)
           (Rewrite(r'if init == "snac":\n(\s*)return model', r"if True:\n\1return model"),
            Rewrite(r"convs = _encoder_convs\(model\)", "convs = []"),
            Rewrite(r"^(\s*)if standardise:", r"\1if False:"))),
    Mutant("data_dependent_init_skipped",
           "weight norm's data-dependent init keeps the latents apart through the first warm-up steps",
           "tests/test_codebooks.py::test_data_dependent_init_keeps_the_latents_apart_in_the_first_steps",
           (Rewrite(r"convs = _encoder_convs\(model\)", "convs = []"),
            Rewrite(r"^(\s*)if standardise:", r"\1if False:"))),
    Mutant("encoder_init_sees_stale_activations",
           "the one-pass data-dependent init gives every convolution the output of the rescaled ones before it",
           "tests/test_codebooks.py::test_data_dependent_init_in_one_pass_equals_one_pass_per_convolution",
           (Rewrite(r"return conv\._conv_forward\(inputs\[0\], conv\.weight, conv\.bias\)", "return None"),)),
    Mutant("torch_at_startup",
           "--help, a bad flag or a bad config value is answered without importing torch",
           "tests/test_startup.py::test_help_and_bad_flags_are_answered_without_importing_torch",
           (Rewrite(r"^import importlib$", "import importlib\nfrom . import _snac  # noqa: F401"),)),
    Mutant("warmup_switch_breaks_resume",
           "a resume that turns optim.warmup_steps on or off follows the new schedule",
           "tests/test_train.py::test_resume_that_changes_the_warmup_follows_the_new_schedule",
           (Rewrite(r"saved = \{\*\*saved, \"lr_lambdas\": \[None\] \* len\(sched\.lr_lambdas\)\}", "pass"),)),
    Mutant("codebook_gradient_cut",
           "the codebook loss moves the codebooks (the bug of trainers built on snac's forward)",
           "tests/test_overfit.py::test_tiny_preset_overfits_one_clip",
           (Rewrite(r"codebook = F\.mse_loss\((\w+), (\w+)\.detach\(\)\)", r"codebook = F.mse_loss(\1.detach(), \2.detach())"),)),
    Mutant("stop_signal_ignored",
           "SIGTERM/SIGINT/SIGUSR1 stop training at the next step with a checkpoint and exit 128 + signal",
           "tests/test_faults.py::test_sigterm_stops_with_a_checkpoint_and_the_rerun_matches_an_uninterrupted_run",
           (Rewrite(r"^(\s*)if stop\(\):", r"\1if False:"),)),
    Mutant("stop_without_checkpoint",
           "a run stopped by a signal writes its checkpoint before it exits",
           "tests/test_faults.py::test_sigterm_stops_with_a_checkpoint_and_the_rerun_matches_an_uninterrupted_run",
           (Rewrite(r'if state\.extra\.get\("checkpoint_step"\) != state\.step:', "if False:"),)),
    Mutant("run_lock_skipped",
           "a second trainer on a live run directory exits 2 naming the holder, and moves nothing",
           "tests/test_faults.py::test_second_trainer_on_a_live_run_dir_exits_2_naming_the_holder",
           (Rewrite(r"lock, note = take_run_lock\(Path\(cfg\.train\.run_dir\)\)", "lock, note = None, None"),
            Rewrite(r"lock\.record_holder\(\)  # again", "pass  # again"))),
    Mutant("run_lock_ignored_when_held",
           "a lock file whose flock is held by a live trainer is never taken over",
           "tests/test_faults.py::test_second_trainer_on_a_live_run_dir_exits_2_naming_the_holder",
           (Rewrite(r'if lock == "held" or \(lock == "unsupported" and not _stale_without_flock\(holder\)\):',
                    "if False:"),)),
    Mutant("lr_change_not_applied",
           "a resume with a new optim.lr trains with it from the next step (the checkpoint's lr is replaced)",
           "tests/test_faults.py::test_resume_with_a_new_lr_applies_it_and_keeps_the_config_history",
           (Rewrite(r"^(\s*)apply_optim_config\(state\)", r"\1pass"),)),
    Mutant("resume_config_unchecked",
           "a resume that changes a key which cannot change mid-run (seed, model, data source) is refused",
           "tests/test_faults.py::test_resume_with_a_fixed_key_changed_is_refused_listing_each_difference",
           (Rewrite(r"if fixed and not cfg\.train\.allow_config_change:", "if False:"),)),
    Mutant("ddp_timeout_ignored",
           "a rank whose peer stopped exits after train.ddp_timeout_s with one line, instead of waiting 30 min",
           "tests/test_faults.py::test_stopped_rank_makes_the_other_exit_after_ddp_timeout_with_one_line",
           (Rewrite(r"dist\.init_process_group\(backend=backend, timeout=timeout\)",
                    "dist.init_process_group(backend=backend)"),)),
    Mutant("restart_usage_not_reduced",
           "a code used on any rank is alive: dead-code restarts take the MAX of last use over ranks",
           "tests/test_model.py::test_code_used_on_one_rank_only_is_restarted_on_no_rank",
           (Rewrite(r"dist\.all_reduce\(last_used, op=dist\.ReduceOp\.MAX\)", "pass"),)),
    Mutant("resume_search_stops_at_damaged",
           "resume goes past a damaged newest step_*.pt to the newest readable one",
           "tests/test_faults.py::test_damaged_newest_numbered_checkpoint_falls_back_to_an_older_one",
           (Rewrite(r"(skipped\.append\(str\(e\)\)\n\s*)continue", r"\1break"),)),
    Mutant("stream_conv_forgets_context",
           "streaming decode equals the whole-sequence decode: each convolution keeps the inputs its kernel still needs",
           "tests/test_streaming.py::test_trained_tiny_stream_of_real_speech_codes_equals_whole_decode",
           (Rewrite(r"self\.buf = cat\[\.\.\., max\(0, cat\.shape\[-1\] - self\.span\):\]",
                    "self.buf = torch.zeros_like(cat[..., max(0, cat.shape[-1] - self.span):])"),)),
    Mutant("stream_noise_restarts_each_push",
           "streaming decode draws each noise block's keyed noise at its absolute position",
           "tests/test_streaming.py::test_trained_tiny_stream_of_real_speech_codes_equals_whole_decode",
           (Rewrite(r"self\.pos \+= n$", "self.pos = 0"),)),
    Mutant("token_parser_skips_bad_token",
           "a malformed token stream is rejected naming the token, never silently realigned",
           "tests/test_streaming.py::test_malformed_token_streams_get_one_line_naming_the_token",
           (Rewrite(r"^(\s*)if len\(bad\):", r"\1if False:"),)),
    Mutant("decoder_mode_trains_quantizer",
           "--finetune decoder keeps every token: the encoder and the whole quantizer stay bit-identical",
           "tests/test_finetune.py::test_decoder_mode_keeps_every_token_and_frozen_tensor_while_mel_improves",
           (Rewrite(r'"decoder": \{"train\.freeze_encoder": True, "train\.freeze_quantizer": True',
                    '"decoder": {"train.freeze_encoder": True, "train.freeze_quantizer": False'),
            # (the consistency check would otherwise refuse the mutated mode)
            Rewrite(r"if section == \"train\" and getattr\(t, name\) != value:", "if False:"))),
    Mutant("frozen_params_in_optimizer",
           "frozen parameters get no optimizer state",
           "tests/test_finetune.py::test_frozen_parts_get_no_optimizer_state_and_no_gradient",
           (Rewrite(r"\[p for p in generator\.parameters\(\) if p\.requires_grad\]", "list(generator.parameters())"),)),
    Mutant("disc_warmup_updates_generator",
           "during the discriminator warm-up no generator parameter changes and no generator backward runs",
           "tests/test_finetune.py::test_disc_warmup_updates_no_generator_parameter_and_runs_no_generator_backward",
           (Rewrite(r"if state\.step < cfg\.train\.disc_warmup_steps:", "if False:"),)),
    Mutant("agreement_against_itself",
           "code agreement compares with the starting model's codes (full mode logs it below 1.0)",
           "tests/test_finetune.py::test_full_mode_logs_agreement_below_one_and_the_summary_reports_it",
           (Rewrite(r"counter\.add\(self\.codes\[index\], codes,", "counter.add(codes, codes,"),)),
    Mutant("tokenizer_forgets_failures",
           "a resumed tokenizer run treats logged failures as done (exactly once)",
           "tests/test_tokenize.py::test_sigkill_mid_run_then_resume_is_exactly_once",
           (Rewrite(r"for (\w+) in self\.out_dir\.glob\(\"failed\*\.jsonl\"\):", r"for \1 in []:"),)),
)


def say(line: str) -> None:
    """Print a progress line at once, also when the output goes to a file (the check takes minutes)."""
    print(line, flush=True)


def copy_tree(dest: Path) -> None:
    """Copy the working tree's tracked and untracked-but-not-ignored files to ``dest``."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listing):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(mutant: Mutant, tree: Path) -> Optional[str]:
    """Rewrite the product sources in ``tree``; returns a problem description or None."""
    files = sorted((tree / "training").rglob("*.py"))
    for rw in mutant.rewrites:
        count = 0
        for f in files:
            text = f.read_text()
            new, n = re.subn(rw.pattern, rw.replacement, text, flags=re.MULTILINE)
            if n:
                f.write_text(new)
                count += n
        if count < rw.min_count:
            return f"not applicable: /{rw.pattern}/ matched {count} time(s), expected at least {rw.min_count}"
    return None


def run_test(tree: Path, test: str) -> Tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test], cwd=tree,
                          env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def summary_line(output: str) -> str:
    lines = [l for l in output.strip().splitlines() if l.strip()]
    return lines[-1] if lines else "(no output)"


def check(mutant: Optional[Mutant], test: str) -> bool:
    """Baseline (mutant None): the test must pass. Mutant: the test must fail (exit code 1)."""
    with tempfile.TemporaryDirectory(prefix="snac_mutation_") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        if mutant is not None:
            problem = apply(mutant, tree)
            if problem:
                say(f"  {mutant.name}: {problem}")
                return False
        rc, out, seconds = run_test(tree, test)
    if mutant is None:
        ok = rc == 0
        say(f"  baseline {test}: {'passes' if ok else 'DOES NOT PASS'} ({seconds:.0f} s) - {summary_line(out)}")
    else:
        ok = rc == 1
        verdict = "caught" if ok else ("NOT CAUGHT" if rc == 0 else f"inconclusive (pytest exit {rc})")
        say(f"  {mutant.name}: {verdict} by {test} ({seconds:.0f} s) - {summary_line(out)}")
    if not ok:
        say("\n".join(out.strip().splitlines()[-15:]))
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    p.add_argument("--skip-baseline", action="store_true", help="do not first check that the named tests pass")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            say(f"{m.name:28s} {m.test}\n{'':28s} claim: {m.claim}")
        return 0
    chosen: List[Mutant] = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        print(f"error: unknown mutant(s) {sorted(unknown)}; see --list", file=sys.stderr)
        return 2
    results = []
    if not args.skip_baseline:
        say("baseline (unmodified copy; each named test must pass):")
        results += [check(None, m.test) for m in chosen]
    say("mutants (each named test must fail):")
    results += [check(m, m.test) for m in chosen]
    say(f"{'all mutants caught' if all(results) else 'MUTATION CHECK FAILED'}: "
          f"{sum(results)}/{len(results)} checks ok")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
