"""What a generation run tells its user on stderr: a line per sampler step with an ETA, and a summary at the end.

A 512x512 image on a CPU takes minutes, so silence until the first file appears looks like a hang. On a terminal
the step line is rewritten in place (medti.cli.status); into a log file (not a terminal) a new line is written at
most every LOG_EVERY_S seconds and at the end of every batch, so a 2,000-image run does not log 200,000 lines.
Lines carry "[rank r]" only under torchrun (WORLD_SIZE > 1), where several processes share one stderr.

The time per image is measured from the end of the run's first sampler step on: that step pays one-off costs
(memory allocation, the CPU's kernel choices, a GPU's warm-up), and an ETA computed from it was far off.
"""
import sys
import time

from ..cli import status

LOG_EVERY_S = 5.0


def duration(seconds: float) -> str:
    """42 s, 3m05s, 2h07m: short enough for a progress line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts images done and sampler steps within the current batch; estimates the rest from the time per image
    since the first step (sampling, decoding and writing included)."""

    def __init__(self, total: int, rank: int = 0, world: int = 1, stream=None):
        self.total, self.done, self.batch = total, 0, 1
        self.prefix = f"[rank {rank}] " if world > 1 else ""
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.warm = None   # (time, images' worth done) at the end of the first sampler step

    def begin(self, images: int):
        """A batch of `images` images starts."""
        self.batch = images

    def step(self, step: int, steps: int):
        """pipeline.sample's progress callback: `step` of `steps` sampler steps of the current batch are done."""
        now = time.perf_counter()
        final = step == steps
        made = self.done + self.batch * step / steps   # images' worth of work done so far
        self.warm = self.warm or (now, made)
        if not (self.tty or final or now - self.last >= LOG_EVERY_S):
            return
        self.last = now
        which = f"{self.done + 1}" if self.batch == 1 else f"{self.done + 1}-{self.done + self.batch}"
        line = f"{self.prefix}image {which}/{self.total}: step {step}/{steps}, "
        if made > self.warm[1]:
            rate = (now - self.warm[0]) / (made - self.warm[1])
            line += f"{duration(rate)}/image, ETA {duration(rate * (self.total - made))}"
        else:   # the first step: its time is mostly warm-up
            line += "ETA: measuring" if made < self.total else "ETA 0 s"
        status(line, self.stream, final)

    def end_batch(self):
        self.done += self.batch

    def summary(self, out, skipped: int):
        """The last line: what was made, how long it took, where it is."""
        took = time.perf_counter() - self.start
        rate = f" ({duration(took / self.done)}/image)" if self.done else ""
        kept = f"; {skipped} already there (--resume)" if skipped else ""
        print(f"{self.prefix}made {self.done} image(s) in {duration(took)}{rate} in {out}{kept}",
              file=self.stream, flush=True)
