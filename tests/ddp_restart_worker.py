"""Run under ``torchrun --nproc_per_node 2``: one dead-code restart check; each rank saves its
codebooks to ``<out>/rank<R>.pt`` for tests/test_model.py.

Modes (second argument):

- ``candidates`` (default): rank-specific candidates, only code 0 used: every rank's candidates
  are gathered and the ranks write the same codebooks.
- ``one_rank_code``: code 1 is used by rank 0 only (code 0 by both), with more candidates than
  codes: a code used on any rank is alive, so neither rank restarts code 1, and every other code
  is restarted identically on both.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import model_preset
from training.model import DeadCodeRestarter, build_generator


def _latents_and_codes(model, rank: int, mode: str):
    g = torch.Generator().manual_seed(100 + rank)
    levels = len(model.quantizer.quantizers)
    if mode == "one_rank_code":
        frames = 300  # > codebook_size rows per rank: enough candidates for every dead code
        latents = [torch.randn(1, 8, frames, generator=g) for _ in range(levels)]
        codes = [torch.zeros(1, frames, dtype=torch.long) for _ in range(levels)]
        if rank == 0:
            for c in codes:
                c[0, :10] = 1
        return latents, codes
    # Rank 0's candidates have first coordinate +5, rank 1's -5 (rank 1 holds fewer rows): a
    # restarted code tells which rank it came from.
    frames = 40 if rank == 0 else 30
    latents = []
    for _ in range(levels):
        z = torch.randn(1, 8, frames, generator=g)
        z[:, 0] = 5.0 if rank == 0 else -5.0
        latents.append(z)
    codes = [torch.zeros(1, frames, dtype=torch.long) for _ in latents]  # only code 0 is used
    return latents, codes


def main(out: Path, mode: str = "candidates") -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # identical initial weights on both ranks, as DDP would have them
    model = build_generator(model_preset("tiny"))
    initial = [vq.codebook.weight.detach().clone() for vq in model.quantizer.quantizers]
    restarter = DeadCodeRestarter(model, threshold=1, every=1, seed=0, noise=0.01)
    latents, codes = _latents_and_codes(model, rank, mode)
    counts = restarter.step(1, codes, latents)
    torch.save({"counts": counts, "weights": [vq.codebook.weight.detach().clone() for vq in model.quantizer.quantizers],
                "latents": latents, "initial": initial}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
