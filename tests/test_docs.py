"""The README and the guides in docs/ tell the truth: every relative link resolves, no internal issue number leaks
in, every `python -m medti.<command>` in a bash block names a real command with real flags, and the demo and the
README's quick start run (on the demo's tiny random model, with paths and sizes swapped for small ones).

The help text of each command is read once per module (a subprocess each, in parallel: about 3 s apiece on 2
cores), and the demo runs once, in a module-scoped fixture whose outputs the quick start reuses.
"""
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
COMMANDS = {"train", "generate", "evaluate", "audit", "embeddings", "lora", "data"}
SUBCOMMANDS = {"embeddings": {"export", "info"}, "lora": {"merge", "info"}, "data": {"preview", "encode"}}
README_MAX_LINES = 260

FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")
ISSUE = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- reading markdown: prose lines, headings, links, bash blocks ----

def prose_lines(path: Path):
    """(line number, line) outside fenced code blocks."""
    inside = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (backticks, dots, colons, parentheses),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for _, line in prose_lines(path):
        if m := re.match(r"^#{1,6}\s+(.*)$", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path):
    """(line number, target) of every markdown link in prose, inline code left out."""
    for number, line in prose_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            yield number, target


def bash_lines(text: str):
    """(line number, logical line) in the ```bash blocks of a page's text, continuation lines (ending in a
    backslash) joined."""
    inside, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = line.strip() == "```bash"
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def medti_command(line: str):
    """(command, subcommand or None, arguments) of a `python -m medti.X ...` or `torchrun ... -m medti.X -- ...`
    line; None for any other line."""
    argv = shlex.split(line, comments=True)
    for i, token in enumerate(argv[:-1]):
        if token == "-m" and argv[i + 1].startswith("medti."):
            command, args = argv[i + 1].removeprefix("medti."), argv[i + 2:]
            if argv[0] == "torchrun" and args[:1] == ["--"]:
                args = args[1:]
            sub = args[0] if command in SUBCOMMANDS and args else None
            return command, sub, args[1:] if sub else args
    return None


def doc_commands():
    out = []
    for page in PAGES:
        for number, line in bash_lines(page.read_text()):
            if (found := medti_command(line)) is not None:
                out.append(pytest.param(*found, id=f"{rel(page)}:{number}"))
    return out


def flags(args: list) -> list:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


# ---- help text, once per command ----

