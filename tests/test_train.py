"""Textual inversion: the loss and its gradient equal a reference built from diffusers' UNet and scheduler and
transformers' CLIP text model; training really learns; a killed and resumed run ends bit-identical; the frozen
weights never change; bad inputs give one-line errors."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

import minisd
from conftest import TINY_CONFIG, TINY_TEXT, TINY_UNET, randomize_, rel_err, write_official
from medti.files import embedding_file as E
from medti.train import main
from medti.training.config import TrainConfig
from medti.training.objective import denoising_loss
from medti.training.trainer import run

TOKEN, N_VECTORS = "<lesion>", 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tiny diffusers UNet + transformers CLIP text model with the full CLIP vocabulary, and our loaded copy."""
    unet = randomize_(UNet2DConditionModel(**TINY_UNET), 11)
    text = randomize_(CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, "vocab_size": 49408})), 12)
    from diffusers import AutoencoderKL

    from conftest import TINY_VAE
    vae = randomize_(AutoencoderKL(**TINY_VAE), 13)
    path = write_official(tmp_path_factory.mktemp("ti") / "ti.safetensors", unet=unet, vae=vae, text=text)
    config = json.loads(json.dumps(TINY_CONFIG))
    config["text"]["vocab_size"] = 49408
    return unet, text, path, config


def our_step(sd, token, vectors, prompts, gen):
    """Our side of one TI step with `vectors` attached as `token`: (loss, the trained copy with its gradient, and the
    latents, noise and timesteps the reference must use)."""
    E.attach(sd, {token: E.Embedding(token, vectors, {})})
    latents, noise = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([17, 801])
    ours_vectors = vectors.clone().requires_grad_(True)
    loss = denoising_loss(sd, token, ours_vectors, prompts, latents, noise, t)
    loss.backward()
    return loss, ours_vectors, latents, noise, t


@pytest.mark.parametrize("prediction, checkpointing", [("eps", False), ("v", False), ("eps", True)])
def test_loss_and_gradient_equal_reference(reference, prediction, checkpointing):
    """With gradient checkpointing (--checkpointing on) the gradient must be the same: it only recomputes."""
    from medti.training.optim import enable_checkpointing
    unet, text, path, config = reference
    sd = minisd.load(path, config={**config, "prediction": prediction})
    if checkpointing:
        enable_checkpointing(sd)
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(N_VECTORS, 32, generator=gen)
    prompts = [TOKEN, f"a chest x-ray with a {TOKEN}"]
    loss, ours_vectors, latents, noise, t = our_step(sd, TOKEN, vectors, prompts, gen)

    # Reference: the diffusers textual-inversion recipe -- new rows appended to the token table, DDPM add_noise /
    # get_velocity, MSE in fp32 -- with our tokenizer's ids (placeholder ids 49408.. are the new rows).
    text.resize_token_embeddings(49408 + N_VECTORS)
    table = text.get_input_embeddings().weight
    with torch.no_grad():
        table[49408:] = vectors
    table.requires_grad_(True)
    table.grad = None
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])
    context = text(input_ids=sd.text.tokenizer(prompts)).last_hidden_state
    pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
    target = noise if prediction == "eps" else sched.get_velocity(latents, noise, t)
    ref_loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    ref_loss.backward()

    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    err = rel_err(ours_vectors.grad, table.grad[49408:])
    assert err <= 1e-4, f"{prediction}: gradient relative error {err:.2e}"
    assert table.grad[:49408].abs().sum() > 0   # the reference trains the whole table; we train only our rows


@pytest.fixture(scope="module")
def secret_data(tmp_path_factory):
    """A tiny random model whose output depends on its prompt (sharpened cross-attention, see medti/training/demo.py),
    and images sampled from it with a secret 4-vector embedding: 24 to train on, 12 held out."""
    from medti.files.images import save_png, to_pil
    from medti.generation.pipeline import SampleSettings, decode, sample
    from medti.training.demo import tiny_model
    folder = tmp_path_factory.mktemp("learn")
    model, config = tiny_model(folder / "model", seed=0)
    sd = minisd.load(model, config=config)
    table_std = sd.text.tower.token_embedding.weight.std()
    secret = torch.randn(4, 64, generator=torch.Generator().manual_seed(99)) * table_std * 3
    E.attach(sd, {"<secret>": E.Embedding("<secret>", secret, {})})
    with torch.no_grad():
        cond, uncond = sd.text(["<secret>"]), sd.text([""])
    for name, seeds in (("train", range(24)), ("held-out", range(1000, 1012))):
        (folder / name).mkdir()
        latents = sample(sd, cond, uncond, [1.0], list(seeds), SampleSettings(width=64, height=64, cfg=2.0, steps=10))
        for seed, image in zip(seeds, decode(sd, latents), strict=True):
            save_png(folder / name / f"{seed}.png", to_pil(image))
    return folder, model, config


