"""A diffusers Stable Diffusion folder (SD1.x or SD2.x) read directly, under the official single-file key names.

`open_folder(path)` checks model_index.json and every component's config against what minisd implements -- each
config field is either mapped to our config, required to have the one value minisd computes, or named as ignored
(and why) -- and returns a FolderFile (the interface of minisd.tensorfile.TensorFile) plus the ModelConfig. Tensors are
read lazily, one by one, from the component's weight files; names are mapped by minisd.diffusers_keys.

Weights of a component (unet/, vae/: `diffusion_pytorch_model`; text_encoder/: `model`, `.bin`: `pytorch_model`),
the first that exists: STEM.safetensors; STEM.safetensors.index.json (shards, by its weight_map); the fp16 variant
STEM.fp16.safetensors; STEM.safetensors.index.fp16.json; then the pickles STEM.bin, STEM.fp16.bin, read with
torch.load(weights_only=True) (minisd.tensorfile.TensorFile). Sharded pickles are not read.
"""
from pathlib import Path

from . import clip, clip_openai, diffusers_keys
from .config import LoadError, ModelConfig, parse_config
from .diffusers_config import need, read_config, read_json
from .tensorfile import UNET, VAE, TensorFile

STEMS = {"unet": ("diffusion_pytorch_model",) * 2, "vae": ("diffusion_pytorch_model",) * 2, "text_encoder": ("model",
         "pytorch_model")}   # (safetensors stem, pickle stem): transformers names its pickle differently


def weight_files(folder: Path) -> list[Path]:
    """The component's weight files by the rule in the module docstring."""
    st, pickle = STEMS[folder.name]
    for name in (f"{st}.safetensors", f"{st}.safetensors.index.json", f"{st}.fp16.safetensors",
                 f"{st}.safetensors.index.fp16.json", f"{pickle}.bin", f"{pickle}.fp16.bin"):
        if (folder / name).is_file():
            if not name.endswith(".json"):
                return [folder / name]
            shards = read_json(folder / name).get("weight_map", {})
            need(folder / name, isinstance(shards, dict) and shards, "has no weight_map")
            return [folder / shard for shard in sorted(set(shards.values()))]
    raise LoadError(f"{folder}: no weights ({st}.safetensors, sharded or fp16, or {pickle}.bin)")


class FolderFile:
    """The weights of a folder under the official single-file key names, with TensorFile's interface. Each name
    knows the source tensors it is made of (diffusers_keys.plan); tensors are read when asked for."""

    def __init__(self, path: Path, cfg: dict):
        self.path, self._parts = path, {}
        unet, levels = cfg["unet"], len(cfg["unet"]["channel_mult"])   # up level i mirrors down level levels-1-i
        layout = unet["num_res_blocks"], tuple(2 ** (levels - 1 - i) in unet["attention_resolutions"]
                                               for i in range(levels))
        text_prefix, text_name = ((clip_openai.PREFIX, diffusers_keys.openai_name) if cfg["text"]["tower"] ==
                                  "openai" else (clip.PREFIX, diffusers_keys.openclip_name))
        for sub, prefix, rename in (("unet", UNET, lambda k: diffusers_keys.unet_name(k, *layout)),
                                    ("vae", VAE, lambda k: diffusers_keys.vae_name(k, len(cfg["vae"]["ch_mult"]))),
                                    ("text_encoder", text_prefix, text_name)):
            self._add(path / sub, prefix, rename)
        self.keys = set(self._parts)
        self.metadata = {}   # a diffusers folder states no image conditioning: its models are text models

    def _add(self, folder: Path, prefix: str, rename):
        files = {}
        for file in weight_files(folder):
            if not file.is_file():
                raise LoadError(f"{file}: missing (named by the shard index)")
            tensors = TensorFile(file)
            twice = sorted(tensors.keys & set(files))
            need(folder, not twice, f"{twice[0] if twice else ''} is in both {file.name} and another weight file")
            files |= {key: tensors for key in tensors.keys}
        try:
            plan = diffusers_keys.plan(files, rename)
        except ValueError as e:
            raise LoadError(f"{folder}: {e} -- not an SD1/SD2 {folder.name}") from None
        self._parts |= {prefix + name: [(files[k], k) for k in keys] for name, keys in plan.items()}

    def shape(self, key: str) -> tuple:   # from the headers: no tensor is read
        return diffusers_keys.assembled_shape(key, [file.shape(k) for file, k in self._parts[key]])

    def dtype(self, key: str) -> str:   # of the first part; q/k/v of one layer come from one file
        return self._parts[key][0][0].dtype(self._parts[key][0][1])

    def get(self, key: str):
        return diffusers_keys.assemble(key, [file.get(k) for file, k in self._parts[key]])


def open_folder(path) -> tuple[FolderFile, ModelConfig]:
    """(the folder's weights under official names, its ModelConfig); one-line LoadError for anything minisd does
    not run."""
    path = Path(path)
    data = read_config(path)
    return FolderFile(path, data), parse_config(data, str(path))
