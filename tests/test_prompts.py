"""medti.generation.prompts against AUTOMATIC1111's own parsing of composable prompts (the syntax the reference study
used).

REFERENCE: `a1111` below quotes, for this test only, the two regexes and the splitting loop of get_multicond_prompt_list
in AUTOMATIC1111/stable-diffusion-webui, modules/prompt_parser.py (commit 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906).
Dropped: its de-duplication of identical texts, which changes indexes into a flat list, not the (text, weight) pairs.
Older A1111 (commit 0674fabd0d82c69c02ff362762815c4536687b95) had `^(\\s*.*?)` in place of `^((?:\\s|.)*?)`, so a
term with a newline inside lost its weight; we follow the newer regex.
"""
import random
import re

import pytest

from medti.generation.prompts import WEIGHT_LIKE, PromptError, check_length, parse

A1111_re_AND = re.compile(r"\bAND\b")
A1111_re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def a1111(prompt: str) -> list[tuple[str, float]]:
    """REFERENCE (quoted from A1111 for this test only): the (text, weight) of each AND-separated subprompt."""
    res = []
    for subprompt in A1111_re_AND.split(prompt):
        match = A1111_re_weight.search(subprompt)
        text, weight = match.groups() if match is not None else (subprompt, 1.0)
        weight = float(weight) if weight is not None else 1.0
        res.append((text, weight))
    return res


