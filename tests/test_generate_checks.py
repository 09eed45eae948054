"""Issue 11's generation defects that are caught before any sampling: every one is refused in one line that
names the flag (or variable, or file) in CLI words, with no traceback and no file or empty folder left behind."""
import os
import subprocess
import sys

import pytest
from PIL import Image
from test_generate import generate, model_files  # noqa: F401 (the fixture is used by name)

from medti.files.atomic import claim_folder
from medti.generate import main


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra,env,words", [
    (["--seed", str(2 ** 70)], {}, "torch takes seeds in [0, 2**64)"),
    (["--seed", str(2 ** 64 - 2), "--n", "3"], {}, "must be at most 18446744073709551613"),   # seed + 2 overflows
    (["--seed", "-1"], {}, "--seed -1: torch takes seeds"),
    (["--device", "banana"], {}, "--device 'banana': not a device"),
    (["--device", "cuda"], {}, "--device cuda: no CUDA GPU"),   # this machine has no GPU (a CPU build of torch)
    ([], {"WORLD_SIZE": "0"}, "WORLD_SIZE='0': must be a whole number >= 1"),
    ([], {"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc': must be a whole number"),
    ([], {"RANK": "3", "WORLD_SIZE": "2"}, "RANK must be below WORLD_SIZE (0 to 1)"),
    (["--cfg", "nan", "--save-latents"], {}, "--cfg nan: must be a finite number"),
    (["--cfg", "1e39"], {}, "--cfg 1e+39: must be a finite number"),
    (["--prompt", "a :1000000000000000000000000000000000000000"], {}, "weight 1e+39: must be a finite number"),
    (["--sweep", "a", "b", "--weights", "nan,inf"], {}, "--weights: weight nan"),
    (["--mask-blur", "nan"], {}, "--mask-blur nan: must be finite"),
    (["--paste-back"], {}, "--paste-back needs --init-image and --mask"),
    # step counts a schedule of 1,000 training timesteps cannot do: DPM++ 2M divided by zero, DDIM stood still
    (["--sampler", "dpmpp_2m", "--sigmas", "leading", "--steps", "1000"], {}, "--steps 1000: the leading spacing"),
    (["--sampler", "dpmpp_2m", "--sigmas", "trailing", "--steps", "2500"], {}, "takes at most 1000 steps with it"),
    (["--sampler", "ddim", "--steps", "1001"], {}, "--steps 1001: the linspace spacing has 1,000 training"),
    (["--steps", str(10 ** 9)], {}, "--steps 1000000000: give 1 to 10,000 steps"),
    (["--width", "100000"], {}, "--width 100000: must be from 1 to 4096 pixels"),   # before: sampled for minutes
    (["--size", "0"], {}, "--size 0: must be from 1 to 4096 pixels"),   # before: 0 was taken as "not given"
    # text in another encoding than UTF-8 (b"\xff" arrives as U+DCFF): a TypeError from the tokenizer, after loading
    (["--prompt", os.fsdecode(b"\xff")], {}, "--prompt '\\udcff': not UTF-8 text (byte 0xff)"),
    (["--negative=" + os.fsdecode(b"\xff")], {}, "--negative '\\udcff': not UTF-8 text (byte 0xff)"),
    (["--prompt", "a AND"], {}, "--prompt 'a AND': term 2 of 2 ('') has no text"),   # named no flag
])
def test_refused_up_front_in_one_line(model_files, tmp_path, capsys, monkeypatch, extra, env, words):  # noqa: F811
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    prompt = [] if "--prompt" in extra or "--sweep" in extra else ["--prompt", "x"]
    assert generate(model_files, tmp_path / "o", *prompt, *extra) == 2
    assert words in one_line_error(capsys)
    assert not (tmp_path / "o").exists()   # checked before the folder is made


@pytest.mark.parametrize("out,words", [
    ("{tmp}/file.txt", "exists and is not a folder"),
    ("/proc/medti-out", "cannot write there"),           # procfs: no folder can be made there
    ("/sys/medti-out", "cannot write there"),            # sysfs: refuses writes even to root, like a read-only fs
])
def test_unusable_out_is_one_line(model_files, tmp_path, capsys, out, words):  # noqa: F811
    (tmp_path / "file.txt").write_text("")
    assert generate(model_files, out.replace("{tmp}", str(tmp_path)), "--prompt", "x") == 2
    assert words in one_line_error(capsys)


def test_failed_run_leaves_no_empty_folder(model_files, tmp_path, capsys):  # noqa: F811
    """The folder is claimed before the model loads; an error found after that (an unknown token) removes it."""
    assert generate(model_files, tmp_path / "new" / "o", "--prompt", "<nope> x") == 2
    assert "matches no loaded embedding" in one_line_error(capsys)
    assert not (tmp_path / "new" / "o").exists()


