"""The training prompts: what the text tower reads for each image -- the token or the instance prompt, through the
--template lines, with each image's caption in its {caption} slot (--captions) -- and the same prompts without the
slot, for what has no caption of its own. Split from config.py, which checks them with the other flags."""
from pathlib import Path

from minisd.errors import arg, quoted

from . import TrainError


def training_prompts(cfg) -> list:
    """The token alone (the study's recipe) or the instance prompt (lora), or one prompt per --template line with
    "{}" replaced by it. `cfg`: a medti.training.config.TrainConfig."""
    subject = cfg.token if cfg.method == "ti" else cfg.instance_prompt
    if not cfg.template:
        return ["{}, {caption}".replace("{}", subject)] if cfg.captions else [subject]
    if not Path(cfg.template).exists():
        raise TrainError(f"{arg('template')} {cfg.template}: no such file")
    try:
        lines = [line.strip() for line in Path(cfg.template).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"{arg('template')} {cfg.template}: cannot read it ({e})") from None
    bad = next((line for line in lines if "{}" not in line), None)
    if not lines or bad is not None:
        raise TrainError(f"{arg('template')} {cfg.template}: every line needs a {{}} for the token" +
                         (f" (not {quoted(bad)})" if bad else " (the file is empty)"))
    if cfg.captions and not any("{caption}" in line for line in lines):   # the captions would be read for nothing
        raise TrainError(f"{arg('captions')} with {arg('template')} {cfg.template}: no line has a {{caption}} slot "
                         "for the caption files; add one (e.g. \"{}, {caption}\") or leave out " + arg("captions"))
    return [line.replace("{}", subject) for line in lines]


def uncaptioned(prompts: list) -> list:
    """The prompts without their {caption} slot, for what has no caption of its own: the previews, the held-out
    images, the token-length check."""
    return [" ".join(p.replace(", {caption}", "").replace("{caption}", "").split()) for p in prompts]
