"""Progress lines as a terminal shows them: a shorter line rewritten over a longer one leaves nothing of it ("ETA
1m30ss"), a message after a progress line starts on a line of its own ("ETA 1m30sinterrupted"), and the first
ETA is not computed from a step that carries the one-off warm-up."""
import argparse
import io

import pytest

from medti import cli
from medti.generation import progress as P


class Terminal(io.StringIO):
    """A stream that says it is a terminal; `screen()` is what a terminal would show."""

    def isatty(self):
        return True

    def screen(self) -> list:
        """The lines on screen: "\\r" returns to column 0 and overwrites, "\\n" starts a new line."""
        lines = []
        for written in self.getvalue().split("\n"):
            row = []
            for part in written.split("\r"):
                row[:len(part)] = part
            lines.append("".join(row))
        return lines


@pytest.fixture
def clock(monkeypatch):
    """time.perf_counter as the generation progress reads it, moved by hand: now[0] seconds."""
    now = [0.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: now[0])
    return now


def test_a_shorter_line_leaves_nothing_of_a_longer_one():
    terminal = Terminal()
    cli.status("image 1/9: step 10/20, 1m30s/image, ETA 12m30s", terminal)
    cli.status("image 1/9: step 11/20, 59 s/image, ETA 7m05s", terminal)
    assert terminal.screen()[-1].rstrip() == "image 1/9: step 11/20, 59 s/image, ETA 7m05s"


def test_the_generation_eta_shrinking_on_a_terminal_leaves_no_stale_characters(clock):
    """Four sampler steps of image 1 of 2; the first ends at 100 s, the last at 121 s: 28 s per image from the end of
    the first step on (21 s for 3/4 of an image), so the batch's last line ends "28 s/image, ETA 28 s", and
    nothing of the longer lines before it ("ETA 1m00s") shows after it."""
    terminal = Terminal()
    progress = P.Progress(2, stream=terminal)
    progress.begin(1)
    for step, at in ((1, 100.0), (2, 110.0), (3, 120.0), (4, 121.0)):
        clock[0] = at
        progress.step(step, 4)
    assert terminal.screen()[-2].rstrip() == f"image 1/2: step 4/4, {P.duration(28)}/image, ETA {P.duration(28)}"


def test_a_message_after_a_progress_line_starts_on_its_own_line(clock, monkeypatch):
    """Ctrl-C (or an error) while generate's step line is open on a terminal: "interrupted" on a line of its own."""
    terminal = Terminal()
    monkeypatch.setattr(cli.sys, "stderr", terminal)

    def run(args):
        progress = P.Progress(4)
        progress.begin(1)
        progress.step(3, 20)
        raise KeyboardInterrupt
    assert cli.run_main(argparse.ArgumentParser(), run, []) == 130
    assert terminal.screen()[-3:] == ["image 1/4: step 3/20, ETA: measuring", "interrupted", ""]


def test_the_first_eta_leaves_out_the_warm_up(clock):
    """The first sampler step takes 60 s (loading kernels), every later one 1 s. With 4 steps per image and 2
    images, after step 3 five steps are left: ETA 5 s, not 5 steps x 62/3 s. After the first step there is no
    rate to go by: the line says so instead of a number."""
    terminal = Terminal()
    progress = P.Progress(2, stream=terminal)
    progress.begin(1)
    clock[0] = 60.0
    progress.step(1, 4)
    assert terminal.screen()[-1].rstrip() == "image 1/2: step 1/4, ETA: measuring"
    for step in (2, 3):
        clock[0] += 1.0
        progress.step(step, 4)
    assert terminal.screen()[-1].rstrip().endswith(f"{P.duration(4)}/image, ETA {P.duration(5)}")
