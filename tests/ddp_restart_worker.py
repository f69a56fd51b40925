"""Run under ``torchrun --nproc_per_node 2``: one dead-code restart check with rank-specific
candidates; each rank saves its codebooks to ``<out>/rank<R>.pt`` for tests/test_model.py."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import model_preset
from training.model import DeadCodeRestarter, build_generator


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # identical initial weights on both ranks, as DDP would have them
    model = build_generator(model_preset("tiny"))
    initial = [vq.codebook.weight.detach().clone() for vq in model.quantizer.quantizers]
    restarter = DeadCodeRestarter(model, threshold=1, every=1, seed=0, noise=0.01)
    g = torch.Generator().manual_seed(100 + rank)
    # Rank 0's candidates have first coordinate +5, rank 1's -5 (rank 1 holds fewer rows): a
    # restarted code tells which rank it came from.
    frames = 40 if rank == 0 else 30
    latents = []
    for _ in model.quantizer.quantizers:
        z = torch.randn(1, 8, frames, generator=g)
        z[:, 0] = 5.0 if rank == 0 else -5.0
        latents.append(z)
    codes = [torch.zeros(1, frames, dtype=torch.long) for _ in latents]  # only code 0 is used
    counts = restarter.step(1, codes, latents)
    torch.save({"counts": counts, "weights": [vq.codebook.weight.detach().clone() for vq in model.quantizer.quantizers],
                "latents": latents, "initial": initial}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
