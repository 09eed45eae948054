"""Re-run medti's commands on hostile input and on every real medical file this machine holds; count what is clean.

    OMP_NUM_THREADS=1 python tools/hostile_rerun.py --out hostile.json            # both parts, a few minutes on 2 cores
    python tools/hostile_rerun.py --part real --out real.json                     # (a) only; --part hostile: (b) only
    python tools/hostile_rerun.py --exec --out hostile.json                       # each case a fresh `python -m`

(a) Real files: every DICOM (by content, or named *.dcm), NIfTI and MetaImage/NRRD file under the installed
packages' folders (pydicom's test files, pydicom-data, nibabel's test data) is copied alone into a folder and run
through `python -m medti.data preview --data DIR --out OUT --resolution 64`. Each is `read` (exit 0, every written
image has more than one gray level), `refused` (exit != 0, one stderr line, no traceback, nothing left in OUT) or
NOT clean (anything else: a traceback, a hang past --timeout, several lines, a flat image, a half-written OUT).
(b) Hostile input (tools/hostile_cases.py): bad numbers, damaged files of every extension the commands read,
non-UTF-8 names, missing paths, outputs that cannot be written. Clean: exit 0 with valid output (every PNG decodes
and is not flat, every JSON strictly parses, every safetensors file loads and is finite), or exit != 0 with exactly
one stderr line that names a flag or a file, no traceback, and no new file in the case's output.

By default each case runs in a process forked from this one after the commands are imported (2 s of imports saved
per case; the child runs the module as `python -m` does, with runpy); --exec starts a new interpreter per case.
Every child is limited to --memory GB of heap (RLIMIT_DATA), so a size that asks for terabytes fails in the child
instead of swapping the machine. Prints a table per group and writes it all as JSON to --out.
"""
import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "tests")]
os.environ.setdefault("OMP_NUM_THREADS", "1")   # before torch is imported: one thread per child, as measured


@dataclass
class Result:
    rc: int | None          # None: killed after the timeout
    stdout: str
    stderr: str
    seconds: float


def _child(module: str, args: list, cwd: Path, memory_gb: float, out_path: str, err_path: str):
    """In the forked child: the module as `python -m module args` runs it, then exit without returning."""
    import atexit
    import runpy
    import traceback
    code = 1
    try:
        atexit._clear()   # the parent's exit handlers (its temporary folders' cleanup) are not the command's
        os.chdir(cwd)
        limit = int(memory_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        # the interpreter's own sys.stdout/stderr (their encodings and error handlers) now write to the files
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, out_path, os.O_WRONLY), (2, err_path, os.O_WRONLY)):
            os.dup2(os.open(path, mode), fd)
        sys.argv = [module, *args]
        sys.modules.pop(module, None)   # imported warm by the parent; `python -m` runs it fresh as __main__
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:   # Python's own rule for the exit status
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()   # what the interpreter does at exit (a command's cleanup)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run(module: str, args: list, cwd: Path, timeout: float, memory_gb: float, fresh: bool) -> Result:
    """`python -m module args` in `cwd`: in a forked child (or a new interpreter with `fresh`), killed after
    `timeout` seconds with its whole process group."""
    start, args = time.monotonic(), [str(a) for a in args]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        out.touch()
        err.touch()
        if fresh:
            limit = int(memory_gb * 2 ** 30)
            proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=out.open("wb"), stderr=err.open("wb"), start_new_session=True,
                                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))
            pid = proc.pid
        else:
            sys.stdout.flush()   # nothing buffered here may reach the child's files
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.setsid()
                _child(module, args, cwd, memory_gb, str(out), str(err))
        rc = _wait(pid, timeout)
        text = [p.read_bytes().decode(errors="replace") for p in (out, err)]
    return Result(rc, text[0], text[1], round(time.monotonic() - start, 2))


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.killpg(pid, signal.SIGKILL)   # the child leads its own session (setsid): its helpers go with it
    os.waitpid(pid, 0)
    return None


