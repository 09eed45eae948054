"""tools/gpu_check.py: its code paths run in CI on the CPU with --tiny; without a GPU the full run stops at once.

The figures of a tiny CPU run mean nothing (the script says so); what is checked is that every measurement runs,
for ours and diffusers, and that the JSON holds each figure, with "n/a (no CUDA)" where only CUDA can measure.
"""
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402 (tools/ is not a package)


def run_script(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})})


def test_without_cuda_fails_fast_with_one_line():
    """CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too. The bound: importing torch
    (~2-5 s on a loaded 2-core machine) and nothing else -- diffusers is imported only after the check."""
    start = time.perf_counter()
    run = run_script(env={"CUDA_VISIBLE_DEVICES": ""})
    assert time.perf_counter() - start < 30
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == ("error: no CUDA GPU is visible to torch here; run on a GPU machine, or use --tiny to check "
                          "the script\n")


def test_bad_json_folder_is_refused_before_any_work(tmp_path):
    run = run_script("--tiny", "--device", "cpu", "--json", str(tmp_path / "no" / "figures.json"))
    assert run.returncode == 2 and run.stderr == f"error: --json {tmp_path / 'no' / 'figures.json'}: the folder " \
                                                 f"{tmp_path / 'no'} does not exist\n"


def test_tiny_run_on_the_cpu_measures_everything(tmp_path, capsys):
    path = tmp_path / "figures.json"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--steps", "1", "--runs", "1", "--json", str(path)]) == 0
    figures = json.loads(path.read_text())
    assert figures["device"] == "cpu" and figures["dtype"] == "float32" and figures["mode"].startswith("tiny")
    for side in ("ours", "diffusers"):
        result = figures[side]
        assert result["ti_step_peak"]["allocated_gib"] == result["ti_step_peak"]["reserved_gib"] == "n/a (no CUDA)"
        assert result["ti_steps_per_s"] > 0
        assert set(result["txt2img_images_per_s"]) == {"batch 1", "batch 4"}
        assert all(v > 0 for v in result["txt2img_images_per_s"].values())
        assert result["fp16_sanity_no_nan"]["sd21 (upcast)"] is True
    assert 0 < figures["ours"]["ti_step_peak"]["estimated_gib"] < 1   # the tiny model's step, estimated
    captured = capsys.readouterr()
    assert "TI steps/s" in captured.out and "txt2img images/s, batch 4" in captured.out
    assert "n/a (no CUDA)" in captured.out
    # a line per figure on stderr as it is measured, in the order measured, each with the time since the start
    progress = [line.split("] ", 1)[1] for line in captured.err.splitlines() if line.startswith("[")]
    assert progress[0].startswith("building tiny sd2-base models") and len(progress) == 9, progress
    assert progress[1].startswith("ours: text-to-image, batch 1: ") and progress[-1].startswith(
        "diffusers: textual-inversion step: ")


def test_tiny_run_says_what_it_does_within_seconds():
    """--tiny ran a minute and a half before its first line (the table at the end, or a library warning). Now a
    line comes before the models are built: after importing torch (~2-5 s on a loaded 2-core machine; bound 30 s)."""
    process = subprocess.Popen([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--tiny", "--device", "cpu",
                                "--steps", "1", "--runs", "1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    start, first = time.perf_counter(), ""
    try:
        while not first.startswith("[") and time.perf_counter() - start < 30:
            if select.select([process.stderr], [], [], 1.0)[0]:
                first = process.stderr.readline()
        took = time.perf_counter() - start
    finally:
        process.kill()   # the rest is test_tiny_run_on_the_cpu_measures_everything's
        process.wait()
    assert first.startswith("[") and "building tiny sd2-base models" in first and took < 30, (first, took)


def test_image_conditioned_tiny_run_measures_a_step_and_a_variation(tmp_path, capsys):
    """--condition dinov2: the image-conditioned training step and one variation, ours and diffusers', each timed
    (the projection's path too: the tiny encoder is 48 wide, the context 64), with the peak memory n/a without
    CUDA; a progress line per figure."""
    path = tmp_path / "figures.json"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--condition", "dinov2", "--steps", "1", "--runs", "1",
                           "--json", str(path)]) == 0
    figures = json.loads(path.read_text())
    assert figures["mode"].startswith("tiny") and figures["encoder"].endswith("projected")
    for side in ("ours", "diffusers"):
        assert figures[side]["step_s"] > 0 and figures[side]["variation_s"] > 0
        assert figures[side]["step_peak"]["allocated_gib"] == "n/a (no CUDA)"
    captured = capsys.readouterr()
    assert "training step (s)" in captured.out and "one variation, 1 steps (s)" in captured.out
    progress = [line.split("] ", 1)[1] for line in captured.err.splitlines() if line.startswith("[")]
    assert progress[0].startswith("building tiny image-conditioned (dinov2) sd15 models") and len(progress) == 5


def test_image_conditioned_mode_refuses_sd2_in_one_line():
    run = run_script("--tiny", "--device", "cpu", "--condition", "dinov2", "--model", "sd2-base")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == ("error: --model sd2-base: --condition dinov2 measures SD1's networks (the paper's model); "
                          "leave out --model, or give --model sd15\n")
