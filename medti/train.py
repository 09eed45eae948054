"""Train on a folder of images: textual inversion (a token's vectors; the default), a LoRA (--method lora) or the
UNet's own weights (--method unet). `python -m medti.train`.

    python -m medti.train --model sd2-base --data cxr/cardiomegaly --token "<cardiomegaly>" \\
        --preprocess cxr --out runs/cardiomegaly
    python -m medti.train --model sd2-base --data cxr/cardiomegaly --method lora \\
        --instance-prompt "a chest x-ray of sks" --preprocess cxr --out runs/cxr-lora
    python -m medti.train --demo --out demo-run      # offline, a tiny random model, about two minutes on a CPU

This module is only the command line: one flag per TrainConfig field (medti/training/config.py), plus --demo. It
hands the settings to the trainer (medti/training/trainer.py) or to the demo (medti/training/demo.py), which is a user
of the trainer like this command; --demo is therefore not a training setting and never reaches a run's saved state.
"""
import argparse
import sys

from .cli import ArgumentParser, add_threads, run_main
from .training.command import resumed_config
from .training.config import TrainConfig, add_flags
from .training.demo import run_demo
from .training.demo_image import run_image_demo
from .training.distributed import main_process
from .training.trainer import run as train


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m medti.train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p)
    add_threads(p)
    p.add_argument("--demo", action="store_true", help="run the offline demo on a tiny random model "
                                                       "(medti/training/demo.py; with --condition dinov2 the image-"
                                                       "conditioned one, demo_image.py); its outputs go to --out, "
                                                       "default demo-run (demo-dino)")
    return p


def run(args: argparse.Namespace, argv: list):
    typed = build_parser().typed(argv) - {"demo", "threads"}   # which settings the user chose, for --resume
    settings = vars(args)
    demo = settings.pop("demo")
    settings.pop("threads")   # applied by run_main; not a training setting (bits differ between counts: say so)
    cfg = TrainConfig(**settings)
    if demo:   # --condition dinov2: the image-conditioned demo (DiNO-Diffusion's pipeline)
        (run_image_demo if cfg.condition else run_demo)(cfg, typed, argv)
    else:
        path = train(resumed_config(cfg, typed), argv)   # --resume: the flags not typed are the run's
        if main_process():   # one line for scripts, not one per torchrun process
            print(path)   # the embedding's path, on stdout for scripts; progress went to stderr


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(build_parser(), lambda args: run(args, argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
