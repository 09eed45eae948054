"""The CLIP BPE tokenizer as SD2 (and, with EOT padding, SD1) uses it, with textual-inversion placeholders.

SD2's text tower was trained on OpenCLIP's `SimpleTokenizer` (mlfoundations/open_clip, src/open_clip/tokenizer.py,
itself a copy of openai/CLIP clip/simple_tokenizer.py), default clean="lower". This file reproduces it on the
`tokenizers` library (BPE model, byte-level alphabet, CLIP's split regex); tests/test_tokenizer.py checks the ids
against OpenCLIP's own code on varied prompts. The vocabulary is weights/clip_vocab.json + clip_merges.txt, built
by tools/build_vocab.py from CLIP's public merges file.

Known gap: OpenCLIP first runs `ftfy.fix_text`, which repairs mojibake ("cafÃ©" -> "café"), applies Unicode NFC,
straightens curly quotes (“x” -> "x"), expands ligatures ("ﬁ" -> "fi"), narrows full-width forms ("ＡＢ" -> "AB"),
drops control characters and unescapes HTML to a fixed point ("&amp;amp;amp;" -> "&") when the text has no "<".
ftfy is not a dependency here, so we skip it: for ordinary text (ASCII, composed accents, CJK, emoji, entities
escaped at most twice) the ids are identical; for the cases above they differ. Normalise such text first if needed.

SD1 (pad_id=PAD_SD1) was trained with transformers' CLIPTokenizer rather than OpenCLIP's; tests/test_clip_sd1.py
checks the ids against it. That tokenizer applies Unicode NFC and no html.unescape, so ids differ for decomposed
accents ("cafe" + U+0301) and HTML entities ("&amp;"); ordinary prompts, "!" included, give identical ids.

A second, deliberate corner: OpenCLIP recognises its special-token texts "<start_of_text>"/"<end_of_text>" inside
a prompt only where its regex starts a new piece there; we recognise them anywhere (tokenizers' added tokens), so
"!<end_of_text>" differs. No real prompt contains these texts.
"""
import html
import json
import re

import torch
from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from minisd.paths import weights_dir

VOCAB_SIZE = 49408  # 256 bytes + 256 bytes+"</w>" + 48,894 merges + 2 special tokens
SOT = 49406  # "<start_of_text>"
EOT = 49407  # "<end_of_text>"
# Pad with 0 ("!"), not with EOT: OpenCLIP fills its result with torch.zeros, and SD2 was trained on that. The
# text tower's causal mask means the pads never change the outputs at real positions, but they do change the
# outputs *at* the pad positions, which SD2's cross-attention reads. (transformers' SD2 tokenizer gets the same
# ids by declaring pad_token "!", at the price of turning every literal "!" into a pad; see the tests.)
PAD = 0
# SD1 pads with EOT instead: it was trained with transformers' CLIPTokenizer of openai/clip-vit-large-patch14
# (ldm FrozenCLIPEmbedder, padding="max_length"), whose pad_token is "<|endoftext|>" (id 49407); A1111 does the same
# for SD1 (modules/sd_hijack_clip.py: id_pad = id_end). The model config states which one a model uses.
PAD_SD1 = EOT
CONTEXT_LENGTH = 77
# What a prompt may hold: 77 positions, 2 of them the start and end tokens. The one home of the 75.
MAX_PROMPT_TOKENS = CONTEXT_LENGTH - 2

