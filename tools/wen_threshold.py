"""Where the model-side memorization signal's default ratio comes from (docs/privacy-audit.md, "Does the model
itself remember?"): tiny models of the demo's architecture, one per model seed, each with three tokens trained by
medti.train as tests/test_memorization.py trains them (<mem>: one phantom, 300 steps; <gen>: 24 phantoms, 30 steps;
<long>: 24 phantoms, 300 steps; the phantoms and medti.train's --seed follow the model seed, so seed 0 is the tests'
models), scored with medti.audit's defaults: first step, 4 seeds, the default baseline prompts. Prints
each token's signal and its ratio to the baseline's highest signal.

    python tools/wen_threshold.py [model seeds, default 0 1 2]
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

from medti.audit import main as audit
from medti.quality.audit_model import BASELINE
from medti.train import main as train
from medti.training.demo import phantoms, tiny_model

TOKENS = (("mem", "one", 300), ("gen", "many", 30), ("long", "many", 300))


def measure(root: Path, seed: int) -> dict:
    """{token: (signal, ratio)} on the tiny model of this seed."""
    model, config = tiny_model(root / "model", seed=seed)
    phantoms(root / "many", 24, seed)
    (root / "one").mkdir()
    shutil.copy(root / "many" / "phantom000.png", root / "one")
    for token, data, steps in TOKENS:
        assert train(["--model", str(model), "--config", str(config), "--data", str(root / data), "--token",
                      f"<{token}>", "--vectors", "4", "--lr", "0.02", "--max-steps", str(steps), "--resolution", "64",
                      "--preview-every", "0", "--save-every", str(steps), "--checkpointing", "off", "--seed",
                      str(seed), "--out", str(root / token)]) == 0
    embeddings = [w for t, _, _ in TOKENS for w in ("--embeddings", str(root / t / f"{t}.safetensors"))]
    assert audit(["--model", str(model), "--config", str(config), "--out", str(root / "audit"), *embeddings]) == 0
    result = json.loads((root / "audit" / "memorization.json").read_text())
    rows = result["prompts"] + result["baseline"]["prompts"]
    return {row["prompt"]: (row["signal"], row["ratio"]) for row in rows}


def main(seeds: list) -> None:
    print(f"baseline: {', '.join(BASELINE)}")
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            found = measure(Path(tmp), seed)
        print(f"model seed {seed}: " + "; ".join(f"{p} {s:.3f} (ratio {r:.3f})" for p, (s, r) in found.items()),
              flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [0, 1, 2])
