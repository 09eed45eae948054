"""The speed of a linear-probe utility run on planted features: 2,000 real images (400 of them per fold's test part),
2,000 synthetic ones, 768 features (DINOv2 ViT-B's width), settings real, synthetic, mixed 1:1 and 1:5, pretrain at
regimes 50, 100, 500, all: 5 x 4 = 20 (setting, regime) cells x 5 folds, with every statistic of the report.

    OMP_NUM_THREADS=1 python tools/bench_utility.py
"""
import time

import numpy as np

from medti.downstream import harness, summary


def planted(n: int, dim: int, seed: int) -> harness.Data:
    g = np.random.default_rng(seed)
    y = g.random(n) < 0.5
    return harness.Data(g.normal(size=(n, dim)) + 0.1 * y[:, None], y[:, None], [f"p{seed}-{i}" for i in range(n)])


def main():
    real, synthetic = planted(2000, 768, 0), planted(2000, 768, 1)
    plan = harness.Plan(settings=("real", "synthetic", "mixed", "pretrain"), ratios=(1, 5), sizes=(50, 100, 500, "all"))
    start = time.perf_counter()
    result = harness.run(real, synthetic, None, plan, ["positive"])
    fitted = time.perf_counter()
    summary.table(result, ["positive"], 0)
    done = time.perf_counter()
    print(f"{len(result.names)} settings x {len(result.regimes)} regimes x {plan.folds} folds: probes "
          f"{fitted - start:.1f} s, statistics {done - fitted:.1f} s, total {done - start:.1f} s")


if __name__ == "__main__":
    main()
