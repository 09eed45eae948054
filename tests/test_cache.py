"""The on-disk latent cache: `python -m medti.data encode` writes shards that hold exactly the in-memory cache's rows,
a run from them (`python -m medti.train --cache`) is bit-identical on the CPU to a run from the folder, a stopped
encode resumes, and what cannot be trained on is refused in one line. The references are computed independently:
the in-memory cache (medti.training.objective.cache_latents of load_dataset's images) and a run from --data."""
import json

import pytest
import torch
from test_image_conditioning import encoder_release
from test_train import kill_and_resume

import minisd
from medti.data import main as data_main
from medti.dataset.folder import load_dataset
from medti.train import main as train_main
from medti.training.cache_read import ShardCache, read_manifest
from medti.training.demo import phantoms, tiny_model
from medti.training.objective import cache_latents, cache_tokens
from minisd.dino_load import load_encoder
from minisd.image_conditioning import attach

IMAGES = 6   # not a multiple of the shard size: the last shard is short, and with --flip a chunk of 4 in the whole
#              set would straddle images and mirror images if cache_latents did not chunk each part on its own


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    model, config = tiny_model(folder / "model")
    return folder, ["--model", str(model), "--config", str(config), "--resolution", "64"], phantoms(
        folder / "data", IMAGES, seed=0)


def encode(tiny, out, *extra):
    folder, model, data = tiny
    return data_main(["encode", "--data", str(data), *model, "--shard-size", "4", "--out", str(out), *extra])


def train(tiny, out, *extra):
    return train_main([*tiny[1], "--token", "<t>", "--vectors", "2", "--batch", "2", "--max-steps", "4",
                       "--save-every", "2", "--preview-every", "0", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def flipped(tiny):
    out = tiny[0] / "flipped"
    assert encode(tiny, out, "--flip", "--seed", "5") == 0
    return out


def test_shards_hold_the_in_memory_cache_rows(tiny, flipped):
    folder, model, data = tiny
    sd = minisd.load(model[1], config=model[3])
    reference = cache_latents(sd, load_dataset(data, 64).images, True, 5)
    cache = ShardCache(flipped, read_manifest(flipped))
    assert len(cache["mean"]) == 2 * IMAGES and cache["captions"] == [""] * IMAGES
    rows = list(range(2 * IMAGES))
    for name in ("mean", "logvar", "once"):
        assert torch.equal(cache[name][rows], reference[name]), name
    assert torch.equal(cache["once"][[7, 2]], reference["once"][[7, 2]])   # any rows, in any order


@pytest.mark.parametrize("latents", ["once", "random"])
def test_a_run_from_the_cache_is_the_run_from_the_folder(tiny, flipped, tmp_path, latents):
    common = ["--flip", "--seed", "5", "--latents", latents]
    assert train(tiny, tmp_path / "folder", "--data", str(tiny[2]), *common) == 0
    assert train(tiny, tmp_path / "cache", "--cache", str(flipped), *common) == 0
    assert (tmp_path / "folder" / "t.safetensors").read_bytes() == (tmp_path / "cache" / "t.safetensors").read_bytes()


def test_a_run_from_the_cache_says_what_it_trains_on(tiny, flipped, tmp_path, capsys):
    """One line, as a run from --data has (it said nothing, after hashing every shard in silence): the counts are
    those the --data summary gives for the same folder."""
    capsys.readouterr()
    assert train(tiny, tmp_path / "folder", "--data", str(tiny[2]), "--flip", "--seed", "5") == 0
    folder_line = capsys.readouterr().out.splitlines()[0]
    assert f"{IMAGES} image(s)" in folder_line and f"{IMAGES} patient(s)" in folder_line, folder_line
    assert train(tiny, tmp_path / "cache", "--cache", str(flipped), "--flip", "--seed", "5") == 0
    assert capsys.readouterr().out.splitlines()[0] == (f"--cache: {IMAGES} image(s) of {IMAGES} patient(s) in 2 "
                                                       "shard(s), each matching its sha256, with their mirror images "
                                                       "(--flip)")


def test_a_run_from_the_cache_resumes_bit_identically(tiny, flipped, tmp_path):
    common = ["--cache", str(flipped), "--flip", "--seed", "5"]
    assert train(tiny, tmp_path / "whole", *common) == 0
    # stopped after step 3 (its last save: step 2, mid-epoch: 6 images, 2 per step, 2 steps done), then resumed
    assert train(tiny, tmp_path / "part", *common, "--max-steps", "3") == 0
    assert train(tiny, tmp_path / "part", *common, "--resume") == 0
    assert (tmp_path / "whole" / "t.safetensors").read_bytes() == (tmp_path / "part" / "t.safetensors").read_bytes()


def test_a_stopped_encode_resumes_and_keeps_verified_shards(tiny, flipped, tmp_path, capsys):
    out = tmp_path / "cache"
    assert encode(tiny, out, "--flip", "--seed", "5") == 0
    (out / "manifest.json").unlink()          # as if killed before the manifest ...
    (out / "shard-00001.json").unlink()       # ... and before shard 1's record
    capsys.readouterr()
    assert encode(tiny, out, "--flip", "--seed", "5") == 0
    assert "1 shard(s) encoded, 1 kept" in capsys.readouterr().out
    raw = bytearray((out / "shard-00000.safetensors").read_bytes())
    raw[-1] ^= 1                              # a changed byte: its record no longer vouches for it
    (out / "shard-00000.safetensors").write_bytes(bytes(raw))
    (out / "manifest.json").unlink()
    assert encode(tiny, out, "--flip", "--seed", "5") == 0
    assert "1 shard(s) encoded, 1 kept" in capsys.readouterr().out
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "manifest.json"):
        assert (out / name).read_bytes() == (flipped / name).read_bytes(), name


def test_encode_says_how_far_it_is(tiny, tmp_path, capsys):
    """A line per shard (on a terminal one line rewritten): an archive's encode takes hours, and was silent."""
    out = tmp_path / "cache"
    assert encode(tiny, out) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"--data ({IMAGES} file(s)): 4 image(s) read; shard-00000.safetensors encoded",
                     f"--data ({IMAGES} file(s)): {IMAGES} image(s) read; shard-00001.safetensors encoded"]
    (out / "manifest.json").unlink()
    (out / "shard-00001.json").unlink()
    assert encode(tiny, out) == 0
    assert capsys.readouterr().err.splitlines()[0].endswith("shard-00000.safetensors kept from an earlier run")