def test_training_lowers_held_out_loss(secret_data):
    """Learning, not just running: after 200 steps the learned vectors' denoising loss on held-out images, at
    (t, noise) draws no training step used, is below the initial vectors'. Paired comparison (same draws for
    both) on three independent draw sets. Measured here: 3.9, 4.1, 4.2 % lower (lr 0.005 gives ~1.1 %); the
    spread between draw sets, our run-to-run noise, is ~0.5 %, so the bar is 2 % on every set."""
    from medti.training.demo import heldout_loss
    from medti.training.objective import initial_vectors
    from medti.training.trainer import cache_latents
    folder, model, config = secret_data
    learned = run(TrainConfig(model=str(model), config=str(config), data=str(folder / "train"), token="<learned>",
                              vectors=4, lr="0.02", max_steps=200, resolution=64, preview_every=0, save_every=200,
                              checkpointing="off", out=str(folder / "run")))
    sd = minisd.load(model, config=config)
    vectors = E.read(learned).vectors
    E.attach(sd, {"<learned>": E.Embedding("<learned>", vectors, {})})
    init = initial_vectors(sd, "*", 4, 0)
    from medti.dataset.folder import load_dataset
    latents = cache_latents(sd, load_dataset(folder / "held-out", 64).images, False, 0)["mean"] * sd.scale_factor
    gains = []
    for draw_seed in (1, 2, 3):
        before = heldout_loss(sd, sd.text(["<learned>"], override={"<learned>": init}), latents, draws=48,
                              seed=draw_seed)
        after = heldout_loss(sd, sd.text(["<learned>"], override={"<learned>": vectors}), latents, draws=48,
                             seed=draw_seed)
        gains.append((before - after) / before)
    print("held-out loss improvements:", [f"{100 * g:.2f} %" for g in gains])
    assert min(gains) > 0.02, gains


def train_args(folder, model, config, out, *extra):
    return ["--model", str(model), "--config", str(config), "--data", str(folder / "train"), "--token", "<r>",
            "--vectors", "4", "--resolution", "64", "--preview-every", "0", "--out", str(out), *extra]


