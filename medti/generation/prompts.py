r"""Composable prompts in AUTOMATIC1111's syntax: `term AND term:weight AND ...`.

The reference study wrote its prompts for AUTOMATIC1111/stable-diffusion-webui, so a prompt copied from it must mean
the same here. Source of the behaviour (read, not copied): modules/prompt_parser.py, get_multicond_prompt_list,
with `re_AND = r"\bAND\b"` and `re_weight = r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$"`.
tests/test_prompts.py runs that reference on every case and states where we deliberately differ:
  * `:30%` is a weight of 0.3 (A1111 keeps `:30%` as text with weight 1; the study's slides wrote weights this way);
  * a weight that does not parse (`:0.5x`, `:1e-3`, `:1.2.3`) is an error, never a silent weight 1;
  * an empty term (`a AND`, `AND AND`, `:0.5` alone) is an error, except a blank prompt, which is the empty prompt.
"""
import math
import re
from collections.abc import Callable

from minisd.errors import UserError, arg
from minisd.tokenizer import MAX_PROMPT_TOKENS

# A1111's separator: the whole, case-sensitive word AND. `\b` needs a non-word character (or an end) on both
# sides, so `ANDa`, `aAND`, `a_AND_b` and `a and b` are one term, while `a,AND,b` and `a AND\nb` are two.
AND = re.compile(r"\bAND\b")

# "Looks like a weight": the term ends in `:`, optional spaces, then one token that starts with a digit, a sign or
# a dot and holds no space, colon or bracket. Such a token must parse, or parse() raises. So `a dog: abc` (starts
# with a letter), `(a dog:1.5)` (attention syntax: bracket) and `ratio 3:2 apples` (spaces) stay plain text.
# A1111's number always fits this token, so both pick the same colon. The `\s*` before `:` is not part of the text.
WEIGHT_LIKE = re.compile(r"\s*:\s*([-+.\d][^\s:()\[\]]*)\s*\Z")

# The numbers A1111 accepts: signed decimals `2`, `+2`, `-1`, `5.`, `.5`, `1.25`; no exponent, inf or nan.
# Our one addition is an optional `%` suffix: `30%` is 0.3.
NUMBER = re.compile(r"([-+]?(?:\d+\.?|\d*\.\d+))(%?)")


# How much of a prompt a message quotes: a 20,000-character prompt quoted whole would bury the reason.
SHOWN = 60


class PromptError(UserError):
    """A prompt we refuse to guess about. The message is one line that names the flag (or argument) and the term,
    and says how to fix it."""


def shown(text: str) -> str:
    """`text` quoted as Python writes it (escapes included), its middle cut out past SHOWN characters:
    `'x x x x ... x x x' (20,000 characters)`."""
    if len(text) <= SHOWN:
        return repr(text)
    half = SHOWN // 2
    return f"{text[:half]!r}...{text[-half:]!r} ({len(text):,} characters)"


def check_text(name: str, text: str):
    """A prompt given as `name` must be text: a command-line word in another encoding than the terminal's UTF-8
    reaches Python as surrogate escapes (PEP 383: byte 0xff as U+DCFF), which no tokenizer can read."""
    bad = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:
        byte = f"byte 0x{ord(bad) - 0xdc00:02x}" if ord(bad) >= 0xdc80 else f"U+{ord(bad):04X}"
        raise PromptError(f"{arg(name)} {shown(text)}: not UTF-8 text ({byte}); type it again in a UTF-8 terminal")


def parse_weight(term: str) -> tuple[str, float]:
    """Split one term into (text, weight). Text keeps its leading spaces and loses its trailing ones, as in A1111
    (CLIP's tokenizer ignores both)."""
    match = WEIGHT_LIKE.search(term)
    if match is None:
        # No weight: A1111 gives weight 1 and the text without trailing whitespace (str.rstrip strips the same
        # characters as the regex `\s`).
        return term.rstrip(), 1.0
    token = match.group(1)
    number = NUMBER.fullmatch(token)
    if number is None:
        raise PromptError(f"term {shown(term)}: weight {shown(token)} is not a number; write e.g. ':0.5', ':-1' or "
                          "':30%'")
    weight = float(number.group(1)) / (100.0 if number.group(2) else 1.0)
    if not math.isfinite(weight):  # only a 309-digit "weight" gets here
        raise PromptError(f"term {shown(term)}: weight {shown(token)} is too large to be a float; write a smaller "
                          "number")
    # Leftmost match, so `match.start()` is the first space before the colon: the text ends in no whitespace.
    return term[: match.start()], weight


def parse(prompt: str, name: str = "prompt") -> list[tuple[str, float]]:
    """Split a composable prompt into [(text, weight), ...], one entry per AND-separated term, in order.

    `a dog AND a cat:0.5 AND text:-1` -> [('a dog', 1.0), (' a cat', 0.5), (' text', -1.0)]. A negative weight
    pushes the image away from that concept. Duplicate terms are kept (A1111 also keeps each occurrence's weight).
    - The weight is the last `:number` of a term, spaces allowed around the colon (`a : 0.5`). Only the last one
      counts: `a dog:1.5:0.3` is text 'a dog:1.5' with weight 0.3, as in A1111. Any final `:number` is a weight,
      also in `time 10:30` (text 'time 10', weight 30), as in A1111: write `10.30` or `10h30` instead.
    - `(a dog:1.5)` is attention syntax inside the text, not a term weight: weight 1, text unchanged.
    - `:30%` means 0.3 (A1111 would keep it as text with weight 1).
    - A final `:` + token starting with a digit, sign or dot that is not a number (`:0.5x`, `:1e-3`, `:1.2.3`,
      `:-`) raises PromptError; A1111 silently keeps it as text with weight 1.
    - An empty or blank prompt is the empty (unconditional) prompt: [('', 1.0)], as in A1111. An empty term in
      a longer prompt (`a AND`, `AND b`, `a AND AND b`) or a weight without text (`:0.5`) raises PromptError:
      A1111 would quietly add an empty prompt, almost always a typo.
    Errors name the prompt as the argument `name` (`--prompt` on the command line).
    """
    check_text(name, prompt)
    terms = AND.split(prompt)
    if len(terms) == 1 and not prompt.strip():
        return [("", 1.0)]
    parsed = []
    for index, term in enumerate(terms, start=1):
        try:
            text, weight = parse_weight(term)
        except PromptError as e:
            raise PromptError(f"{arg(name)} {shown(prompt)}: {e}") from None
        if not text.strip():
            raise PromptError(f"{arg(name)} {shown(prompt)}: term {index} of {len(terms)} ({shown(term)}) has no "
                              "text; remove the extra AND or add text")
        parsed.append((text, weight))
    return parsed


def check_length(terms: list[tuple[str, float]], count_tokens: Callable[[str], int],
                 limit: int = MAX_PROMPT_TOKENS, name: str = "prompt") -> None:
    """Raise PromptError for the first term longer than `limit` tokens, naming the prompt as the argument `name`.

    `count_tokens(text)` counts a term's tokens after each placeholder is expanded to its embedding's vectors,
    without the start/end tokens. SD1's and SD2's text encoders see 77 positions, 2 of them start and end, so 75
    (MAX_PROMPT_TOKENS) remain:
    a 64-vector embedding leaves 11 for the rest of the term. We raise instead of truncating silently.
    """
    for text, _ in terms:
        count = count_tokens(text)
        if count > limit:
            raise PromptError(f"{arg(name)}: term {shown(text)} holds {count:,} tokens, {count - limit:,} more than "
                              f"the {limit} that fit; shorten it or use an embedding with fewer vectors")
