"""Validation in `python -m medti.train` (issue 12, section 3): the logged val_loss equals the same fixed draws sent
through the UNet by hand; the best file is the argmin of the log; a resumed run logs the same values and keeps its
best; validation takes no training randomness (bit-identical training); --val-fraction's split is reproducible,
disjoint and recorded; bad input is one line and leaves nothing."""
import hashlib
import json
import math
import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

import minisd
from conftest import private_key
from medti.dataset.folder import load_dataset
from medti.files import embedding_file as E
from medti.train import main
from medti.training.config import TrainConfig, check
from medti.training.demo import phantoms, tiny_model
from medti.training.trainer import setup
from medti.training.validation import keep_best, split

# --latents random and --flip: every source of training randomness is used (images, flips, posterior draws,
# timesteps, noise); 4 draws per validation image keep the test short (the default is 8)
RANDOM = ["--latents", "random", "--flip", "--seed", "5", "--val-draws", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo's tiny random model, six training and three validation phantoms."""
    folder = tmp_path_factory.mktemp("val")
    model, config = tiny_model(folder / "model")
    return folder, model, config, phantoms(folder / "train", 6, seed=0), phantoms(folder / "val", 3, seed=1)


def args(data, out, *extra):
    _, model, config, train, _ = data
    return ["--model", str(model), "--config", str(config), "--data", str(train), "--token", "<t>", "--vectors", "2",
            "--preview-every", "0", "--save-every", "2", "--out", str(out), *extra]


def log(out) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def val_losses(out) -> dict:
    return {r["step"]: r["val_loss"] for r in log(out) if "val_loss" in r}


@pytest.fixture(scope="module")
def whole(data):
    """An uninterrupted 6-step run with --val, saved (and validated) at steps 2, 4 and 6."""
    out = data[0] / "whole"
    assert main(args(data, out, "--val", str(data[4]), "--max-steps", "6", *RANDOM)) == 0
    return out


def by_hand(data, vectors: torch.Tensor, seed: int = 5, draws: int = 4) -> float:
    """The documented draws, rebuilt here: VAE posterior means of the validation images (unflipped); for image i a
    generator seeded with sha256("medti validation draws {seed} {i}") (first 8 bytes, little-endian, 63 bits)
    gives u [draws] (float64), then the noise; timestep j = floor((j + u_j) * 1000 / draws); the token alone as
    prompt. Noised with diffusers' DDPM add_noise (SD2's schedule), through the UNet, MSE on eps, mean over all."""
    _, model, config, _, val = data
    sd = minisd.load(model, config=config)
    E.attach(sd, {"<t>": E.Embedding("<t>", vectors, {})})
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    with torch.no_grad():
        latents = sd.vae.encode(load_dataset(val, 64).images)[0] * sd.scale_factor
        context = sd.text(["<t>"] * draws)
        losses = []
        for i, latent in enumerate(latents):
            digest = hashlib.sha256(f"medti validation draws {seed} {i}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
            u = torch.rand(draws, generator=g, dtype=torch.float64)
            noise = torch.randn((draws, *latent.shape), generator=g)
            t = torch.tensor([math.floor((j + u[j].item()) * 1000 / draws) for j in range(draws)])
            noisy = sched.add_noise(latent.expand(draws, *latent.shape), noise, t)
            losses.append(torch.nn.functional.mse_loss(sd.unet(noisy, t, context), noise).item())
    return sum(losses) / len(losses)


def test_val_loss_equals_the_draws_sent_through_the_unet_by_hand(data, whole):
    """Tolerance 1e-5 relative: the same float32 UNet on the same inputs, except that the VAE encodes the images
    in another batch and the noising is diffusers' arithmetic, not ours. Measured: about 1e-7."""
    logged = val_losses(whole)
    assert sorted(logged) == [2, 4, 6]
    for step in (2, 6):
        ours = logged[step]
        ref = by_hand(data, E.read(whole / f"t-{step}.safetensors").vectors)
        print(f"step {step}: logged {ours!r}, by hand {ref!r}, relative difference {abs(ours - ref) / ref:.1e}")
        assert abs(ours - ref) <= 1e-5 * ref


def test_best_file_is_the_argmin_of_the_log_and_holds_its_vectors(whole):
    logged = val_losses(whole)
    best_step = min(logged, key=lambda step: (logged[step], step))
    best = E.read(whole / "t-best.safetensors")
    assert best.meta["step"] == str(best_step) and float(best.meta["val_loss"]) == logged[best_step]
    assert torch.equal(best.vectors, E.read(whole / f"t-{best_step}.safetensors").vectors)
    held = (whole / "val.txt").read_text().splitlines()   # pseudonyms; the key gives the files
    assert [private_key(whole)[name] for name in held] == ["phantom000.png", "phantom001.png", "phantom002.png"]
    from PIL import Image
    assert Image.open(whole / "loss.png").text["Description"].endswith("validation loss at 3 save(s), unsmoothed")


def test_keep_best_writes_only_a_strictly_lower_finite_loss(tmp_path):
    learned = E.Embedding("<t>", torch.ones(2, 4), {"step": "4"})

    def write(path, meta):
        E.write(path, E.Embedding(learned.token, learned.vectors, meta))

    path = tmp_path / "t-best.safetensors"
    assert keep_best(None, 2, 1.5, write, learned.meta, path) == (2, 1.5)
    first = path.read_bytes()
    for worse in (1.5, 1.6, math.nan, math.inf):   # a tie keeps the earlier step; NaN/inf never win
        assert keep_best((2, 1.5), 4, worse, write, learned.meta, path) == (2, 1.5) and path.read_bytes() == first
    assert keep_best((2, 1.5), 4, 1.25, write, learned.meta, path) == (4, 1.25)
    assert E.read(path).meta["step"] == "4" and E.read(path).meta["val_loss"] == "1.25"


def test_validation_takes_no_training_randomness(data, whole, tmp_path):
    """Training without validation gives the same bytes: validation's draws come from generators of its own."""
    out = tmp_path / "plain"
    assert main(args(data, out, "--max-steps", "4", *RANDOM)) == 0
    assert (out / "t.safetensors").read_bytes() == (whole / "t-4.safetensors").read_bytes()
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(whole)][:4]
    assert not (out / "t-best.safetensors").exists() and not any("val_loss" in r for r in log(out))


@pytest.fixture(scope="module")
def partial(data):
    """The same run stopped after its save at step 4 (to be resumed to 6)."""
    out = data[0] / "partial"
    assert main(args(data, out, "--val", str(data[4]), "--max-steps", "4", *RANDOM)) == 0
    return out


def test_resumed_run_logs_the_same_val_losses(data, whole, partial, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(partial, out)
    assert main(args(data, out, "--val", str(data[4]), "--max-steps", "6", "--resume", *RANDOM)) == 0
    assert val_losses(out) == val_losses(whole)
    for name in ("t.safetensors", "t-best.safetensors", "state.safetensors"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.mark.parametrize("where", ["log", "file"])
def test_resume_recovers_the_best_so_far(data, partial, tmp_path, where):
    """The best before the resume point is not forgotten: made unbeatable (val_loss 0) in the log, or, with the log
    deleted, in the best file's metadata, it must survive steps 5 and 6 untouched."""
    out = tmp_path / "resumed"
    shutil.copytree(partial, out)
    best = E.read(out / "t-best.safetensors")
    if where == "log":
        records = [{**r, "val_loss": 0.0} if r["step"] == int(best.meta["step"]) else r for r in log(out)]
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        (out / "log.jsonl").unlink()
        E.write(out / "t-best.safetensors", E.Embedding("<t>", best.vectors, {**best.meta, "val_loss": "0.0"}))
    before = (out / "t-best.safetensors").read_bytes()
    assert main(args(data, out, "--val", str(data[4]), "--max-steps", "6", "--resume", *RANDOM)) == 0
    assert (out / "t-best.safetensors").read_bytes() == before and 6 in val_losses(out)


def test_val_fraction_split_is_reproducible_disjoint_and_recorded(data, tmp_path, capsys):
    assert split(6, 0.34, 7) == split(6, 0.34, 7)                       # from --seed alone
    assert len({tuple(split(6, 0.5, seed)[1]) for seed in range(8)}) > 1  # and it depends on it
    for n, fraction in ((6, 0.34), (5, 0.5), (100, 0.2)):                # round(F * n), halves up
        train, val = split(n, fraction, 0)
        assert sorted(train + val) == list(range(n)) and len(val) == math.floor(fraction * n + 0.5)
    out = tmp_path / "fraction"   # checkpointing on: validation runs through checkpointed blocks too (forward only)
    assert main(args(data, out, "--val-fraction", "0.34", "--max-steps", "2", "--seed", "3", "--checkpointing",
                     "on")) == 0
    names = sorted(p.name for p in data[3].iterdir())
    held = (out / "val.txt").read_text().splitlines()   # pseudonyms; the key gives the files
    assert [private_key(out)[name] for name in held] == [names[i] for i in split(6, 0.34, 3)[1]]
    assert len(val_losses(out)) == 1
    with safe_open(str(out / "state.safetensors"), framework="pt") as f:
        recorded = json.loads(f.metadata()["settings"])["validation"]
    assert recorded == {"fraction": 0.34, "draws": 8, "files": held}
    # the session trains on the other four images only: no validation latent is among the training latents
    _, model, config, train, _ = data
    cfg = TrainConfig(model=str(model), config=str(config), data=str(train), token="<u>", vectors=2, seed=3,
                      val_fraction="0.34", out=str(tmp_path / "unused"))
    session = setup(cfg, check(cfg))
    assert len(session.cache["mean"]) == 4 and len(session.val.latents) == 2
    assert not any(torch.equal(v / session.sd.scale_factor, m) for v in session.val.latents
                   for m in session.cache["mean"])
    # --resume keeps the recorded split: another fraction is another run, refused saying both values: from the
    # recorded command, or for a run without one (made before it was recorded) from state.safetensors
    assert main(args(data, out, "--val-fraction", "0.5", "--max-steps", "3", "--seed", "3", "--resume")) == 2
    assert f"{out} was trained with --val-fraction 0.34; you gave --val-fraction 0.5" in capsys.readouterr().err
    record = (out / "command.private.json").read_bytes()
    (out / "command.private.json").unlink()
    for other, words in ((["--val-fraction", "0.5"], "--val-fraction 0.34 (now 0.5)"),
                         (["--val-fraction", "0.34", "--val-draws", "4"], "--val-draws 8 (now 4)"),
                         ([], "--val-fraction 0.34 (now no held-out images)"),
                         (["--val", str(data[4])], "--val-fraction 0.34 (now a --val folder)")):
        assert main(args(data, out, *other, "--max-steps", "3", "--seed", "3", "--resume")) == 2
        assert f"other settings: {words}; give the same ones" in capsys.readouterr().err
    (out / "command.private.json").write_bytes(record)
    assert main(args(data, out, "--val-fraction", "0.34", "--max-steps", "4", "--seed", "3", "--checkpointing", "on",
                     "--resume")) == 0
    assert (out / "val.txt").read_text().splitlines() == held and sorted(val_losses(out)) == [2, 4]


def test_the_held_out_refusal_says_what_differs():
    """The cases a resumed run cannot reach by its flags alone: as many images of another --data (a count), a --val
    folder with other images, and the words of a Python caller."""
    from medti.training.resume import differences
    from minisd.errors import INTERFACE

    def saved(files: int, draws: int = 8, **about) -> dict:
        return {"validation": {**about, "draws": draws, "files": [f"{i}.png" for i in range(files)]}}
    token = INTERFACE.set("cli")
    try:
        assert differences(saved(12, fraction=0.2), saved(10, fraction=0.2)) == "held out 12 images (now 10)"
        assert differences(saved(3, folder_sha256="a"), saved(3, folder_sha256="b", draws=4)) == \
            "the images in --val, --val-draws 8 (now 4)"
    finally:
        INTERFACE.reset(token)
    assert differences(saved(3, fraction=0.2), saved(2, fraction=0.1)) == "val_fraction='0.2' (now 0.1)"


@pytest.mark.parametrize("extra,words", [
    (["--val", "{val}", "--val-fraction", "0.2"], "--val and --val-fraction: give one of them"),
    (["--val-fraction", "0"], "--val-fraction '0': must be a number between 0 and 1"),
    (["--val-fraction", "1"], "--val-fraction '1': must be a number between 0 and 1"),
    (["--val-fraction", "-0.2"], "must be a number between 0 and 1"),
    (["--val-fraction", "nan"], "must be a number between 0 and 1"),
    (["--val-fraction", "a fifth"], "--val-fraction 'a fifth'"),
    (["--val-fraction", "0.05"], "--val-fraction 0.05 of 6 image(s) holds out 0"),
    (["--val-fraction", "0.95"], "--val-fraction 0.95 of 6 image(s) holds out 6"),
    (["--val", "{tmp}/empty"], "--val {tmp}/empty: no usable image"),
    (["--val", "{tmp}/nowhere"], "--val {tmp}/nowhere: no such folder"),
    (["--val", "{train}"], "overlap"),
    (["--val-draws", "0"], "--val-draws 0: must be at least 1"),
])
def test_bad_validation_input_is_one_line_and_writes_nothing(data, tmp_path, capsys, extra, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    fill = {"{val}": str(data[4]), "{tmp}": str(tmp_path), "{train}": str(data[3])}
    for key, value in fill.items():
        extra, words = [e.replace(key, value) for e in extra], words.replace(key, value)
    out = tmp_path / "out"
    assert main(args(data, out, "--max-steps", "2", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and words in err, err
    assert not out.exists()
