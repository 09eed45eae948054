"""The layout shows the architecture (docs/layout.md): commands on top of medti/, one package per job below them,
the readers and shared files under those, minisd at the bottom -- and every import arrow points down.

Checked on the import graph read from the source with `ast` (imports inside functions count too, so a lazy import
cannot hide an arrow that points up). The same graph is printed by `python tests/test_layout.py`.
"""
import ast
import configparser
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# From the top down. A module may import its own package and anything in a later row, never an earlier row or
# another package of its own row. Within the jobs the order is a fact of the code: evaluation scores a training
# run's steps by generating with each (quality -> training's flags, generation's run), and training makes previews
# and DreamBooth's class images by generating (training -> generation); generation needs neither.
LAYERS = [
    {"medti", "medti.train", "medti.generate", "medti.evaluate", "medti.audit", "medti.data", "medti.embeddings",
     "medti.lora", "medti.utility"},       # the commands people type: python -m medti.<name>
    {"medti.downstream"},                    # does a synthetic set help a classifier (python -m medti.utility)
    {"medti.quality"},                       # is a synthetic set any good, and is it safe to share
    {"medti.training"},                      # one loop, generic over what trains
    {"medti.generation"},                    # sampling, prompts, the generate run
    {"medti.dataset"},                       # a folder of images as training tensors
    {"medti.medical"},                       # DICOM, NIfTI, MetaImage; windows and volumes
    {"medti.files", "medti.cli"},            # medti's own files; what every command's parser shares
    {"minisd"},                              # the networks, loading and sampling
]
TOP_MODULES_MAX = 12   # the commands and the command-line helper at the top of medti/


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in ("medti", "minisd") for p in sorted((ROOT / package).rglob("*.py"))}


def imported(name: str, path: Path, known: set) -> set:
    """The project modules that `name` imports: `from a import b` counts as a.b when that is a module, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def unit(name: str) -> str:
    """The row entry a module belongs to: its package (medti.training, minisd, ...) or, at the top, itself."""
    parts = name.split(".")
    return "minisd" if parts[0] == "minisd" else ".".join(parts[:2]) if len(parts) > 2 or name in ROW else name


ROW = {entry: row for row, entries in enumerate(LAYERS) for entry in entries}


def cycles(edges: dict[str, set]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm), i.e. the import circles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_was_read():
    edges = graph()
    assert len(edges) > 60 and "medti.files.atomic" in edges["medti.training.trainer"]   # real arrows are seen
    assert "medti.training.config" in edges["medti.train"]


def test_no_import_circle():
    assert cycles(graph()) == []


def test_every_module_has_a_row():
    assert sorted(name for name in graph() if unit(name) not in ROW) == []


def test_arrows_point_down():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if unit(a) != unit(b) and ROW[unit(b)] <= ROW[unit(a)]]
    assert upward == [], "import arrows must point down the rows of LAYERS: " + "; ".join(upward)


def test_the_top_of_medti_is_commands():
    top = sorted(p.stem for p in (ROOT / "medti").glob("*.py") if p.stem != "__init__")
    assert len(top) <= TOP_MODULES_MAX, top
    commands = [stem for stem in top if "__main__" in (ROOT / "medti" / f"{stem}.py").read_text(encoding="utf-8")]
    assert sorted(set(top) - set(commands)) == ["cli"]   # every other top module is a command


def test_every_package_is_installed():
    """setup.cfg lists packages by name: a new folder left out would be missing from a plain `pip install .`."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = {name.strip() for name in cfg["options"]["packages"].replace("\n", ",").split(",") if name.strip()}
    present = {module_name(p.parent / "__init__.py") for package in ("medti", "minisd")
               for p in (ROOT / package).rglob("__init__.py")}
    assert present <= listed, sorted(present - listed)


def test_the_checks_can_fail():
    """The circle and arrow rules on made-up graphs: a circle is found, and an upward arrow is seen as one."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert ROW[unit("medti.files.atomic")] > ROW[unit("medti.training.trainer")] > ROW[unit("medti.train")]


if __name__ == "__main__":   # print the graph: module -> what it imports
    for name, targets in sorted(graph().items()):
        print(name, "->", " ".join(sorted(targets)), file=sys.stdout)
