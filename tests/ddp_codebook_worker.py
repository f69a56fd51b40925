"""Run under ``torchrun --nproc_per_node 2``: the data-dependent encoder scale and k-means codebook
initialisation from rank-specific audio, then one usage-EMA replacement check; each rank saves its codebooks to ``<out>/rank<R>.pt``
for tests/test_codebooks.py."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from training.codebooks import UsageReplacer, init_codebooks_from_data, init_encoder_from_data
from training.config import model_preset
from training.model import build_generator, train_forward


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # identical initial weights on both ranks, as DDP would have them
    model = build_generator(model_preset("tiny"))
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own audio
    batches = [0.1 * torch.randn(2, 1, 8192, generator=g) for _ in range(6)]
    init_encoder_from_data(model, batches)
    counts = init_codebooks_from_data(model, batches, iters=10, seed=0, standardise=True)
    generator_after_init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after_init = [vq.codebook.weight.detach().clone() for vq in model.quantizer.quantizers]
    replacer = UsageReplacer(model, threshold=0.5, decay=0.9, every=1, seed=0)
    with torch.no_grad():
        fwd = train_forward(model, batches[0])
    replaced = replacer.step(1, fwd.codes, fwd.latents)
    torch.save({"counts": counts, "generator_after_init": generator_after_init, "after_init": after_init, "replaced": replaced,
                "after_replace": [vq.codebook.weight.detach().clone() for vq in model.quantizer.quantizers]},
               out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