def test_the_manifest_names_no_path(tiny, flipped):
    text = (flipped / "manifest.json").read_text()
    assert str(tiny[0]) not in text and "phantom" not in text
    assert "phantom000.png" in (flipped / "names.private.tsv").read_text()


def refusal(tiny, capsys, *args) -> str:
    capsys.readouterr()
    assert train(tiny, tiny[0] / "refused", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert not (tiny[0] / "refused").exists()
    return err


def test_refusals(tiny, flipped, tmp_path, capsys):
    cache = ["--cache", str(flipped), "--seed", "5", "--flip"]
    assert "--resolution 32: --cache" in refusal(tiny, capsys, *cache, "--resolution", "32")
    # switches in the words the user types: "add --flip" to a run that left it out, never "--flip False"
    assert refusal(tiny, capsys, *cache[:-1]).endswith(f"--cache {flipped} was encoded with --flip; add --flip, or "
                                                       "encode another cache without it")
    assert "encoded with --preprocess center" in refusal(tiny, capsys, *cache, "--preprocess", "cxr")
    assert "drew its --latents once samples with --seed 5" in refusal(tiny, capsys, "--cache", str(flipped), "--flip")
    assert "--val-fraction with --cache" in refusal(tiny, capsys, *cache, "--val-fraction", "0.5")
    assert "give one of them" in refusal(tiny, capsys, *cache, "--data", str(tiny[2]))
    other, config = tiny_model(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert train_main(["--model", str(other), "--config", str(config), "--token", "<t>", *cache, "--out",
                       str(tmp_path / "r")]) == 2
    assert "encoded with another model" in capsys.readouterr().err


def test_a_switch_or_an_empty_value_is_named_as_typed(tiny, tmp_path, capsys):
    plain = tmp_path / "plain"
    assert encode(tiny, plain) == 0
    cache = ["--cache", str(plain)]
    assert refusal(tiny, capsys, *cache, "--flip").endswith(f"--flip: --cache {plain} was encoded without --flip; "
                                                            "drop --flip, or encode another with it")
    assert f"--window lung: --cache {plain} was encoded without --window; leave" in refusal(
        tiny, capsys, *cache, "--window", "lung")


def test_a_corrupt_missing_or_unfinished_cache_is_refused(tiny, flipped, tmp_path, capsys):
    out = tmp_path / "cache"
    assert encode(tiny, out, "--flip", "--seed", "5") == 0
    cache = ["--cache", str(out), "--seed", "5", "--flip"]
    raw = bytearray((out / "shard-00001.safetensors").read_bytes())
    raw[-1] ^= 1
    (out / "shard-00001.safetensors").write_bytes(bytes(raw))
    assert "shard-00001.safetensors does not match its sha256" in refusal(tiny, capsys, *cache)
    (out / "shard-00001.safetensors").unlink()
    assert "shard-00001.safetensors is missing; re-run the encode" in refusal(tiny, capsys, *cache)
    (out / "manifest.json").unlink()
    assert "still being written" in refusal(tiny, capsys, *cache)


def test_encode_stores_the_image_encoders_tokens(tiny, tmp_path):
    folder, model, data = tiny
    release = tmp_path / "encoder"
    encoder_release(release)
    out = tmp_path / "cache"
    assert encode(tiny, out, "--flip", "--condition", "dinov2", "--encoder", str(release)) == 0
    manifest = read_manifest(out)
    assert manifest["encoder"]["name"] == "encoder" and manifest["encoder"]["count"] == 5
    sd = minisd.load(model[1], config=model[3])
    reference = cache_tokens(attach(sd, str(release), load_encoder(release)), load_dataset(data, 64).images, True)
    assert torch.equal(ShardCache(out, manifest)["tokens"][list(range(2 * IMAGES))], reference)
    assert json.dumps(manifest).count(str(tmp_path)) == 0


def train_image(tiny, out, encoder, *extra):
    return train_main([*tiny[1], "--method", "unet", "--condition", "dinov2", "--encoder", str(encoder), "--batch",
                       "2", "--max-steps", "3", "--save-every", "3", "--preview-every", "0", "--save-dtype", "fp32",
                       "--condition-dropout", "0.5", "--seed", "5", "--flip", "--out", str(out), *extra])


def test_an_image_conditioned_run_from_the_cache_is_the_run_from_the_folder(tiny, tmp_path, capsys):
    """The cache's tokens stand in for the ones the run would compute from --data: the saved model (UNet, projection,
    metadata) is byte-identical. A cache without tokens, or with another encoder's, is refused in one line."""
    release = tmp_path / "one" / "encoder"
    encoder_release(release)
    cache = tmp_path / "cache"
    assert encode(tiny, cache, "--flip", "--seed", "5", "--condition", "dinov2", "--encoder", str(release)) == 0
    assert train_image(tiny, tmp_path / "folder", release, "--data", str(tiny[2])) == 0
    assert train_image(tiny, tmp_path / "cached", release, "--cache", str(cache)) == 0
    saved = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("folder", "cached")]
    assert saved[0] == saved[1]
    other = tmp_path / "two" / "encoder"   # the same folder name, other weights
    encoder_release(other, layers=1)
    capsys.readouterr()
    assert train_image(tiny, tmp_path / "r1", other, "--cache", str(cache)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds the tokens of another encoder" in err and "\n" not in err
    assert encode(tiny, tmp_path / "plain", "--flip", "--seed", "5") == 0
    capsys.readouterr()
    assert train_image(tiny, tmp_path / "r2", release, "--cache", str(tmp_path / "plain")) == 2
    assert "holds no image tokens" in capsys.readouterr().err


def test_an_image_conditioned_run_killed_mid_epoch_resumes_bit_identically_from_the_cache(tiny, tmp_path):
    """SIGKILL at step 15 of a run from the cache (12 rows with --flip, 2 per step: an epoch is 6 steps, so the last
    save, step 10, is mid-epoch), then --resume: every saved byte equals the uninterrupted run's. The random modes
    are on (--latents random, condition dropout 0.5) so every draw of a step is replayed."""
    release = tmp_path / "encoder"
    encoder_release(release)
    cache = tmp_path / "cache"
    assert encode(tiny, cache, "--flip", "--seed", "5", "--condition", "dinov2", "--encoder", str(release)) == 0
    args = [*tiny[1], "--cache", str(cache), "--method", "unet", "--condition", "dinov2", "--encoder", str(release),
            "--batch", "2", "--max-steps", "40", "--save-every", "10", "--preview-every", "0", "--save-dtype", "fp32",
            "--condition-dropout", "0.5", "--seed", "5", "--flip", "--latents", "random", "--ema", "0.9"]
    kill_and_resume(args, tmp_path / "whole", tmp_path / "killed", 15)
    for name in ("model.safetensors", "state.safetensors"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_encode_help_says_what_encode_does_with_the_training_flags(capsys):
    """encode takes training's flags under the same names, but --flip there stores mirror images (it flips nothing
    at random) and --seed draws the stored samples: their help says so, not training's words."""
    with pytest.raises(SystemExit):
        data_main(["encode", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "random horizontal flips" not in text
    assert "also encode each image's mirror image" in text and "draws each image's --latents once sample" in text
