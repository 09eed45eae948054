"""Generation: sampling with composable prompts, img2img and inpainting (pipeline.py), prompt parsing, checks before
the model loads (flags.py, preflight.py), LoRAs applied at load time, the resumable manifest, progress lines, and
one `python -m medti.generate` run (run.py). `python -m medti.generate` is its command.
"""
