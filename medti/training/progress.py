"""How fast a training run goes and when it ends: the rate logged at every step and the ETA of the progress line,
with the previews still to come counted in.

Two costs would make a naive "time so far / steps so far" wrong. The first step of a session pays one-off costs
(memory allocation, the CPU's kernel choices, a GPU's warm-up), so the rate is measured from the end of that step
on, and the first line says "ETA: measuring" rather than a number ten times too large. And previews are long pauses
at fixed steps (4 images, each sampler step a UNet call with and without the prompt), not a cost per step: they
are timed apart, left out of the rate, and added to the ETA as (previews to come) x (the last one's time).
"""
import time
from dataclasses import dataclass, field

from ..generation.progress import duration


def previews_left(step: int, total: int, every: int) -> int:
    """The previews due at steps step..total (step's own included: at its progress line it is still to come)."""
    return total // every - (step - 1) // every if every else 0


@dataclass
class Clock:
    """The timing of one session of a run (a resumed run starts a new one): what the progress line needs."""
    first: int                                   # the step this session started from
    started: float = field(default_factory=lambda: time.perf_counter())   # read at creation, not at import
    warm: float | None = None                    # when the session's first step ended: the rate counts from here
    paused: float = 0.0                          # seconds of previews since then: not training time
    preview_s: float | None = None               # the last preview's time, for the previews still to come
    per_s: float = 0.0                           # the rate at the last step

    def tick(self, step: int) -> float:
        """Steps per second once `step` is done: from the session's second step on, previews left out; at the
        first step, that step's own (warm-up included: nothing else has been measured yet)."""
        now = time.perf_counter()
        if self.warm is None:
            self.warm = now
            self.per_s = 1 / max(now - self.started, 1e-9)
        else:
            self.per_s = (step - self.first - 1) / max(now - self.warm - self.paused, 1e-9)
        return self.per_s

    def previewed(self, seconds: float):
        """A preview took `seconds`: not training time, whether it came before the session's first step (a resumed
        run's missing preview) or after."""
        if self.warm is None:
            self.started += seconds
        else:
            self.paused += seconds
        self.preview_s = seconds

    def eta(self, step: int, total: int, every: int) -> str:
        """`ETA 3m10s`, with the previews still to come: timed ones included in the figure, untimed ones said."""
        if step == self.first + 1 and step < total:
            return "ETA: measuring"
        seconds, previews = (total - step) / self.per_s, previews_left(step, total, every)
        if not previews:
            return f"ETA {duration(seconds)}"
        if self.preview_s is None:   # no preview timed yet: a guess would be off by as much as the first ETA was
            return f"ETA {duration(seconds)} + {previews} preview(s), not timed yet"
        return f"ETA {duration(seconds + previews * self.preview_s)} ({previews} preview(s) included)"