def test_second_run_on_one_out_is_refused(model_files, tmp_path, capsys):  # noqa: F811
    """Another run holds --out (here this process, through its own open file: flock locks are per open file, so
    the kernel refuses the second claim exactly as it would for another process)."""
    with claim_folder(tmp_path / "o"):
        assert generate(model_files, tmp_path / "o", "--prompt", "x") == 2
    assert "another run is writing there now" in one_line_error(capsys)
    assert not list((tmp_path / "o").glob("*.png"))


@pytest.mark.parametrize("extra,words", [
    (["--size", "4096", "--batch", "100000"], "needs about"),
    (["--init-image", "{tmp}/bomb.png"], "bomb.png: too many pixels to open safely"),
    (["--init-image", "{tmp}/square.png", "--mask", "{tmp}/bomb.png"], "bomb.png: too many pixels"),
    (["--init-image", "{tmp}/stack.tif"], "stack.tif: holds 3 frames"),
    (["--init-image", "{tmp}/lab.tif"], "lab.tif: mode LAB"),
    (["--init-image", "{tmp}/square.png", "--mask", "{tmp}/square.png", "--mask-blur", "1e9"],
     "--mask-blur 1e+09: at most 64 pixels"),
    # before: the whole 20,000 characters quoted, and no flag named
    (["--prompt", "x " * 10000], "x x' (19,999 characters) holds 10,000 tokens"),
    (["--negative", "x " * 100], "--negative: term 'x x x"),
])
def test_refused_after_loading_in_one_line(model_files, tmp_path, capsys, extra, words):  # noqa: F811
    Image.new("L", (64, 64)).save(tmp_path / "square.png")
    # a decompression bomb: 20,000 x 20,000 = 400 Mpx, over twice PIL's 89 Mpx limit; a 1-bit PNG of ~50 kB
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    Image.new("L", (64, 64)).save(tmp_path / "stack.tif", save_all=True, append_images=[Image.new("L", (64, 64))] * 2)
    Image.new("LAB", (64, 64)).save(tmp_path / "lab.tif")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert generate(model_files, tmp_path / "o", "--prompt", "x", *extra) == 2
    err = one_line_error(capsys)
    assert words in err
    if "x " * 10000 in extra:   # the flag, and a quote cut short (the term: 10,000 "x" and the spaces between)
        assert err.startswith("error: --prompt: term 'x x x") and len(err) < 250, err
    if "--batch" in extra:   # both numbers: what the run needs and what the machine has
        assert "available" in err and err.count(" TB") + err.count(" GB") == 2, err
    assert not (tmp_path / "o").exists()


def test_help_shows_defaults_and_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 100)", "(default: 2.0)", "(default: euler_a)", "(default: sd2-base)",
                    "(default: 0,0.25,0.5,0.75,1)", "(default: False)"):
        assert default in text, default
    assert "example: python -m medti.generate" in text and "None" not in text


def test_cli_process_prints_no_traceback_for_a_bad_environment(model_files, tmp_path):  # noqa: F811
    model, config = model_files
    result = subprocess.run([sys.executable, "-m", "medti.generate", "--model", str(model), "--config", str(config),
                             "--prompt", "x", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "RANK": "abc", "WORLD_SIZE": "2"}, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "RANK='abc'" in result.stderr


def test_memory_estimate_follows_the_fake_tensor_count():
    """preflight.estimate_bytes (a formula, instant) against tools/memory_estimate.py (the real pipeline on fake
    tensors) for full-size SD2-base at 256², fp16, CFG, unpacked. The formula's constants are that tool's 512²
    counts rounded up, so it must be at least the fake count and at most 30 % above it (the rounding up of the
    constants is 6-8 %; the rest is margin for the count changing with the pixel count, which it does not)."""
    sys.path.insert(0, "tools")
    import torch

    import minisd
    from medti.generation.preflight import estimate_bytes
    from memory_estimate import estimate_generation
    counted = estimate_generation(256, dtype=torch.float16)
    sd = minisd.build(minisd.load_config("sd2-base"), device="meta")   # shapes only
    sd.unet.half(), sd.vae.half()
    ours = estimate_bytes(sd, 256, 256, rows=2, images=1, packed=False)
    fake = max(counted["sampler_step"], counted["vae_decode"])
    assert fake <= ours <= 1.3 * fake, (ours, counted)


def test_an_init_image_s_library_warnings_are_not_printed(tmp_path):
    """PIL's "Corrupt EXIF data" warning came as two stderr lines before the one-line refusal of such a TIFF."""
    import warnings

    import numpy as np

    from medti.files.images import ImageError, open_image
    path = tmp_path / "random.tif"   # a little-endian TIFF header, then no valid IFD (tools/hostile_files.py's)
    path.write_bytes(b"II*\x00" + np.random.default_rng(2).integers(0, 256, 500, np.uint8).tobytes())
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="random.tif: not a readable image"):
            open_image(path)
    assert [str(w.message) for w in escaped] == []
