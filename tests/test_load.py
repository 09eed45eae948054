"""The loader: config formats, presets, the pickle policy, and one test per loader error."""
import collections
import json

import pytest
import torch
from safetensors.torch import save_file

import minisd
from conftest import TINY_CONFIG
from minisd.load import state_dict
from minisd.schedule import alphas_cumprod

TINY = minisd.load_config(TINY_CONFIG)


def tiny_state(cfg=TINY) -> dict:
    """A randomly initialised tiny model in the official layout (our names are the official names)."""
    torch.manual_seed(0)
    sd = minisd.build(cfg, device="cpu")
    return {k: v.clone() for k, v in state_dict(sd).items()}


@pytest.fixture
def tiny_file(tmp_path):
    def write(state=None, name="tiny.safetensors"):
        path = tmp_path / name
        save_file(tiny_state() if state is None else state, str(path))
        return path
    return write


def load_error(*args, **kwargs) -> str:
    with pytest.raises(minisd.LoadError) as info:
        minisd.load(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "loader errors are one line"
    return message


def test_loads_strictly_and_equals_the_file(tiny_file):
    state = tiny_state()
    sd = minisd.load(tiny_file(state), config=TINY_CONFIG)
    for k, v in state_dict(sd).items():
        assert torch.equal(v, state[k]), k
    assert sd.prediction == "eps" and sd.scale_factor == 0.18215
    assert not any(p.requires_grad for p in sd.unet.parameters())


def test_dtype_and_ignored_keys(tiny_file):
    state = tiny_state()
    # what the official file has beyond our modules: schedule buffers, CLIP's head, the unused last text block
    state["alphas_cumprod"] = alphas_cumprod()
    state["betas"] = torch.zeros(1000)
    state["cond_stage_model.model.text_projection"] = torch.zeros(64, 64)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    state["cond_stage_model.model.transformer.resblocks.3.ln_1.weight"] = torch.zeros(64)
    sd = minisd.load(tiny_file(state), config=TINY_CONFIG, dtype=torch.bfloat16)
    assert {p.dtype for p in sd.unet.parameters()} == {torch.bfloat16}


def ldm_schedule() -> torch.Tensor:
    """alphas_cumprod as ldm computes it before storing it (float64; make_beta_schedule "linear", SD2's YAML)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_schedule_self_check(tiny_file):
    state = tiny_state()
    # SD1-era DDPM linear schedule (linear in beta, 1e-4..0.02): not SD2
    state["alphas_cumprod"] = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    assert "alphas_cumprod is not SD's schedule" in load_error(tiny_file(state), config=TINY_CONFIG)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_schedule_checked_at_the_files_precision(tiny_file, dtype):
    """Community fp16 files store the schedule buffers in fp16 too: ldm's float64 schedule rounded to fp16 differs
    from our float32 one by up to 0.5 fp16 ulp plus rounding -- refused before, accepted now."""
    state = {k: v.to(dtype) for k, v in tiny_state().items()}
    state["alphas_cumprod"] = ldm_schedule().to(dtype)
    sd = minisd.load(tiny_file(state), config=TINY_CONFIG)
    assert sd.unet.out[2].weight.dtype == torch.float32   # loaded at the default dtype, not the file's


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wrong_schedule_in_half_precision_is_refused(tiny_file, dtype):
    """The looser tolerance of a half-precision file still tells schedules apart: SD1's betas, and even SD2's own
    schedule shifted by one timestep (relative steps of beta_t = 0.00085..0.012, above fp16's 2**-10 late on)."""
    for wrong in (torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0),
                  torch.cat([ldm_schedule()[1:], ldm_schedule()[-1:] * 0.988])):
        state = tiny_state()
        state["alphas_cumprod"] = wrong.to(dtype)
        assert "alphas_cumprod is not SD's schedule" in load_error(tiny_file(state), config=TINY_CONFIG)
    state = tiny_state()
    state["alphas_cumprod"] = ldm_schedule()[:999].half()
    assert "not SD's float [1000]" in load_error(tiny_file(state), config=TINY_CONFIG)


KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


@pytest.mark.parametrize("value, words", [(float("nan"), "holds NaN or inf values"),
                                          (float("inf"), "holds NaN or inf values"),
                                          (-float("inf"), "holds NaN or inf values")])
def test_non_finite_weights_are_refused(tiny_file, value, words):
    """One bad element in one tensor is enough to make every image NaN: named at load, with the likely cause."""
    state = tiny_state()
    state[KEY].view(-1)[7] = value
    path = tiny_file(state)
    message = load_error(path, config=TINY_CONFIG)
    assert message.startswith(f"{path}: {KEY} {words}")
    assert "damaged file" in message


def test_fp16_overflow_of_a_finite_weight_is_named(tiny_file):
    state = tiny_state()
    state[KEY].view(-1)[0] = 1e5   # finite in fp32, beyond fp16's largest value 65504
    path = tiny_file(state)
    message = load_error(path, config=TINY_CONFIG, dtype=torch.float16)
    assert f"{KEY} overflows float16" in message and "dtype=torch.float32" in message
    minisd.load(path, config=TINY_CONFIG)   # fp32: fine


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32])
def test_integer_weights_are_refused(tiny_file, tmp_path, dtype):
    state = tiny_state()
    state[KEY] = state[KEY].to(dtype)
    for path in (tiny_file(state), tmp_path / "tiny.pt"):
        torch.save(state, tmp_path / "tiny.pt")
        message = load_error(path, config=TINY_CONFIG)
        assert f"{KEY} is stored as" in message and "quantised" in message


