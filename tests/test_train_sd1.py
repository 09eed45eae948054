"""Textual inversion on SD1: the loss and its gradient equal diffusers' textual-inversion recipe on a tiny SD1 model
(transformers' CLIPTextModel with quick_gelu, placeholder tokens added to its tokenizer, resize_token_embeddings,
eps target); `python -m medti.train` and `python -m medti.generate` run on an SD1 diffusers folder and on the same
model as one official-layout file with a JSON config; SD1 embedding files in every format medti reads attach to an
SD1 model, and an embedding of the other generation (SD2's 1024-wide vectors on SD1's 768-wide tower, and the
reverse) is refused in one line naming the file and both kinds -- through the CLI too.

Tolerances as in tests/test_train.py: loss relative error <= 1e-5, gradient <= 1e-4 of the reference's max |value|
(fp32: the same maths in another order; a wrong splice, pad id or target gives O(1) differences)."""
import copy
import json

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from test_load_diffusers import clip_tokenizer
from test_sd1_pipeline import sd1_pipeline
from test_train import our_step
from transformers import CLIPTextConfig, CLIPTextModel

import convert_diffusers
import minisd
from conftest import rel_err
from medti import generate, train
from medti.files import embedding_file as E
from medti.training.demo import phantoms
from medti.training.optim import enable_checkpointing
from minisd.conditioning import TextConditioning
from minisd.config import parse_config

