"""Text conditioning: prompts -> the context [B, 77, width] the UNet cross-attends to.

One object owns all of it: the tokenizer (with the padding rule of its model), the text tower (SD2's OpenCLIP
or SD1's OpenAI CLIP, as the config's text.tower states) and the textual-inversion vectors spliced into the
token embeddings. A placeholder token gets its ids and its vectors in the same call (`add`), so the two cannot
drift apart. Other kinds of conditioning (image embeddings) would be objects beside this one on the model.
"""
import torch

from .clip import TextConfig, TextTransformer
from .clip_openai import OpenAITextConfig, OpenAITextTransformer
from .tokenizer import VOCAB_SIZE, Tokenizer

TOWERS = {"openclip": TextTransformer, "openai": OpenAITextTransformer}   # text.tower -> its network


class TextConditioning:
    """`text(["a chest x-ray", ...])` -> [B, 77, width]; `text.add("<cxr>", vectors)` teaches it a new token.

    tokenizer: text -> ids (placeholders expand to ids >= 49408); tower: the network, loaded from the checkpoint's
    text keys; vectors: {token: [n, width] float32} for each added token, in the order of their ids."""

    def __init__(self, cfg: TextConfig | OpenAITextConfig):
        self.cfg = cfg
        self.tokenizer = Tokenizer(pad_id=cfg.pad_id)
        self.tower = TOWERS[cfg.tower](cfg)
        self.vectors: dict[str, torch.Tensor] = {}

    @property
    def width(self) -> int:
        return self.cfg.width

    def add(self, token: str, vectors: torch.Tensor) -> list[int]:
        """Register `token` with n new ids and its vectors [n, width]; returns the ids. ValueError for a token that
        is a vocabulary word or already added, or vectors of another width or not finite."""
        if vectors.ndim != 2 or vectors.shape[1] != self.width or not torch.isfinite(vectors).all():
            raise ValueError(f"vectors for {token!r} must be finite [n, {self.width}], not {list(vectors.shape)}")
        ids = self.tokenizer.add_placeholder(token, len(vectors))
        self.vectors[token] = vectors.detach().float().cpu()
        return ids

    def count(self, text: str) -> int:
        """Tokens a text takes, placeholders expanded, without start/end (the limit is MAX_PROMPT_TOKENS)."""
        return len(self.tokenizer.encode(text))

    def __call__(self, texts: list[str], override: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Prompts -> tower output [B, 77, width], added vectors spliced in at their ids.

        override {token: [n, width]} replaces an added token's vectors for this call -- the trainable parameter of
        textual inversion; the result is differentiable with respect to it."""
        override = override or {}
        if set(override) - set(self.vectors):
            raise ValueError(f"override for {sorted(set(override) - set(self.vectors))[0]!r}, which was never added")
        # detach(): the table is only read, and stays bit-identical even if the tower was built trainable.
        table = self.tower.token_embedding.weight.detach()                   # [49408, width]
        ids = self.tokenizer(texts).to(table.device)                         # [B, 77]
        is_new = ids >= VOCAB_SIZE
        x = torch.nn.functional.embedding(ids.masked_fill(is_new, 0), table)   # placeholders: row 0 for now
        if not is_new.any():
            return self.tower.forward_embeddings(x)
        for token, vectors in override.items():
            if vectors.shape != self.vectors[token].shape:
                raise ValueError(f"override for {token!r} has shape {list(vectors.shape)}, its vectors are "
                                 f"{list(self.vectors[token].shape)}")
        # Row i of `extra` is id VOCAB_SIZE + i: add() hands out consecutive ids in the order of self.vectors.
        extra = torch.cat([override.get(t, v).to(table) for t, v in self.vectors.items()])
        if set(self.tokenizer.placeholders) != set(self.vectors):   # ids registered on the tokenizer directly
            bare = sorted(set(self.tokenizer.placeholders) - set(self.vectors))
            raise ValueError(f"placeholder(s) {bare} have ids but no vectors; register tokens with add()")
        spliced = extra[(ids - VOCAB_SIZE).clamp(min=0)]                       # [B, 77, width]
        return self.tower.forward_embeddings(torch.where(is_new[..., None], spliced, x))