def test_unknown_key_is_named(tiny_file):
    state = tiny_state()
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    assert "unexpected key model.diffusion_model.extra.weight" in load_error(tiny_file(state), config=TINY_CONFIG)
    state = tiny_state()
    state["something_else"] = torch.zeros(1)
    assert "unexpected key something_else" in load_error(tiny_file(state), config=TINY_CONFIG)


def test_missing_key_is_named(tiny_file):
    state = tiny_state()
    del state["first_stage_model.decoder.conv_out.bias"]
    assert "missing key first_stage_model.decoder.conv_out.bias" in load_error(tiny_file(state), config=TINY_CONFIG)


def test_wrong_shape_is_named(tiny_file):
    wider = json.loads(json.dumps(TINY_CONFIG))
    wider["unet"]["context_dim"] = wider["text"]["width"] = 48
    message = load_error(tiny_file(), config=wider)
    assert "has shape" in message and "attn2.to_k.weight" in message


def test_sd1_files_are_recognised(tiny_file):
    state = tiny_state()
    state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(2, 768)
    assert "SD1.x" in load_error(tiny_file(state), config=TINY_CONFIG)
    # SD2 layout but a 768-wide token table
    state = tiny_state()
    state["cond_stage_model.model.token_embedding.weight"] = torch.zeros(1000, 768)
    assert "SD1.x" in load_error(tiny_file(state), config=TINY_CONFIG)


def test_diffusers_folder_and_component_files(tmp_path, tiny_file):
    (tmp_path / "unet").mkdir()
    assert "a diffusers folder states its own configuration; leave out config=" in load_error(
        tmp_path, config=TINY_CONFIG)
    path = tiny_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "unet.safetensors")
    assert "a diffusers UNet file; load the whole diffusers folder instead" in load_error(path, config=TINY_CONFIG)


def test_file_needs_a_config(tiny_file):
    assert "pass config='sd2-base'" in load_error(tiny_file(name="512-base-ema.safetensors"))
    assert "pass a preset name or a JSON config file as config=" in load_error(tiny_file())
    assert "no such file" in load_error("nowhere.safetensors", config="sd2-base")