TOKEN, N_VECTORS = "<lesion>", 3


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The tiny SD1 pipeline, its saved folder, the same model as one official file + JSON config, and 3 images."""
    tmp = tmp_path_factory.mktemp("ti-sd1")
    pipe = sd1_pipeline(tmp / "sd1", 4, seed=20)
    state, config = convert_diffusers.convert_folder(tmp / "sd1")
    convert_diffusers.write_outputs(state, config, tmp / "sd1.safetensors", tmp / "sd1.json")
    return pipe, tmp / "sd1", tmp / "sd1.safetensors", tmp / "sd1.json", phantoms(tmp / "data", 3, seed=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_gradient_equal_reference(sd1, checkpointing):
    pipe, folder, *_ = sd1
    sd = minisd.load(folder)
    if checkpointing:
        enable_checkpointing(sd)
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(N_VECTORS, 32, generator=gen) * 0.02
    prompts = [TOKEN, f"a chest x-ray with a {TOKEN}!"]
    loss, ours_vectors, latents, noise, t = our_step(sd, TOKEN, vectors, prompts, gen)

    # Reference: diffusers' examples/textual_inversion recipe -- one added tokenizer token per vector ("<lesion>",
    # "<lesion>_1", ...; the prompt's placeholder expanded to all of them), new rows appended to the token table,
    # DDPM add_noise, MSE on eps in fp32 -- with the pipeline's own SD1 tokenizer (pad = end token 49407).
    tokenizer, text = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.text_encoder)
    added = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, N_VECTORS)]
    assert tokenizer.add_tokens(added) == N_VECTORS
    ids = tokenizer([p.replace(TOKEN, " ".join(added)) for p in prompts], padding="max_length", max_length=77,
                    truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, sd.text.tokenizer(prompts)), "SD1 ids with placeholders differ from transformers'"
    text.resize_token_embeddings(len(tokenizer))
    table = text.get_input_embeddings().weight
    with torch.no_grad():
        table[49408:] = vectors
    table.requires_grad_(True)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    context = text(input_ids=ids).last_hidden_state
    pred = pipe.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
    ref_loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    ref_loss.backward()

    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    err = rel_err(ours_vectors.grad, table.grad[49408:])
    assert err <= 1e-4, f"SD1 gradient relative error {err:.2e}"


def train_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--token", "<t>", "--vectors", "2", "--max-steps", "2",
            "--save-every", "2", "--preview-every", "0", "--out", str(out), *extra]


def generate_args(model, embedding, out, *extra):
    return ["--model", str(model), "--embeddings", str(embedding), "--steps", "2", "--out", str(out), *extra]


def test_cli_train_and_generate_on_sd1_folder_and_file(sd1, tmp_path, monkeypatch):
    """The folder and the single file hold the same weights: the two runs learn the same vectors."""
    monkeypatch.setenv("MEDTI_CACHE", str(tmp_path / "cache"))
    _, folder, file, config, data = sd1
    assert train.main(train_args(folder, data, tmp_path / "run")) == 0
    learned = E.read(tmp_path / "run" / "t.safetensors")
    assert learned.vectors.shape == (2, 32) and learned.meta["base_model"] == folder.name   # no path
    assert train.main(train_args(file, data, tmp_path / "run-file", "--config", str(config))) == 0
    # Same weights through two loaders: equal to float rounding, not bit for bit -- oneDNN picks CPU kernels by the
    # tensors' alignment and layout, which differ between a folder's assembled tensors and one file's (Zen 4 with
    # AVX-512: 3.4e-6 of the largest entry after 2 steps; 0 on Sapphire Rapids). Bound: 1e-5 of the largest entry.
    vectors = E.read(tmp_path / "run-file" / "t.safetensors").vectors
    assert (vectors - learned.vectors).abs().max() <= 1e-5 * learned.vectors.abs().max()

    embedding = tmp_path / "run" / "t.safetensors"
    assert generate.main(generate_args(folder, embedding, tmp_path / "gen", "--prompt", "<t> :0.6 AND a chest x-ray "
                                       ":0.4", "--n", "2", "--grid")) == 0
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == ["00000.png", "00001.png", "grid.png"]
    assert generate.main(generate_args(file, embedding, tmp_path / "gen-file", "--config", str(config), "--prompt",
                                       "<t>")) == 0
    monkeypatch.setenv("RANK", "1")   # the sweep, sharded: rank 1 of 2 makes the odd images
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert generate.main(generate_args(folder, embedding, tmp_path / "sweep", "--sweep", "<t>", "a chest x-ray",
                                       "--weights", "0,0.5,1")) == 0
    records = [json.loads(line) for line in (tmp_path / "sweep" / "manifest.part1.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["00001.png"] and records[0]["model"] == folder.name   # no path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_config_with_a_folder_is_a_flag_error(sd1, tmp_path, capsys):
    _, folder, _, config, data = sd1
    assert train.main(train_args(folder, data, tmp_path / "run", "--config", str(config))) == 2
    err = one_line_error(capsys)
    assert f"--config {config}" in err and "diffusers folder" in err and "leave out --config" in err
    assert generate.main(generate_args(folder, tmp_path / "none.pt", tmp_path / "gen", "--config", "sd15", "--prompt",
                                       "x")) == 2
    err = one_line_error(capsys)
    assert "--config sd15" in err and "diffusers folder" in err and "leave out --config" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "gen").exists()


def embedding_files(folder, vectors: torch.Tensor) -> list:
    """One embedding in A1111 .pt, diffusers .safetensors and kohya .safetensors / .pt form."""
    emb = E.Embedding("<cxr>", vectors, {"step": "100"})
    E.export(emb, folder / "a1111.pt", "a1111")
    E.export(emb, folder / "diffusers.safetensors", "diffusers")
    save_file({"emb_params": vectors.half()}, str(folder / "kohya.safetensors"))   # kohya may save fp16
    torch.save({"emb_params": vectors}, folder / "kohya.pt")
    return [folder / name for name in ("a1111.pt", "diffusers.safetensors", "kohya.safetensors", "kohya.pt")]


def text_only(tower: str, width: int):
    """A model's text conditioning alone, on the meta device (attach reads only its width and tokenizer)."""
    cfg = parse_config({"text": {"tower": tower, "width": width} if tower == "openclip" else
                        {"tower": "openai", "hidden_size": width}, "unet": {"context_dim": width}}, "test")
    with torch.device("meta"):
        return type("Model", (), {"text": TextConditioning(cfg.text)})()


