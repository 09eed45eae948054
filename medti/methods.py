"""What trains, for medti/trainer.py's one loop (`--method`): each method says which tensors train, how a batch of
prompts becomes the UNet's conditioning, and what file a save writes. The loop, the data, the randomness, the
resumable state and the checks are the trainer's, the same for every method.

A method is a small object with:
  params     {name: nn.Parameter}, fp32, the only tensors AdamW sees (saved with their moments in state.safetensors)
  stem       the saved file's name without `.safetensors` (`<stem>-<step>`, `<stem>-best` beside it)
  context(texts) -> [B, 77, width] conditioning, differentiable w.r.t. params where the text side trains
  prompt     what the previews show
  record()   extra numbers for each log.jsonl line
  write(path, meta)   the shareable file (atomic)
  sync()     after each optimizer step: copy what trained into the model where the model holds a copy of it
"""
import torch
from torch import nn

from minisd.errors import arg
from minisd.tokenizer import MAX_PROMPT_TOKENS

from . import embeddings as emb
from .inversion import TrainError, initial_vectors


def attach_token(sd, cfg, prompts: list) -> torch.Tensor:
    """Add the token to the model's text conditioning and return its start vectors; every prompt must still fit."""
    start = initial_vectors(sd, cfg.init, cfg.vectors, cfg.seed)
    # a clash with a loaded word raises EmbeddingError, a UserError: it reaches the user as one line
    emb.attach(sd, {cfg.token: emb.Embedding(cfg.token, start, {}, source=arg("token"))})
    longest = max(sd.text.count(p) for p in prompts)
    if longest > MAX_PROMPT_TOKENS:
        raise TrainError(f"a training prompt holds {longest} tokens with {arg('vectors')} {cfg.vectors}; at most "
                         f"{MAX_PROMPT_TOKENS} fit")
    return start


class TextualInversion:
    """--method ti: one [vectors, width] fp32 tensor, spliced into the frozen token embeddings wherever the token
    appears in a prompt (the token alone, or --template lines); the UNet and the text tower never change."""

    def __init__(self, sd, cfg, prompts: list, device):
        self.sd, self.token = sd, cfg.token
        self.vectors = nn.Parameter(attach_token(sd, cfg, prompts).to(device))
        self.params = {"vectors": self.vectors}
        self.stem = cfg.token.strip("<>")   # the token without <>: names the embedding files
        self.prompt = cfg.token              # previews: the token alone

    def context(self, texts: list) -> torch.Tensor:
        return self.sd.text(texts, override={self.token: self.vectors})

    def record(self) -> dict:
        return {"vector_norm": self.vectors.detach().norm(dim=1).mean().item()}

    def write(self, path, meta: dict):
        emb.write(path, emb.Embedding(self.token, self.vectors.detach().float().cpu().clone(), meta))

    def sync(self):
        pass   # the vectors are used where they are: nothing in the model holds a copy


METHODS = {"ti": TextualInversion}


def make(sd, cfg, prompts: list, device):
    """The method --method names, built on the loaded model."""
    return METHODS[getattr(cfg, "method", "ti")](sd, cfg, prompts, device)