def test_a_missing_model_is_named_as_the_caller_typed_it(tmp_path):
    """Before: "sd2-base: no such file, and not a preset (sd2-base, ...)", which named no flag and contradicted
    itself: a preset name given with a config of one's own was looked for as a file."""
    from minisd.errors import INTERFACE
    config = str(tmp_path / "c.json")
    assert load_error("nowhere.safetensors", config=config).startswith(
        "model='nowhere.safetensors': no such file, and not a preset (sd2-base, ")
    assert load_error("sd2-base", config=config).startswith("model='sd2-base': a preset, which comes with its own "
                                                            "configuration; leave out config=")
    token = INTERFACE.set("cli")
    try:
        assert load_error("sd2-base", config=config).startswith("--model sd2-base: a preset, which comes with its "
                                                                "own configuration; leave out --config")
        assert load_error("nowhere", config=config).startswith("--model nowhere: no such file, and not a preset")
    finally:
        INTERFACE.reset(token)


class NotATensor:
    pass


def test_pickles_only_weights_only(tmp_path):
    state = tiny_state()
    good = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state}, good)   # the official .ckpt nests tensors under "state_dict"
    sd = minisd.load(good, config=TINY_CONFIG)
    assert torch.equal(sd.vae.quant_conv.weight, state["first_stage_model.quant_conv.weight"])
    bad = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "callbacks": NotATensor()}, bad)
    assert "use the model's .safetensors file" in load_error(bad, config=TINY_CONFIG)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert "not a readable .safetensors file" in load_error(path, config=TINY_CONFIG)


def test_config_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"unet": {"model_channels": 64}, "prediction": "v", "resolution": 768}))
    cfg = minisd.load_config(path)
    assert cfg.unet.model_channels == 64 and cfg.unet.channel_mult == (1, 2, 4, 4)   # missing keys: SD2's
    assert cfg.prediction == "v" and cfg.text.width == 1024 and cfg.vae.ch == 128
    for bad, words in (({"unet": {"modelchannels": 3}}, "unknown field unet.modelchannels"),
                       ({"predictoin": "v"}, "unknown field 'predictoin'"),
                       ({"prediction": "x0"}, "prediction must be")):
        path.write_text(json.dumps(bad))
        with pytest.raises(minisd.LoadError, match=words):
            minisd.load_config(path)
    path.write_text("{broken")
    with pytest.raises(minisd.LoadError, match="not a readable JSON config"):
        minisd.load_config(path)
    with pytest.raises(minisd.LoadError, match="neither a preset"):
        minisd.load_config("sd3")


def test_presets_state_the_variant():
    table = minisd.presets()
    assert set(table) == {"sd2-base", "sd2", "sd21-base", "sd21", "sd2-inpainting", "sd15", "sd15-inpainting"}
    for name, preset in table.items():
        assert preset["sha256"] is None or len(preset["sha256"]) == 64, name
        cfg = minisd.load_config(name)
        assert (cfg.prediction, cfg.resolution) == {"sd2-base": ("eps", 512), "sd2": ("v", 768),
                                                    "sd21-base": ("eps", 512), "sd21": ("v", 768),
                                                    "sd2-inpainting": ("eps", 512), "sd15": ("eps", 512),
                                                    "sd15-inpainting": ("eps", 512)}[name]
        assert cfg.text.tower == ("openai" if name.startswith("sd15") else "openclip"), name
    assert minisd.load_config("sd2-inpainting").unet.in_channels == 9
    assert minisd.load_config("sd15-inpainting").unet.in_channels == 9
    sd15 = minisd.load_config("sd15")   # v1-inference.yaml: 8 heads, 768-wide context, 1x1-conv projections
    assert (sd15.unet.num_heads, sd15.unet.num_head_channels, sd15.unet.context_dim) == (8, -1, 768)
    assert not sd15.unet.use_linear_in_transformer and sd15.text.layer == "last" and sd15.text.width == 768
    assert minisd.load_config("sd21").unet.upcast_attention and not minisd.load_config("sd2").unet.upcast_attention


def test_counter_is_not_a_state_dict(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"a": collections.OrderedDict(b=1)}, path)
    assert "holds no state dict of tensors" in load_error(path, config=TINY_CONFIG)
