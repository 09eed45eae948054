"""Textual-inversion embeddings: read the formats people have, write ours, splice vectors into the text tower.

`python -m medti.embeddings info FILES` lists what each file holds; `export IN OUT --format a1111|diffusers` converts
one. The formats themselves are read and written by medti/files/embedding_file.py.
"""
from pathlib import Path

from .cli import ArgumentParser, run_main
from .files.embedding_file import EmbeddingError, embedding_files, export, read, summary


def run(args):
    if args.command == "info":   # per file: one summary line, then the metadata indented
        for f in embedding_files(args.files):
            e = read(f)
            print(f"{f}: {summary(e)}", *(f"  {k}: {v}" for k, v in sorted(e.meta.items())), sep="\n", flush=True)
        return
    out = Path(args.output)
    if out.is_dir() or (out.exists() and not args.force):
        raise EmbeddingError(f"{out}: exists; choose another output file" +
                             ("" if out.is_dir() else ", or pass --force to overwrite it"))
    if not out.parent.is_dir():
        raise EmbeddingError(f"{out}: the folder {out.parent} does not exist; create it first")
    e = read(args.input)
    export(e, out, args.format)
    print(f"wrote {out} ({args.format}): {summary(e)}")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m medti.embeddings", description=__doc__.splitlines()[0],
                                     epilog="example: python -m medti.embeddings info tests/data/paper-embeddings/")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="convert one embedding file to A1111 .pt or diffusers .safetensors")
    p.add_argument("input", help="an embedding file in any format medti reads")
    p.add_argument("output", help="the file to write; an existing one only with --force")
    p.add_argument("--format", required=True, choices=("a1111", "diffusers"))
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    sub.add_parser("info", help="token, vectors, width, mean norm and metadata of each file").add_argument(
        "files", nargs="+", help="embedding files, or folders searched recursively")
    return run_main(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