# Cases A1111 accepts: ours must give exactly its (text, weight) pairs. The expected values are written out too,
# so a reader sees A1111's behaviour without running it.
SAME = [
    ("a dog", [("a dog", 1.0)]),
    ("  a dog  ", [("  a dog", 1.0)]),  # leading spaces kept, trailing dropped (CLIP ignores both)
    ("a dog AND a cat", [("a dog", 1.0), (" a cat", 1.0)]),
    ("ANDa dog", [("ANDa dog", 1.0)]),  # AND must be a whole word
    ("a dog and a cat", [("a dog and a cat", 1.0)]),  # case-sensitive
    ("a_AND_b", [("a_AND_b", 1.0)]),  # `_` is a word character: no boundary
    ("a,AND,b", [("a,", 1.0), (",b", 1.0)]),  # punctuation is a boundary
    ("a dog:+2", [("a dog", 2.0)]),
    ("a dog:.5", [("a dog", 0.5)]),
    ("a dog:5.", [("a dog", 5.0)]),
    ("a dog:0", [("a dog", 0.0)]),
    ("a dog AND a cat:-1", [("a dog", 1.0), (" a cat", -1.0)]),  # negative weight: steer away from cats
    ("a dog:1.5:0.3", [("a dog:1.5", 0.3)]),  # only the last `:number` is the weight
    ("(a dog:1.5)", [("(a dog:1.5)", 1.0)]),  # attention syntax, not a term weight
    ("[lung:heart:0.5]", [("[lung:heart:0.5]", 1.0)]),  # prompt-editing syntax, not a term weight
    ("a : 0.5", [("a", 0.5)]),
    ("a dog \t:\t 0.5 \n", [("a dog", 0.5)]),
    ("a dog: abc", [("a dog: abc", 1.0)]),  # a colon before words is text
    ("ratio 3:2 apples", [("ratio 3:2 apples", 1.0)]),
    ("time 10:30", [("time 10", 30.0)]),  # A1111's trap, kept for compatibility and documented
    ("chest x-ray\nwith effusion:0.7", [("chest x-ray\nwith effusion", 0.7)]),
    ("a (dog:1.2) AND [cat] :0.8", [("a (dog:1.2)", 1.0), (" [cat]", 0.8)]),
    ("a dog AND a dog:0.5", [("a dog", 1.0), (" a dog", 0.5)]),  # repeated terms keep their own weights
    ("", [("", 1.0)]),  # the empty (unconditional) prompt
    ("   ", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", SAME)
def test_same_as_a1111(prompt, expected):
    assert a1111(prompt) == expected
    assert parse(prompt) == expected


# Deliberate difference 1: a percentage is a weight. A1111 keeps it as text with weight 1.
@pytest.mark.parametrize(
    "prompt,a1111_says,we_say",
    [
        ("a dog:30%", [("a dog:30%", 1.0)], [("a dog", 0.3)]),
        ("a dog : -50%", [("a dog : -50%", 1.0)], [("a dog", -0.5)]),
        ("lung AND nodule:12.5%", [("lung", 1.0), (" nodule:12.5%", 1.0)], [("lung", 1.0), (" nodule", 0.125)]),
    ],
)
def test_percent_weight(prompt, a1111_says, we_say):
    assert a1111(prompt) == a1111_says
    got = parse(prompt)
    # texts exactly; weights to 1e-12 (0.125 from "12.5%" is a division, not a literal)
    assert [text for text, _ in got] == [text for text, _ in we_say]
    assert [w for _, w in got] == pytest.approx([w for _, w in we_say], rel=1e-12, abs=0)


# Deliberate difference 2: a weight-like token that is not a number. A1111 silently gives weight 1 and keeps the
# token in the text; we raise a one-line error that names the term.
@pytest.mark.parametrize(
    "prompt,term", [("a dog:0.5x", "a dog:0.5x"), ("a dog:1e-3", "a dog:1e-3"), ("a dog:1.2.3", "a dog:1.2.3"),
                    ("a dog:-", "a dog:-"), ("a dog: .", "a dog: ."), ("lung AND a dog:0,5", " a dog:0,5"),
                    ("a dog:0.5,", "a dog:0.5,")],
)
def test_malformed_weight(prompt, term):
    assert (term.rstrip(), 1.0) in a1111(prompt)
    with pytest.raises(PromptError) as err:
        parse(prompt)
    assert repr(term) in str(err.value) and "\n" not in str(err.value)
    assert "':0.5'" in str(err.value)  # says how to write a weight


# Deliberate difference 3: an empty term. A1111 adds an empty prompt; we raise, naming the term's position.
@pytest.mark.parametrize("prompt", ["a AND", "AND b", "a AND AND b", "AND", ":0.5", "a AND :2"])
def test_empty_term(prompt):
    assert any(text.strip() == "" for text, _ in a1111(prompt))
    with pytest.raises(PromptError, match=r"^prompt= .*: term \d+ of \d+ .* has no text; remove the extra AND"):
        parse(prompt)


def test_random_prompts_agree_or_differ_only_deliberately():
    """Fuzz: on random prompts ours equals A1111, or the difference is one of the three above."""
    rng = random.Random(0)
    pieces = ["a", "dog", " ", "  ", ":", "0", "5", ".", "-", "+", "%", "x", "e", "AND", " AND ", "(", ")", "\n"]
    for _ in range(3000):
        prompt = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        reference = a1111(prompt)
        try:
            ours = parse(prompt)
        except PromptError:
            empty = any(not text.strip() for text, _ in reference)
            ignored = any(WEIGHT_LIKE.search(text) and w == 1.0 for text, w in reference)
            assert empty or ignored, prompt
            continue
        for (text, weight), (ref_text, ref_weight) in zip(ours, reference, strict=True):
            if (text, weight) != (ref_text, ref_weight):
                assert ref_weight == 1.0 and ref_text.endswith("%") and ref_text.startswith(text), prompt


def count_tokens(text: str) -> int:
    """Stand-in tokenizer: one token per word; the placeholder <lung> expands to a 64-vector embedding."""
    return sum(64 if word == "<lung>" else 1 for word in text.split())


def test_check_length_fits():
    terms = parse("<lung> " + "w " * 11 + "AND a cat:0.5")  # 64 + 11 = 75: exactly full
    check_length(terms, count_tokens)


def test_check_length_too_long_names_term_and_count():
    long_term = "<lung> " + "w " * 12  # 76 tokens
    with pytest.raises(PromptError) as err:
        check_length(parse("a cat AND " + long_term + ":0.5"), count_tokens)
    message = str(err.value)
    assert "76 tokens" in message and "1 more than the 75" in message
    assert repr(" " + long_term.rstrip()) in message and "\n" not in message


def test_check_length_custom_limit():
    check_length([("a b c", 1.0)], count_tokens, limit=3)
    with pytest.raises(PromptError, match="holds 4 tokens"):
        check_length([("a b c d", 1.0)], count_tokens, limit=3)


def test_errors_name_the_argument_in_the_interface_in_use():
    """Before: "term 2 of 2 ('') in 'a AND' has no text", naming neither --prompt nor prompt=."""
    from minisd.errors import INTERFACE
    with pytest.raises(PromptError) as err:
        parse("a AND")
    assert str(err.value).startswith("prompt= 'a AND': term 2 of 2 ('') has no text")
    token = INTERFACE.set("cli")
    try:
        with pytest.raises(PromptError) as err:
            parse("a AND")
        assert str(err.value).startswith("--prompt 'a AND': term 2 of 2 ('') has no text")
        with pytest.raises(PromptError) as err:
            parse("lung AND a dog:0,5")
        assert str(err.value).startswith("--prompt 'lung AND a dog:0,5': term ' a dog:0,5': weight '0,5'")
        with pytest.raises(PromptError) as err:
            check_length([("a b c d", 1.0)], count_tokens, limit=3, name="negative")
        assert str(err.value).startswith("--negative: term 'a b c d' holds 4 tokens")
    finally:
        INTERFACE.reset(token)


def test_a_long_prompt_is_quoted_short():
    """Before: a 20,000-character prompt was quoted whole in the one error line (the reason came after it)."""
    prompt = "x " * 10000
    with pytest.raises(PromptError) as err:
        check_length(parse(prompt + "AND"), count_tokens)
    with pytest.raises(PromptError) as too_long:
        check_length(parse(prompt), count_tokens)
    # the prompt, and the one term (its trailing space dropped, as A1111 drops it)
    for message, quoted in ((str(err.value), prompt + "AND"), (str(too_long.value), prompt.rstrip())):
        assert f"({len(quoted):,} characters)" in message and len(message) < 250, message
    assert "holds 10,000 tokens, 9,925 more than the 75 that fit" in str(too_long.value)


def test_text_that_is_not_utf8_is_refused():
    """A command-line word in Latin-1 arrives surrogate-escaped (b"\\xff" as U+DCFF); the tokenizer raised
    "TypeError: TextInputSequence must be str" from Rust."""
    import os
    with pytest.raises(PromptError, match=r"^prompt= 'a \\udcff': not UTF-8 text \(byte 0xff\)"):
        parse("a " + os.fsdecode(b"\xff"))