@pytest.mark.parametrize("file", range(4))
def test_sd1_embedding_files_attach_and_other_widths_are_refused(tmp_path, file):
    """Each format at the model's own width attaches; at the other generation's width it is refused naming both."""
    sd1, sd2 = text_only("openai", 768), text_only("openclip", 1024)
    assert sd1.text.tokenizer.pad_id == 49407 and sd2.text.tokenizer.pad_id == 0
    for model, width, other in ((sd1, 768, 1024), (sd2, 1024, 768)):
        (tmp_path / f"{width}").mkdir()
        (tmp_path / f"{other}-on-{width}").mkdir()
        right = E.read(embedding_files(tmp_path / f"{width}", torch.randn(2, width))[file])
        E.attach(model, {right.token: right})
        assert model.text.vectors[right.token].shape == (2, width)
        wrong = embedding_files(tmp_path / f"{other}-on-{width}", torch.randn(2, other))[file]
        with pytest.raises(E.EmbeddingError) as info:
            E.attach(model, {"<b>": E.read(wrong)})
        message = str(info.value)
        assert "\n" not in message and str(wrong) in message and all(
            words in message for words in ("SD1.x", "SD2.x", f"{other} wide", f"{width} wide")), message


def full_width_folder(tmp_path, kind: str):
    """A tiny diffusers folder whose text tower has its generation's real width (SD1 768 quick_gelu, end-token pad;
    SD2 1024 gelu, "!" pad), one layer: what medti.generate checks an embedding's width against."""
    from diffusers import AutoencoderKL, DDIMScheduler
    width, sd2 = (1024, True) if kind == "sd2" else (768, False)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2,
                                cross_attention_dim=width, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                        num_hidden_layers=1, num_attention_heads=16 if sd2 else 12,
                                        hidden_act="gelu" if sd2 else "quick_gelu"))
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    StableDiffusionPipeline(vae=vae, text_encoder=text, unet=unet, tokenizer=clip_tokenizer(tmp_path, "!" if sd2 else
                            "<|endoftext|>"), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / kind)
    return tmp_path / kind


@pytest.mark.parametrize("kind, width, other", [("sd1", 768, 1024), ("sd2", 1024, 768)])
def test_cli_refuses_an_embedding_of_the_other_generation(tmp_path, capsys, monkeypatch, kind, width, other):
    monkeypatch.setenv("MEDTI_CACHE", str(tmp_path / "cache"))
    folder = full_width_folder(tmp_path, kind)
    capsys.readouterr()   # save_pretrained's progress bar
    E.export(E.Embedding("<other>", torch.randn(2, other), {}), tmp_path / "other.pt", "a1111")
    assert generate.main(generate_args(folder, tmp_path / "other.pt", tmp_path / "gen", "--prompt", "other")) == 2
    err = one_line_error(capsys)
    assert all(words in err for words in (str(tmp_path / "other.pt"), f"{other} wide", f"{width} wide", "SD1.x",
                                          "SD2.x")), err
    assert not (tmp_path / "gen").exists()


def test_a_folder_hashes_as_its_file_listing(sd1, tmp_path, monkeypatch):
    """A diffusers folder's sha256 (base_sha256 of an embedding, model_sha256 of an image): the sha256 of the lines
    "relative/path sha256" of its files, sorted; a changed file changes it, a hidden one (.cache/ of a hub download)
    does not."""
    import hashlib
    import shutil

    from medti.files.hashes import sha256_of
    monkeypatch.setenv("MEDTI_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "copy"
    shutil.copytree(sd1[1], folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(folder).as_posix()} {hashlib.sha256(p.read_bytes()).hexdigest()}\n"
                      for p in files)
    expected = hashlib.sha256(listing.encode()).hexdigest()
    assert sha256_of(folder) == expected
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.lock").write_text("")
    assert sha256_of(folder) == expected
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    assert sha256_of(folder) != expected
