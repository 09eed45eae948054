"""The image-conditioned demo (`python -m medti.train --demo --condition dinov2`), run as a user types it: it trains
on its phantoms, the held-out loss falls, both commands it prints then work as printed (variations of a held-out
phantom, and their audit, which finds the held-out source through --sources), and a second run into the same folder
is refused in one line."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python(args: list, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=ROOT, **kwargs)


def test_the_image_demo_trains_and_its_commands_work(tmp_path):
    out = tmp_path / "demo-dino"
    demo = ["-m", "medti.train", "--demo", "--condition", "dinov2", "--max-steps", "100", "--out", str(out)]
    first = python(demo)
    assert first.returncode == 0, first.stderr[-2000:]
    line = next(x for x in first.stdout.splitlines() if x.startswith("held-out denoising loss"))
    before, after = (float(line.split(word)[1].split()[0]) for word in ("starting model", "-> trained"))
    assert after < 0.95 * before, line   # the bar for "a tiny model learns": 5 % in a few hundred steps
    metadata = json.loads((out / "model.safetensors").read_bytes()[8:][:int.from_bytes(
        (out / "model.safetensors").read_bytes()[:8], "little")])["__metadata__"]
    assert json.loads(metadata["image_condition"])["projection"] is True   # 48 into 64: the projection trained
    commands = [x.strip() for x in first.stdout.splitlines() if x.strip().startswith("python -m medti.")]
    assert [shlex.split(c)[2] for c in commands] == ["medti.generate", "medti.audit"]
    for command in commands:
        done = python(shlex.split(command)[1:])
        assert done.returncode == 0, (command, done.stderr[-2000:])
    assert len(list((out / "variations").glob("0*.png"))) == 4
    audit = json.loads((out / "audit" / "audit.json").read_text())
    found = audit["summary"]["variations"]
    assert found["variations"] == 4 and found["sources"] == 1 and found["not_found"] == []   # one held-out case
    again = python(demo)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0, again.stderr
    assert f"--out {out} holds a run already" in again.stderr
