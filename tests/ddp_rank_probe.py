"""Run ``train_snac.py`` under torchrun while watching every rank from the outside.

Usage (what the DDP test does)::

    torchrun --nproc_per_node 2 tests/ddp_rank_probe.py OUT_DIR [train_snac.py arguments...]

It changes nothing in training; it only observes:

- every ``torch.distributed`` collective the training code calls is wrapped, and each tensor
  handed to it must live on the configured training device (NCCL refuses CPU tensors, and a CPU
  tensor on a GPU run is a hidden host round trip). A violation is written to
  ``OUT_DIR/device_violations_rank{R}.txt`` and raised.
- after training each rank saves its own generator and discriminator state (parameters and
  buffers, codebooks included) to ``OUT_DIR/rank{R}.pt``, so the test can compare the ranks
  itself instead of trusting the product's own consistency report.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_snac  # noqa: E402
import training.train as train_module  # noqa: E402

# The public collectives a training loop may call (torch.distributed.* functions taking tensors).
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "send", "recv", "isend", "irecv")


def _tensors(value):
    """Every tensor in a (possibly nested list/tuple of) argument(s)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _on_device(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _check_call(name: str, args, kwargs, device: torch.device, log: Path) -> None:
    problems = [f"{name}: tensor {tuple(t.shape)} on {t.device}, training device is {device}"
                for t in _tensors([*args, *kwargs.values()]) if not _on_device(t, device)]
    # barrier(device_ids=[i]) names the GPUs it synchronizes: it must be the training GPU.
    ids = kwargs.get("device_ids")
    if ids is not None and (device.type != "cuda" or list(ids) != [device.index]):
        problems.append(f"{name}: device_ids={ids}, training device is {device}")
    if problems:
        with open(log, "a") as f:
            f.write("\n".join(problems) + "\n")
        raise AssertionError("; ".join(problems))


def watch_collectives(device: torch.device, log: Path, calls: dict) -> None:
    """Replace each collective in ``torch.distributed`` by a checking wrapper; ``calls`` counts them."""
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            _check_call(_name, args, kwargs, device, log)
            return _original(*args, **kwargs)

        setattr(dist, name, wrapper)


def capture_states(states: list) -> None:
    """Keep a reference to the TrainState that training builds."""
    original = train_module.build_state

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        state = original(*args, **kwargs)
        states.append(state)
        return state

    train_module.build_state = wrapper


def main(argv) -> int:
    out = Path(argv[0])
    train_args = argv[1:]
    rank = int(os.environ["RANK"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = train_snac.config_from_args(train_snac.build_parser().parse_args(train_args))
    device = train_module.resolve_device(cfg.train.device)
    calls: dict = {}
    watch_collectives(device, out / f"device_violations_rank{rank}.txt", calls)
    states: list = []
    capture_states(states)
    code = train_snac.main(train_args)
    state = states[-1]
    snapshot = {
        "generator": {k: v.detach().cpu().clone() for k, v in state.generator.state_dict().items()},
        "discriminator": {k: v.detach().cpu().clone() for k, v in state.discriminator.state_dict().items()},
        "step": state.step,
        "collective_calls": calls,
    }
    torch.save(snapshot, out / f"rank{rank}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
