"""Data-parallel training on several processes: `torchrun --nproc_per_node N -m medti.train -- ...` (PyTorch DDP's
scheme, written out: every rank holds the whole model and the same trained tensors; each draws the step's whole
batch from --seed, exactly as one process would, and keeps its share of the rows; the gradients are averaged over
the ranks before the optimizer step, so every rank takes the same step). gloo on the CPU, NCCL on CUDA. Only rank 0
writes files. The state saved is the same whatever the number of processes, so --resume works with any N that
divides --batch.

Why not torch.nn.parallel.DistributedDataParallel: it wraps one module's parameters, while what trains here is the
method's (a token's vectors, adapters, the UNet's weights: medti.training.methods), and it overlaps communication with
the backward pass, which on a CPU with gloo buys little. One all_reduce per trained tensor after the micro-batches is
the same arithmetic, visible in the loop.

Equality with one process: the mean of N equal shares' mean losses is the whole batch's mean loss, and so for the
gradients; they differ from one process by float rounding only (tests/test_train_ddp.py states the bound).
"""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..cli import torchrun_world
from . import TrainError


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (checked by medti.cli.torchrun_world); (0, 1) for a plain
    process."""
    return torchrun_world()


def check_launch():
    """Several ranks meet at MASTER_ADDR:MASTER_PORT (torchrun sets both): without them init_process_group fails
    with a traceback after the model has loaded, so it is checked with the settings."""
    size = world()[1]
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if size > 1 and not os.environ.get(name)]
    if missing:
        raise TrainError(f"environment variable {missing[0]} is not set, but WORLD_SIZE={size}: start several "
                         "processes with torchrun (it sets it), or unset RANK and WORLD_SIZE to run one")


def local_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (torchrun's LOCAL_RANK: the process's index on its machine); the CPU is shared."""
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


@contextmanager
def process_group(device: torch.device):
    """The process group for the run's lifetime when there are several ranks; nothing for one process."""
    if world()[1] == 1:
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def share(rows: int) -> slice:
    """This rank's rows of a batch of `rows` (a multiple of the world size: checked with the settings)."""
    rank, size = world()
    return slice(rank * rows // size, (rank + 1) * rows // size)


def average_grads(params):
    """Every rank's gradients replaced by their mean over the ranks (a weight without a gradient has none on
    every rank: the same loss reaches the same weights)."""
    if world()[1] == 1:
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world()[1]


def mean(value: float) -> float:
    """A number's mean over the ranks (the step's loss, for the log)."""
    if world()[1] == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item() / world()[1]


def barrier():
    if world()[1] > 1:
        dist.barrier()


def main_process() -> bool:
    """Rank 0: the one that writes files."""
    return world()[0] == 0