def run(argv: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python argv` from the repository root, as the guides' commands are written. One thread: the tiny models
    gain nothing from more, and beside another busy process two spinning OpenMP threads made the demo 80x slower
    (measured: 0.5 instead of 37 steps per second)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def help_text(key: tuple) -> tuple:
    command, sub = key
    result = run(["-m", f"medti.{command}", *([sub] if sub else []), "--help"], timeout=120)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def helps() -> dict:
    keys = sorted(((c, s) for c in COMMANDS for s in SUBCOMMANDS.get(c, {None})), key=str)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(keys, pool.map(help_text, keys), strict=True))


# ---- (a) links, (b) the README's size and contents, (c) no issue numbers ----

@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.is_file():
            broken.append(f"{rel(page)}:{number}: {target} (no such file)")
        elif anchor and anchor not in anchors(path):
            broken.append(f"{rel(page)}:{number}: {target} (no heading #{anchor} in {rel(path)})")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the guides belong in docs/"
    assert any(re.match(r"^#{2,3}\s+Contents\s*$", line) for line in lines), "README.md has no Contents section"
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    missing = [rel(d) for d in DOCS if d.resolve() not in linked]
    assert DOCS, "docs/ holds no guide"
    assert not missing, f"README.md links to no {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_issue_numbers(page):
    found = [f"{rel(page)}:{n}: {m.group(0)}" for n, line in enumerate(page.read_text().splitlines(), 1)
             for m in ISSUE.finditer(line)]
    assert not found, "\n".join(found)


CODE_PATH = re.compile(r"`((?:medti|minisd|tools|tests|weights)/[\w/.\-]+)`")   # `medti/training/trainer.py`
CODE_NAME = re.compile(r"`((?:medti|minisd)(?:\.\w+)+)")                       # `medti.training.optim.adamw`


def resolves(dotted: str) -> bool:
    """A module, or a name inside the longest importable module prefix (medti.generation.pipeline.sample)."""
    import importlib
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            target = getattr(target, name, None)
        return target is not None
    return False


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_file_and_name_the_docs_cite_exists(page):
    """Code moves; the guides must move with it. Every `medti/...` or `tools/...` path in backticks is a file or
    folder of the repository, and every `medti.x.y` / `minisd.x.y` names a module or a name inside one."""
    text = page.read_text()
    missing = [m for m in CODE_PATH.findall(text) if not (ROOT / m.split("::")[0]).exists()]
    missing += [m for m in CODE_NAME.findall(text) if not resolves(m)]
    assert not missing, f"{rel(page)} cites what does not exist: {sorted(set(missing))}"


# ---- (d) every documented command and flag exists ----

@pytest.mark.parametrize("command, sub, args", doc_commands())
def test_documented_command_and_flags_exist(command, sub, args, helps):
    assert command in COMMANDS, f"medti.{command} is not a command ({sorted(COMMANDS)})"
    if command in SUBCOMMANDS:
        assert sub in SUBCOMMANDS[command], f"medti.{command} has no subcommand {sub!r}"
    status, text = helps[(command, sub)]
    assert status == 0, f"`python -m medti.{command} {sub or ''} --help` failed:\n{text}"
    unknown = [f for f in flags(args) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not unknown, f"medti.{command} {sub or ''}: no flag {unknown} in its --help"


def test_the_bash_blocks_hold_commands():
    """The parser above finds what the guides show, so an empty parametrisation cannot pass unnoticed."""
    found = {values[0] for values in (p.values for p in doc_commands())}
    assert found == COMMANDS


# ---- (e) the demo and the quick start run ----

def section_commands(title: str) -> list:
    """The medti commands in the bash blocks of the README's section `## <title>...`, in order."""
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", README.read_text(), re.MULTILINE | re.DOTALL)
    assert m, f"README.md has no section '## {title}'"
    return [found for _, line in bash_lines(m.group(1)) if (found := medti_command(line)) is not None]


def set_flag(args: list, flag: str, value: str) -> list:
    """args with flag set to value: replaced where given, else appended."""
    if flag in args:
        i = args.index(flag)
        return [*args[:i + 1], value, *args[i + 2:]]
    return [*args, flag, value]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The README's demo command, run once into a temporary folder."""
    lines = [c for c in section_commands("Two commands") if c[0] == "train" and "--demo" in c[2]]
    assert len(lines) == 1, "README.md's 'Two commands' section shows no single demo command"
    _, _, args = lines[0]
    out = tmp_path_factory.mktemp("docs") / "demo-run"
    result = run(["-m", "medti.train", *set_flag(args, "--out", str(out))])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


def test_demo_writes_what_the_guide_says(demo):
    for name in ("phantom.safetensors", "log.jsonl", "loss.png", "state.safetensors", "model/tiny-random.safetensors",
                 "model/tiny-random.json", "phantoms", "phantoms-held-out"):
        assert (demo / name).exists(), f"the demo wrote no {name}"
    assert list(demo.glob("preview-*.png"))


# Tiny settings for each quick-start command on the demo's model: a few steps, a few images, the test suite's
# random Inception weights (the real file is a 96 MB download), previews at the tiny model's size.
TINY = {"train": {"--max-steps": "4", "--save-every": "2", "--preview-every": "0"},
        "generate": {"--n": "4", "--steps": "2"},   # evaluate needs more than --k 3 images a set
        "evaluate": {},
        "audit": {},
        "data": {"--resolution": "64"}}
OUTPUTS = ("runs/", "synthetic/", "eval/", "audit/", "preview/")


def tiny(command: str, args: list, demo: Path, work: Path, inception: Path) -> list:
    """A quick-start command's arguments on the demo: its phantoms for the user's folder, outputs under work, the
    tiny model for a preset, and TINY's settings."""
    out = []
    for a in args:
        if a.startswith("data/"):   # the user's image folder: the demo's phantoms
            a = str(demo / "phantoms")
        elif a.startswith(OUTPUTS):
            a = str(work / a)
        out.append(a)
    if "--model" in out and out[out.index("--model") + 1] in ("sd2-base", "sd15"):
        out = set_flag(out, "--model", str(demo / "model/tiny-random.safetensors"))
        out = set_flag(out, "--config", str(demo / "model/tiny-random.json"))
    settings = dict(TINY[command], **({"--inception": str(inception)} if command == "evaluate" else {}))
    for flag, value in settings.items():
        out = set_flag(out, flag, value)
    return out


@pytest.fixture(scope="module")
def quick_start(demo, inception_file, tmp_path_factory) -> list:
    """Every command of the README's quick start, in order, on the demo's model and phantoms, up to the first that
    fails: (command, argv, result) each."""
    work = tmp_path_factory.mktemp("quick-start")
    results = []
    for command, sub, args in section_commands("Quick start"):
        argv = ["-m", f"medti.{command}", *([sub] if sub else []), *tiny(command, args, demo, work, inception_file)]
        results.append((command, argv, run(argv)))
        if results[-1][2].returncode != 0:
            break
    return results


def test_quick_start_shows_each_step():
    assert [c for c, _, _ in section_commands("Quick start")] == ["data", "train", "generate", "evaluate", "audit"]


@pytest.mark.parametrize("step", ["data", "train", "generate", "evaluate", "audit"])
def test_quick_start_step_runs(step, quick_start):
    ran = {command: (argv, result) for command, argv, result in quick_start}
    assert step in ran, f"the quick start stopped before its {step} step: {[c for c, _, _ in quick_start]}"
    argv, result = ran[step]
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"


@pytest.mark.parametrize("line", [
    "python -m medti.embeddings info tests/data/paper-embeddings/",
    "python -m medti.embeddings info tests/data/paper-embeddings/chexpert_cardiomegaly.pt",
])
def test_embedding_info_runs_as_written(line):
    """The guides' commands that need no model run exactly as printed."""
    shown = [command for page in PAGES for _, command in bash_lines(page.read_text())]
    assert any(shlex.split(s, comments=True) == shlex.split(line) for s in shown), f"no guide shows `{line}`"
    result = run(shlex.split(line)[1:])
    assert result.returncode == 0, result.stderr