def kill_and_resume(args, whole, out, at_step: int):
    """`python -m medti.train ARGS --out WHOLE` uninterrupted; the same into OUT killed with SIGKILL once its log
    reaches `at_step`, then resumed there with --resume. The caller compares the two folders."""
    command = [sys.executable, "-m", "medti.train", *args]
    done = subprocess.run(command + ["--out", str(whole)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    process = subprocess.Popen(command + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = out / "log.jsonl", time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and any(json.loads(line)["step"] >= at_step for line in log.read_text().splitlines()[-3:]
                                 if line.endswith("}")):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run(command + ["--out", str(out), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_killed_and_resumed_run_is_bit_identical(secret_data, tmp_path):
    """A real process killed (SIGKILL) mid-run and resumed ends with the same bytes as an uninterrupted run.
    The random modes are on (--latents random, --flip, --grad-accum 2) so every source of randomness is used."""
    folder, model, config = secret_data
    extra = ["--max-steps", "30", "--save-every", "10", "--latents", "random", "--flip", "--grad-accum", "2",
             "--seed", "5"]
    args = train_args(folder, model, config, tmp_path / "unused", *extra)
    args = args[:args.index("--out")] + args[args.index("--out") + 2:]
    out = tmp_path / "killed"
    kill_and_resume(args, tmp_path / "whole", out, 15)
    assert (out / "r.safetensors").read_bytes() == (tmp_path / "whole" / "r.safetensors").read_bytes()
    assert (out / "state.safetensors").read_bytes() == (tmp_path / "whole" / "state.safetensors").read_bytes()
    losses = [[json.loads(line)["loss"] for line in (o / "log.jsonl").read_text().splitlines()]
              for o in (out, tmp_path / "whole")]
    assert losses[0] == losses[1] and len(losses[0]) == 30


def test_outputs_and_frozen_weights(secret_data, tmp_path, monkeypatch):
    folder, model, config = secret_data
    loaded = []
    real_load = minisd.load
    monkeypatch.setattr(minisd, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    template = tmp_path / "templates.txt"
    template.write_text("a scan with {}\n{} in the lung\n")
    assert main(train_args(folder, model, config, tmp_path / "run", "--max-steps", "4", "--save-every", "2",
                           "--preview-every", "4", "--preview-steps", "2", "--template", str(template),
                           "--init", "lung nodule")) == 0
    fresh = real_load(model, config=config)
    for ours, theirs in ((loaded[0].unet, fresh.unet), (loaded[0].text.tower, fresh.text.tower)):
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
    run_dir = tmp_path / "run"
    assert {p.name for p in run_dir.iterdir()} >= {"r.safetensors", "r-2.safetensors", "r-4.safetensors",
                                                    "state.safetensors", "log.jsonl", "loss.png",
                                                    "preview-000004.png"}
    learned = E.read(run_dir / "r.safetensors")
    assert learned.token == "<r>" and learned.vectors.shape == (4, 64)
    assert {"token", "vectors", "step", "base_model", "base_sha256", "init", "lr", "data_sha256"} <= set(learned.meta)
    assert learned.meta["step"] == "4" and learned.meta["init"] == "lung nodule"
    record = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "vector_norm", "it_s"} <= set(record)
    assert Image.open(run_dir / "preview-000004.png").size == (4 * 64, 64)


def test_non_finite_steps_are_skipped_and_stop_the_run(secret_data, tmp_path, capsys):
    """lr 1e30 makes the vectors huge after one step; every later loss is NaN: ten skipped steps in a row stop
    the run with advice, and the saved embedding holds no NaN."""
    folder, model, config = secret_data
    assert main(train_args(folder, model, config, tmp_path, "--max-steps", "20", "--save-every", "1",
                           "--lr", "1e30")) == 2
    err = capsys.readouterr().err
    assert "10 steps in a row had a non-finite loss or gradient" in err and "lower --lr" in err
    assert torch.isfinite(E.read(tmp_path / "r.safetensors").vectors).all()


@pytest.mark.parametrize("extra,words", [
    (["--token", "cat"], "vocabulary"),
    (["--vectors", "80"], "--vectors 80: must be 1..75"),
    (["--lr", "fast"], "--lr 'fast'"),
    (["--lr", "0.005:100, 0.001:50"], "steps increasing"),
    (["--resume"], "no state.safetensors to continue from"),
    (["--template", "{tmp}/bad.txt"], "every line needs a {}"),
    (["--data", "{tmp}/empty"], "empty"),
    (["--data", "{tmp}/nowhere"], "nowhere: no such folder"),
])
def test_bad_inputs_are_one_line_errors(secret_data, tmp_path, capsys, extra, words):
    folder, model, config = secret_data
    (tmp_path / "bad.txt").write_text("no placeholder here\n")
    (tmp_path / "empty").mkdir()
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(train_args(folder, model, config, tmp_path / "out", "--max-steps", "2", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err


def test_resume_refuses_other_settings_and_used_folders(secret_data, tmp_path, capsys):
    folder, model, config = secret_data
    assert main(train_args(folder, model, config, tmp_path, "--max-steps", "2", "--save-every", "2")) == 0
    assert main(train_args(folder, model, config, tmp_path, "--max-steps", "4")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(train_args(folder, model, config, tmp_path, "--max-steps", "4", "--lr", "0.01", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} was trained with --lr 0.005; you gave --lr 0.01; drop the flag or use another --out" in err
    assert main(train_args(folder, model, config, tmp_path, "--max-steps", "4", "--resume")) == 0
    assert E.read(tmp_path / "r.safetensors").meta["step"] == "4"


def test_lr_schedule_and_initial_vectors(secret_data):
    from medti.training.objective import initial_vectors
    from medti.training.optim import lr_at, parse_lr
    schedule = parse_lr("0.005:1000, 0.001:2000, 0.0005")   # A1111: rate until step, last rate for ever
    assert [lr_at(schedule, s) for s in (0, 999, 1000, 1999, 2000, 10**6)] == [0.005, 0.005, 0.001, 0.001,
                                                                                0.0005, 0.0005]
    assert lr_at(parse_lr("0.02"), 123) == 0.02
    _, model, config = secret_data
    sd = minisd.load(model, config=config)
    table = sd.text.tower.token_embedding.weight
    ids = sd.text.tokenizer.encode("lung nodule")            # 4 BPE tokens spread over 5 vectors: token i * 4 // 5
    vectors = initial_vectors(sd, "lung nodule", 5, 0)
    for i, row in enumerate(vectors):
        assert torch.equal(row, table[ids[i * len(ids) // 5]])
    random = initial_vectors(sd, "random", 64, 0)
    assert abs(random.std() / table.std() - 1) < 0.1


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_training_runs(secret_data, tmp_path, dtype):
    """Reduced precision on the CPU: a few steps run and save finite vectors; fp16 uses the grad scaler, whose
    state is saved for --resume."""
    folder, model, config = secret_data
    assert main(train_args(folder, model, config, tmp_path, "--max-steps", "3", "--save-every", "3",
                           "--dtype", dtype)) == 0
    assert torch.isfinite(E.read(tmp_path / "r.safetensors").vectors).all()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as f:
        scaler = json.loads(f.metadata()["scaler"])
    assert ("scale" in scaler) == (dtype == "fp16")


def test_odd_files_are_listed_once_or_refused_with_strict(secret_data, tmp_path, capsys):
    folder, model, config = secret_data
    data = tmp_path / "data"
    data.mkdir()
    for png in sorted((folder / "train").glob("*.png"))[:3]:
        (data / png.name).write_bytes(png.read_bytes())
    (data / "broken.png").write_bytes(b"not a png")
    def args(out, *extra):
        return [*train_args(folder, model, config, out, "--max-steps", "1", "--save-every", "1", *extra),
                "--data", str(data)]   # the later --data wins
    assert main(args(tmp_path / "run")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and "broken.png" in warnings[0]
    assert main(args(tmp_path / "strict", "--strict")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.png" in err
