"""The size rules of ../shared/STYLE.md that a reader meets first, checked so they stay true: every module in
minisd/ and medti/ is at most 300 lines (a file reads in one sitting), and no function there is longer than 50 lines
(the style's ~40; the longest today are an argparse table and the UNet's layer list, 49 each)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for package in ("minisd", "medti") for p in (ROOT / package).rglob("*.py"))


def test_every_module_is_at_most_300_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES}
    assert len(sizes) > 40   # the glob found the packages
    too_long = {name: n for name, n in sizes.items() if n > 300}
    assert not too_long, f"split these by job (STYLE.md: files <= 300 lines): {too_long}"


def test_no_function_is_longer_than_50_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 50:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "; ".join(long)