# OpenCLIP's pre-tokenisation regex, compiled with re.IGNORECASE there, hence (?i). Its special-token alternatives
# are left out: the specials are handled as added tokens (see the module docstring).
CLIP_SPLIT = r"""(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clean(text: str) -> str:
    """OpenCLIP's clean="lower" without ftfy: unescape HTML twice ("&amp;amp;" -> "&"), collapse whitespace, lower."""
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def load_backend() -> BackendTokenizer:
    """Build the `tokenizers` pipeline from weights/: split regex -> bytes as characters -> BPE."""
    folder = weights_dir()
    vocab = json.loads((folder / "clip_vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "clip_merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if not line.startswith("#version")]
    assert len(vocab) == VOCAB_SIZE and vocab["<start_of_text>"] == SOT and vocab["<end_of_text>"] == EOT, \
        f"{folder}/clip_vocab.json is not CLIP's vocabulary; rebuild it with tools/build_vocab.py"
    # end_of_word_suffix: CLIP marks the last symbol of each word ("cat" -> "c", "a", "t</w>"), so a whole word
    # and the same letters inside a longer word get different ids. No unk token: every byte is in the vocab.
    # ignore_merges stays False: CLIP always applies the merges, even to a piece that is itself a vocab entry.
    backend = BackendTokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>", ignore_merges=False))
    # Split keeps the regex matches and drops what lies between them (whitespace). ByteLevel then writes each
    # piece's UTF-8 bytes as CLIP's 256 printable characters (the GPT-2 table); use_regex=False because the
    # splitting is already done (its own regex is GPT-2's, not CLIP's).
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # The special-token texts map to their ids wherever they appear (after cleaning, so case-insensitively).
    backend.add_special_tokens([AddedToken("<start_of_text>"), AddedToken("<end_of_text>")])
    return backend


class Tokenizer:
    """Text -> CLIP ids: `tok(["a cat", ...])` gives a LongTensor [B, 77] of SOT, ids, EOT, then padding.

    pad_id: PAD (0, SD2's, the default) or PAD_SD1 (EOT, SD1's); the only thing the option changes.
    """

    def __init__(self, context_length: int = CONTEXT_LENGTH, pad_id: int = PAD):
        if pad_id not in (PAD, PAD_SD1):
            raise ValueError(f"pad_id must be {PAD} (SD2) or {PAD_SD1} (SD1), not {pad_id}")
        self.backend = load_backend()
        self.context_length = context_length
        self.pad_id = pad_id
        self.placeholders: dict[str, list[int]] = {}  # textual-inversion name -> its ids (all >= VOCAB_SIZE)
        self._next_id = VOCAB_SIZE
        self._placeholder_re: re.Pattern | None = None

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT, *self.encode(text), EOT]
            # OpenCLIP truncates to the context length, then overwrites the last id with EOT, so a long prompt
            # still ends in EOT (position 76), the position a pooled CLIP output would read.
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = EOT
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without SOT/EOT and without truncation (to count tokens); placeholders expanded."""
        if self._placeholder_re is None:
            return self._encode_plain(text)
        ids: list[int] = []
        # re.split with one capture group alternates: text, placeholder, text, placeholder, ..., text.
        for i, part in enumerate(self._placeholder_re.split(text)):
            ids += self.placeholders[part] if i % 2 else self._encode_plain(part)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        return self.backend.encode(clean(text), add_special_tokens=False).ids

    def add_placeholder(self, name: str, n_vectors: int = 1) -> list[int]:
        """Register `name` (e.g. "<chexpert>") to expand into `n_vectors` new consecutive ids >= 49408.

        The name is matched exactly and case-sensitively in the raw prompt, before any cleaning; longer names win
        where two overlap. The text around it is tokenized as usual. Returns the new ids.
        """
        if not name.strip():
            raise ValueError(f"placeholder name {name!r} is empty: it would match between every two characters")
        if name in self.placeholders:
            raise ValueError(f"placeholder {name!r} is already registered with ids {self.placeholders[name]}")
        if n_vectors < 1:
            raise ValueError(f"placeholder {name!r} needs n_vectors >= 1, got {n_vectors}")
        ids = self.encode(name)
        token = self.backend.id_to_token(ids[0]) if len(ids) == 1 else None
        # A name that is one whole vocabulary word ("cat" -> "cat</w>") or a special token would silently take
        # that word away from every prompt; a name that merely splits into pieces ("<cat>") is fine.
        if token is not None and (token.endswith("</w>") or ids[0] in (SOT, EOT)):
            raise ValueError(f"placeholder {name!r} is the vocabulary token {token!r} (id {ids[0]}); pick another")
        new_ids = list(range(self._next_id, self._next_id + n_vectors))
        self._next_id += n_vectors
        self.placeholders[name] = new_ids
        # Longest names first, so that "<a>" cannot steal the start of "<a>b" (regex alternation is leftmost-first).
        names = sorted(self.placeholders, key=len, reverse=True)
        self._placeholder_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        return new_ids
