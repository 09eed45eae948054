"""What `--classifier finetune` costs, said before it starts, and which weights it starts from.

CPU_EPOCH_SECONDS was measured with tools/bench_classifier.py (OMP_NUM_THREADS=1, batch 8, random weights: the cost
does not depend on them) on one core of an Intel Xeon (2 vCPUs, AVX-512), torch 2.14.1: one epoch of the full
DenseNet-121 costs 0.8 training steps (forward, backward, AdamW) and 0.2 validation forwards per image of a training
set, since a fifth of its patients validate. docs/performance.md has the table and how it extrapolates.
"""
from ..quality.features import FEATURES
from .inputs import UtilityError

CPU_EPOCH_SECONDS = 0.3   # per image of a training set, one thread: two runs gave 0.23 and 0.32 (a shared CPU)


def finetune_weights(values: list) -> dict:
    """--encoder's values for finetune: at most one, torchxrayvision's DenseNet-121 (`xrv=FILE` or a bare FILE)."""
    if len(values) > 1:
        raise UtilityError(f"--encoder {values[1]}: --classifier finetune starts from one network's weights; give "
                           "--encoder xrv=FILE once")
    if not values:
        return {}
    kind, _, where = values[0].partition("=")
    if kind in FEATURES and where:
        if kind != "xrv":
            raise UtilityError(f"--encoder {values[0]}: --classifier finetune trains torchxrayvision's DenseNet-121, "
                               f"not {kind}; give --encoder xrv=FILE, or leave --encoder out for a random start")
        return {"xrv": where}
    return {"xrv": values[0]}


def _training_images(plan, counts: dict) -> int:
    """Images summed over every training of the run (each trains `epochs` at most), as harness.run draws them."""
    real, synthetic = counts["real"], counts.get("synthetic", 0)
    pool = real if "test" in counts else real * (plan.folds - 1) // plan.folds   # a fold's training part
    per_fold = 0
    for n in [pool if s == "all" else s for s in plan.sizes if s == "all" or s <= pool]:
        per_fold += n   # real only
        if synthetic and "pretrain" in plan.settings:
            per_fold += n   # the synthetic network continued on the real images
        if synthetic and "mixed" in plan.settings:
            per_fold += sum(n + min(r * n, synthetic) for r in plan.ratios)
    return per_fold * plan.folds + synthetic   # the synthetic network: trained once for every fold


def cpu_estimate(plan, counts: dict, epochs: int) -> str:
    """One line: what the run costs on a CPU at most (every training to `epochs`)."""
    seconds = _training_images(plan, counts) * epochs * CPU_EPOCH_SECONDS
    return (f"--classifier finetune on a CPU: at most {seconds / 3600:.1f} hours at one thread for this run "
            f"({CPU_EPOCH_SECONDS} s per image per epoch of a DenseNet-121, up to --epochs {epochs}; early stopping "
            "usually ends sooner); see docs/utility.md")