def files_under(path: Path) -> set:
    return {str(p) for p in path.rglob("*")} if path.is_dir() else ({str(path)} if path.exists() else set())


def output_problem(paths) -> str | None:
    """What is wrong with a successful run's files: a PNG that does not decode or has one gray level, a JSON or
    JSONL file that is not strict JSON (NaN and Infinity are not JSON), a safetensors file that does not load or
    holds a non-finite value. None when they are all fine."""
    import numpy as np
    from PIL import Image

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))
    flat, pngs = [], 0
    for name in sorted(paths):
        path = Path(name)
        try:
            if path.suffix == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                pngs += 1
                if pixels.min() == pixels.max():
                    flat.append(f"{path.name}, every pixel {pixels.min()}")
            elif path.suffix == ".json":
                strict(path.read_text())
            elif path.suffix == ".jsonl":
                for line in path.read_text().splitlines():
                    strict(line)
            elif path.suffix == ".safetensors":
                from safetensors.torch import load_file
                if not all(t.float().isfinite().all() for t in load_file(path).values()):
                    return f"{path.name}: a non-finite value"
        except Exception as e:   # any failure to read back is the finding itself
            return f"{path.name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return f"{len(flat)} of {pngs} images flat ({'; '.join(flat[:3])})" if flat else None


