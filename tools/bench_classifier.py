"""Seconds per image of one --classifier finetune epoch on this machine: a training step (forward, backward, AdamW)
and a validation forward, for the full DenseNet-121 and for the tiny one the tests train. Random weights and images:
the cost does not depend on their values.

    OMP_NUM_THREADS=1 python tools/bench_classifier.py [--batch 8] [--steps 3]
"""
import argparse
import time

import numpy as np
import torch

from medti.downstream import finetune
from minisd.densenet import DenseNetConfig

TINY = DenseNetConfig(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)


def per_image(config: DenseNetConfig, batch: int, steps: int) -> tuple:
    """(training seconds per image, validation seconds per image): the median of `steps` batches after one warm-up."""
    model = finetune.Finetune(finetune.Settings(config=config)).new(2, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    x = torch.randn(batch, 1, 224, 224) * 500
    y = (torch.rand(batch, 2) < 0.5).float()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model.train()
        finetune.train_step(model, opt, x, y)
        times.append(time.perf_counter() - start)
    val = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        finetune.predict(model, x.half().numpy(), batch)
        val.append(time.perf_counter() - start)
    return float(np.median(times[1:])) / batch, float(np.median(val[1:])) / batch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}")
    for name, config in (("tiny", TINY), ("DenseNet-121", DenseNetConfig())):
        train, val = per_image(config, args.batch, args.steps)
        epoch = 0.8 * train + 0.2 * val   # a fifth of a training set's images validate (finetune.VALIDATION_FOLDS)
        print(f"{name}: train {train:.4f} s/image, validation {val:.4f} s/image, one epoch {epoch:.4f} s per image "
              "of a training set")


if __name__ == "__main__":
    main()
