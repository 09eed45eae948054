"""Config JSON of the wrong shape or types: one line naming the file and the key, never a traceback from torch.

Each case was a traceback before (TypeError in a dataclass, a GroupNorm or reshape error while building, NaN
images for scale_factor 0); each is built from TINY_CONFIG so that only the named key is wrong.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

import minisd
from conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parent.parent


def changed(section, key, value) -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    (config.setdefault(section, {}) if section else config)[key] = value
    return config


CASES = [
    ([1, 2], "a config is a JSON object"),
    ("sd2-base", "a config is a JSON object"),
    ({"unet": 5}, "unet must be an object of fields"),
    ({"vae": [1]}, "vae must be an object of fields"),
    (changed("unet", "model_channels", "32"), 'unet.model_channels must be a positive integer, not "32"'),
    (changed("unet", "model_channels", 32.0), "unet.model_channels must be a positive integer, not 32.0"),
    (changed("unet", "num_res_blocks", True), "unet.num_res_blocks must be a positive integer, not true"),
    (changed("vae", "ch", -32), "vae.ch must be a positive integer, not -32"),
    (changed("text", "layers", 0), "text.layers must be a positive integer, not 0"),
    (changed("unet", "use_linear_in_transformer", 1), "unet.use_linear_in_transformer must be true or false"),
    (changed("unet", "channel_mult", 2), "unet.channel_mult must be a non-empty list of positive integers"),
    (changed("unet", "channel_mult", []), "unet.channel_mult must be a non-empty list"),
    (changed("unet", "attention_resolutions", ["4"]), "unet.attention_resolutions must be a non-empty list"),
    (changed(None, "resolution", "big"), 'resolution must be a positive integer, not "big"'),
    (changed(None, "resolution", 500), "resolution 500 is not a multiple of 32"),
    (changed(None, "prediction", "x0"), 'prediction must be "eps" or "v"'),
    (changed(None, "scale_factor", 0), "scale_factor must be a positive finite number"),
    (changed(None, "scale_factor", -0.18215), "scale_factor must be a positive finite number"),
    (changed(None, "scale_factor", "0.18215"), "scale_factor must be a positive finite number"),
    # where the lengths matter: a factor no level of channel_mult has would silently add no attention
    (changed("unet", "channel_mult", [1, 2]), "unet.attention_resolutions has 4, which matches no level"),
    (changed("unet", "model_channels", 40), "unet.model_channels 40 x channel_mult [1, 2, 2, 2]"),
    (changed("vae", "ch", 16), "not multiples of 32, the GroupNorm group count"),
    (changed("unet", "num_head_channels", 24), "unet.num_head_channels 24 does not divide"),
    (changed("text", "heads", 5), "the text tower's 5 heads do not divide its width 32"),
    (changed("text", "context_length", 64), "the text tower's context length must be 77"),
]


@pytest.mark.parametrize("data, words", CASES, ids=[words[:40] for _, words in CASES])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, data, words):
    path = tmp_path / "my-config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(minisd.LoadError) as info:
        minisd.load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def test_scale_factor_nan_is_refused(tmp_path):
    # json.dumps writes NaN, which Python's json reads back: the file form people produce by accident
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(changed(None, "scale_factor", float("nan"))))
    with pytest.raises(minisd.LoadError, match="scale_factor must be a positive finite number .*, not NaN"):
        minisd.load_config(path)


def test_valid_configs_still_load():
    for name in minisd.presets():
        minisd.load_config(name)
    cfg = minisd.load_config(changed(None, "scale_factor", 1))   # an int is a number
    assert cfg.scale_factor == 1 and cfg.unet.channel_mult == (1, 2, 2, 2)


def test_cli_user_sees_one_line(tmp_path):
    """Through medti.cli's wrapper: `error: <file>: <key> ...` on stderr, exit 2, no traceback."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"unet": 5}))
    code = ("import sys, minisd; from medti.cli import run_main; import argparse; "
            "sys.exit(run_main(argparse.ArgumentParser(), lambda a: minisd.load_config(sys.argv[1]), []))")
    run = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith(f"error: {path}: unet must be an object")
    assert run.stderr.count("\n") == 1