def verdict(result: Result, names: list, new_files: set) -> tuple[bool, str]:
    """(clean, why) of a failed run: one stderr line naming a flag or one of `names` (its files), no traceback, and
    no new file in its output."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.rc is None:
        return False, "no exit before the timeout"
    if "Traceback (most recent call last)" in result.stderr:
        return False, f"traceback: {lines[-1] if lines else ''}"
    if result.rc < 0:
        return False, f"killed by signal {-result.rc}"
    if len(lines) != 1:   # the last line is the error; show what came before it too
        return False, f"{len(lines)} stderr lines: {lines[0][:120]!r} ... {lines[-1][:160]!r}"
    named = re.search(r"--[a-z]", lines[0]) or any(n and n in lines[0] for n in names)
    if not named:
        return False, "the line names no flag and no file"
    if new_files:
        return False, f"left {len(new_files)} new file(s), e.g. {sorted(new_files)[0]}"
    return True, "refused in one line"


def real_part(work: Path, options) -> list:
    import shutil
    rows = []
    for folder in ("real", "real-out"):   # new on every run
        shutil.rmtree(work / folder, ignore_errors=True)
    from hostile_files import real_files
    for n, path in enumerate(real_files()):
        data, out = work / "real" / f"{n:03d}", work / "real-out" / f"{n:03d}"
        data.mkdir(parents=True)
        shutil.copy(path, data / path.name)
        args = ["preview", "--data", str(data), "--out", str(out), "--resolution", "64"]
        result = run("medti.data", args, work, options.timeout, options.memory, options.exec)
        written = files_under(out)
        if result.rc == 0:
            problem = output_problem(written) or (None if written else "exit 0 and nothing written")
            kind, why = ("read", "") if problem is None else ("NOT clean", problem)
        else:
            clean, why = verdict(result, [path.name, str(data)], written)
            kind = "refused" if clean else "NOT clean"
        rows.append({"file": str(path), "class": kind, "why": why, **asdict(result)})
        print(f"{kind:9s} {path.name}  {why}", flush=True)
    return rows


def hostile_part(work: Path, options) -> list:
    from hostile_cases import cases
    rows = []
    setup = lambda m, a: run(m, a, work, options.timeout * 3, options.memory, options.exec)  # noqa: E731
    for case in [c for c in cases(work, setup) if not options.only or c.group in options.only.split(",")]:
        before = files_under(Path(case.out)) if case.out else set()
        result = run(case.module, case.args, work, options.timeout, options.memory, options.exec)
        new = (files_under(Path(case.out)) if case.out else set()) - before
        if result.rc == 0:
            problem = case.check(result, new) if case.check else \
                ("exit 0 and nothing written" if case.out and not new else output_problem(new))
            clean, why = problem is None, problem or "ran"
        else:
            clean, why = verdict(result, case.names, new)
            if case.must_run:
                clean, why = False, f"a valid input refused: {(result.stderr.strip().splitlines() or [''])[-1]!r}"
        rows.append({"group": case.group, "what": case.what, "command": case.line(), "args": case.args,
                     "clean": clean, "why": why,
                     **asdict(result)})
        print(f"{'clean' if clean else 'NOT CLEAN':9s} {case.group:10s} {case.what}: {why}", flush=True)
    return rows


def table(real: list, hostile: list) -> str:
    lines = []
    if real:
        counts = Counter(r["class"] for r in real)
        lines += [f"(a) real files: {len(real)}; read {counts['read']}, refused cleanly {counts['refused']}, "
                  f"NOT clean {counts['NOT clean']}"]
        lines += [f"    NOT clean: {r['file']}: {r['why']}" for r in real if r["class"] == "NOT clean"]
    if hostile:
        lines += ["(b) hostile input", f"    {'group':12s}{'cases':>6s}{'clean':>7s}{'not clean':>11s}"]
        for group in dict.fromkeys(r["group"] for r in hostile):
            rows = [r for r in hostile if r["group"] == group]
            bad = [r for r in rows if not r["clean"]]
            lines += [f"    {group:12s}{len(rows):6d}{len(rows) - len(bad):7d}{len(bad):11d}"]
        lines += [f"    {'all':12s}{len(hostile):6d}{sum(r['clean'] for r in hostile):7d}"
                  f"{sum(not r['clean'] for r in hostile):11d}"]
        lines += [f"    NOT clean [{r['group']}] {r['command']}\n        {r['why']}" for r in hostile if not r["clean"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON file to write (every case with its command and output)")
    p.add_argument("--part", choices=("both", "real", "hostile"), default="both")
    p.add_argument("--work", help="folder for the cases' inputs and outputs (default: a new temporary folder)")
    p.add_argument("--timeout", type=float, default=60, help="seconds before a case counts as hung (default: 60)")
    p.add_argument("--memory", type=float, default=6, help="heap limit of each case in GB (default: 6)")
    p.add_argument("--exec", action="store_true", help="a new interpreter per case instead of a fork")
    p.add_argument("--only", help="hostile groups to run, comma-separated (data,train,generate,evaluate,audit,"
                   "embeddings,lora); default: all")
    options = p.parse_args(argv)
    work = Path(options.work or tempfile.mkdtemp(prefix="hostile-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # caches (hashes, torch hub) inside the work folder; nothing is fetched from the network
    os.environ.update(XDG_CACHE_HOME=str(work / "cache"), TORCH_HOME=str(work / "cache" / "torch"),
                      HF_HUB_OFFLINE="1", HF_HOME=str(work / "cache" / "hf"),
                      PYTHONPATH=os.pathsep.join(sys.path[:3] + [os.environ.get("PYTHONPATH", "")]))   # for --exec
    import importlib
    for command in ("audit", "data", "embeddings", "evaluate", "generate", "lora", "train"):
        importlib.import_module(f"medti.{command}")   # imported once here: every forked case starts warm
    start = time.monotonic()
    real = real_part(work, options) if options.part in ("both", "real") else []
    hostile = hostile_part(work, options) if options.part in ("both", "hostile") else []
    text = table(real, hostile)
    print(text)
    summary = {"seconds": round(time.monotonic() - start, 1), "work": str(work), "fork": not options.exec,
               "timeout_s": options.timeout, "cpu": _cpu(), "omp_num_threads": os.environ["OMP_NUM_THREADS"]}
    Path(options.out).write_text(json.dumps({"summary": summary, "table": text, "real": real, "hostile": hostile},
                                            indent=1, ensure_ascii=True))
    print(f"wrote {options.out} in {summary['seconds']} s")
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
