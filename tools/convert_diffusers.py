"""Convert a diffusers Stable Diffusion folder (SD1.x or SD2.x) into one official single-file checkpoint.

    python tools/convert_diffusers.py FOLDER OUT.safetensors [--config-out OUT.json]

minisd.load reads such a folder directly; this tool is for a single file (other tools, A1111, ComfyUI). FOLDER is
what `save_pretrained` writes (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/); it is read and
checked by minisd.diffusers (every config field, the tokenizer, the weight files: see there). OUT gets the tensors
under the official prefixes `model.diffusion_model.` (UNet), `first_stage_model.` (VAE) and the text tower's
(SD2: `cond_stage_model.model.`, SD1: `cond_stage_model.transformer.text_model.`). Nothing is invented: no
`resblocks.23`, `text_projection`, `logit_scale` or DDPM schedule buffers, which inference never uses.

The config JSON (default: OUT with a .json suffix) is minisd's own format (minisd/config.py; ldm YAML / OpenCLIP /
transformers names), so `minisd.load(OUT, config=OUT.json)` loads the result.

The state-dict functions `convert_unet`, `convert_vae`, `convert_text` (used by the tests to build official-layout
files from diffusers/transformers modules) rename a whole state dict by minisd.diffusers_keys; having no config,
they read the UNet's per-level layout from the key names.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from safetensors.torch import save_file

from minisd import diffusers as folders
from minisd import diffusers_config as folder_configs
from minisd import diffusers_keys as names
from minisd.config import LoadError, parse_config

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.model."}


class ConvertError(ValueError):
    """Bad input; the CLI prints the message as one line."""


def _convert(state_dict: dict, rename) -> dict:
    try:
        plan = names.plan(state_dict, rename)
    except ValueError as err:
        raise ConvertError(str(err)) from None
    return {name: names.assemble(name, [state_dict[key] for key in keys]) for name, keys in plan.items()}


def convert_unet(state_dict: dict) -> dict:
    """diffusers UNet2DConditionModel -> ldm openaimodel.UNetModel names (no prefix)."""
    # Without a config: layers per block = ResBlocks of the first down level; attention levels from the key names.
    resnets = {m[1] for k in state_dict if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    levels = 1 + max((int(m[1]) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.", k))), default=-1)
    attention = tuple(any(k.startswith(f"up_blocks.{i}.attentions.") for k in state_dict) for i in range(levels))
    return _convert(state_dict, lambda key: names.unet_name(key, len(resnets), attention))


def convert_vae(state_dict: dict) -> dict:
    """diffusers AutoencoderKL -> ldm AutoencoderKL names (no prefix)."""
    levels = 1 + max((int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    return _convert(state_dict, lambda key: names.vae_name(key, levels))


def convert_text(state_dict: dict) -> dict:
    """transformers CLIPTextModel (SD2's, 23 layers) -> OpenCLIP text tower names (no prefix)."""
    return _convert(state_dict, names.openclip_name)


def _unet_config(u: dict) -> dict:
    """unet/config.json's dict -> our `unet` section (minisd.diffusers_config.unet_section; errors name the
    file)."""
    return folder_configs.unet_section(Path("unet/config.json"), u)


def _section(read, path: Path):
    """Apply `read` to the JSON at `path`, errors naming the file."""
    try:
        return read(folder_configs.read_json(Path(path)))
    except LoadError as err:
        raise ConvertError(str(err)) from None


def config_from_diffusers(folder) -> dict:
    """The folder's configs in minisd's JSON config format (minisd.diffusers_config.read_config)."""
    return folder_configs.read_config(folder)


def convert_folder(folder) -> tuple[dict, dict]:
    """(official state dict with component prefixes, config) for a diffusers SD1/SD2 folder."""
    config = folder_configs.read_config(folder)
    parse_config(config, str(folder))   # the same checks as minisd.load, before any tensor is read
    file = folders.FolderFile(Path(folder), config)
    return {key: file.get(key).contiguous() for key in sorted(file.keys)}, config


def write_outputs(state_dict: dict, config: dict, out: Path, config_out: Path):
    """Write both files to temporaries next to their targets, then rename: no half-written output on failure."""
    tmp_out, tmp_config = (path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in (out, config_out))
    try:
        save_file(state_dict, tmp_out, metadata={"format": "pt"})
        # Why: safetensors' save_file creates its file with mode 0600; the model should be as readable as any file
        # the user writes (mode 0666 less the umask), like the config beside it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_out, 0o666 & ~umask)
        tmp_config.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp_out, out)
        os.replace(tmp_config, config_out)
    finally:
        tmp_out.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="diffusers SD1/SD2 folder (model_index.json, unet/, vae/, ...)")
    parser.add_argument("out", type=Path, help="output .safetensors")
    parser.add_argument("--config-out", type=Path, help="output config JSON (default: OUT with .json suffix)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    args = parser.parse_args(argv)
    config_out = args.config_out or args.out.with_suffix(".json")
    existing = [p for p in (args.out, config_out) if p.exists()]
    if existing and not args.force:
        sys.exit(f"convert_diffusers: error: {existing[0]} exists; choose another output, or pass --force to "
                 "overwrite it")
    try:
        state_dict, config = convert_folder(args.folder)
        write_outputs(state_dict, config, args.out, config_out)
    except (LoadError, ConvertError, OSError) as err:
        sys.exit(f"convert_diffusers: error: {err}")
    print(f"wrote {args.out} ({len(state_dict)} tensors) and {config_out}")


if __name__ == "__main__":
    main()
