"""Build the CLIP BPE vocabulary committed in weights/ from OpenAI's public merges file.

Source: `bpe_simple_vocab_16e6.txt.gz`, first published with openai/CLIP (MIT, (c) 2021 OpenAI) and bundled
unchanged in the open_clip_torch wheel (MIT). Fetch the wheel without its dependencies (they pull torchvision
and a second torch) and point this script at it, or at the .gz already taken out of it:

    pip download open_clip_torch==3.3.0 --no-deps -d /tmp/ocw
    python tools/build_vocab.py /tmp/ocw/open_clip_torch-3.3.0-py3-none-any.whl

Writes, in weights/ (plain text, reviewable with `less`):
    clip_merges.txt        "#version: 0.2" header, then the 48,894 merges in rank order, one "a b" a line
    clip_vocab.json        token -> id, one entry a line, 49,408 entries
    LICENSE-clip-bpe.txt   where the file came from and the MIT notices it carries

The vocabulary is built exactly as openai/CLIP `clip/simple_tokenizer.py` and open_clip `tokenizer.py`
(SimpleTokenizer.__init__) build it in memory; we only write the result down.
"""
import argparse
import gzip
import hashlib
import json
import sys
import zipfile
from pathlib import Path

GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
# 49152 = 48,894 merges + 256 byte tokens + 2 special tokens (CLIP's own slice bound, kept as CLIP writes it).
N_MERGES = 49152 - 256 - 2
# OpenCLIP names its special tokens <start_of_text>/<end_of_text> (openai/CLIP: <|startoftext|>/<|endoftext|>).
# SD2 was trained with OpenCLIP's tokenizer, so we use OpenCLIP's names: a prompt that contains the literal
# text "<start_of_text>" then gets id 49406 in both implementations.
SPECIAL_TOKENS = ["<start_of_text>", "<end_of_text>"]


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte -> printable character table (256 entries, in CLIP's order).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, NBSP, soft hyphen...) map
    to chr(256), chr(257), ... in byte order, so that no BPE symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    # Dict order is CLIP's order: the printable bytes first (ascending), then the remapped ones (ascending).
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def read_merges_text(path: Path) -> tuple[str, bytes]:
    """Return the decompressed merges file and the raw .gz bytes, from a .gz or from the wheel holding it."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith("/" + GZ_NAME))
            raw = wheel.read(member)
    else:
        raw = path.read_bytes()
    return gzip.decompress(raw).decode("utf-8"), raw


def read_license(path: Path) -> str:
    """The LICENSE shipped in the wheel's metadata, if we were given the wheel."""
    if path.suffix != ".whl":
        return ""
    with zipfile.ZipFile(path) as wheel:
        names = [n for n in wheel.namelist() if ".dist-info/" in n and n.rsplit("/", 1)[-1].startswith("LICENSE")]
        return wheel.read(names[0]).decode("utf-8") if names else ""


def build(text: str) -> tuple[list[tuple[str, str]], dict[str, int]]:
    lines = text.split("\n")
    # Line 0 is the header ("bpe_simple_vocab_16e6.txt#version: 0.2"); then merges in rank order.
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges), "unexpected merges file layout"
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + SPECIAL_TOKENS
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, f"expected 49,408 distinct tokens, got {len(vocab)}"
    assert vocab["<start_of_text>"] == 49406 and vocab["<end_of_text>"] == 49407
    return merges, vocab


def license_note(source: Path, sha256: str, wheel_license: str) -> str:
    note = f"""The files clip_vocab.json and clip_merges.txt in this folder are derived from
{GZ_NAME} (sha256 {sha256}),
the byte-pair-encoding merges of OpenAI CLIP, as bundled in the open_clip_torch wheel
({source.name}). tools/build_vocab.py rebuilt them; the token list is the one CLIP builds in memory.

Origin of the merges file: https://github.com/openai/CLIP (clip/bpe_simple_vocab_16e6.txt.gz),
MIT License, Copyright (c) 2021 OpenAI.
Redistributed by: https://github.com/mlfoundations/open_clip, MIT License (text below).

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
    if wheel_license:
        note += "\n--- open_clip LICENSE, as shipped in the wheel's metadata ---\n\n" + wheel_license.strip() + "\n"
    return note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help=f"open_clip_torch wheel (.whl) or {GZ_NAME}")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "weights")
    args = parser.parse_args(argv)

    text, raw = read_merges_text(args.source)
    merges, vocab = build(text)
    # newline="\n" everywhere: identical bytes on every OS, so the files' hashes are stable.
    with open(args.out / "clip_merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")  # the header line tokenizers/transformers expect and skip
        f.writelines(f"{a} {b}\n" for a, b in merges)
    with open(args.out / "clip_vocab.json", "w", encoding="utf-8", newline="\n") as f:
        # indent=0: one "token": id pair per line, so a diff or a grep shows single entries.
        f.write(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    with open(args.out / "LICENSE-clip-bpe.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write(license_note(args.source, hashlib.sha256(raw).hexdigest(), read_license(args.source)))
    print(f"wrote {len(merges)} merges and {len(vocab)} tokens to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
