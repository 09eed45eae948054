"""Generate images with SD1/SD2 and learned embeddings: `python -m medti.generate`.

    python -m medti.generate --model sd2-base --embeddings embeddings/ \\
        --prompt "chexpert_healthy :0.25 AND chexpert_cardiomegaly :0.75" --n 4 --seed 0 --out out/

Image i uses its own generator seeded with seed + i, so any image can be remade alone, whatever the batch or the
number of processes. Each PNG carries its parameters in a `parameters` text chunk (the A1111 convention) and one
line in DIR/manifest.jsonl (`--format dicom`: also NNNNN.dcm). Every mistake is one line before any sampling.

Sharding: under `torchrun --nproc_per_node N -m medti.generate -- ...` (the `--` keeps torchrun from reading
`--n` as an abbreviation of its own options; it drops the `--`), or any launcher that sets RANK and
WORLD_SIZE) rank r makes the images i with i % N == r and logs them to its own DIR/manifest.part<r>.jsonl; whichever
process finishes last (or a later `--resume`) merges the parts into manifest.jsonl. No process group is needed.
"""
from .cli import run_main
from .generation.flags import build_parser
from .generation.run import run


def main(argv=None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
