"""The hostile cases of tools/hostile_rerun.py: one command line each, over every command (data, train, generate,
evaluate, audit, embeddings, lora), on the tiny random model and the files of tools/hostile_files.py. What counts
as clean is hostile_rerun's rule; a case here only says what it runs, which output is its own, and (for commands
that print instead of writing) what a success must show."""
import os
import shlex
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from hostile_files import BAD_NAME, alone, damaged, png_bytes, weights_files, write_all

BAD = ["-1", "0", "nan", "inf", "1e309", "²", "", "abc", "2.5"]   # for every number: signs, non-numbers, overflow
HUGE = "99999999999"
SURROGATE = os.fsdecode(b"\xff")   # an argument that is not UTF-8, as Python hands it over (surrogateescape)
# cases whose input is valid (their `what` says so): a refusal is a wrong answer there, however clean its line
VALID = ("a good", "non-UTF-8 file name", "non-UTF-8 name", "--format dicom", "weight 0.5", "export a1111",
         "export diffusers")


@dataclass
class Case:
    group: str
    what: str
    module: str
    args: list
    out: str | None = None        # the output this case may write (a folder or a file); a refusal leaves it as it was
    check: object = None          # exit 0: (Result, new files) -> a problem or None; default: hostile_rerun's
    names: list = field(default_factory=list)
    must_run: bool = False

    def __post_init__(self):
        self.args = [str(a) for a in self.args]
        self.must_run = any(v in self.what for v in VALID)
        paths = [a for a in self.args if "/" in a]
        # non-UTF-8 bytes as a message may show them: the bytes escaped (\xff), or the surrogates (\udcff)
        shown = [os.fsencode(p).decode("utf-8", "backslashreplace") for p in paths] + \
            [p.encode("utf-8", "backslashreplace").decode() for p in paths]
        self.names = [n for p in paths + shown for n in (p, Path(p).name) if len(n) >= 4]

    def line(self) -> str:
        """The command as a bash line (non-UTF-8 bytes as $'\\xff')."""
        def quoted(a):
            try:
                a.encode()
                return shlex.quote(a)
            except UnicodeEncodeError:   # surrogate-escaped bytes: bash's $'...' with \x escapes
                return "$'" + "".join(chr(b) if 32 <= b < 127 and chr(b) not in "'\\" else f"\\x{b:02x}"
                                      for b in os.fsencode(a)) + "'"
        shown = [quoted(a) if len(a) <= 200 else f"{quoted(a[:40])}...({len(a)} characters; see args)"
                 for a in self.args]
        return " ".join(["python -m", self.module] + shown)


def printed(result, new) -> str | None:
    return None if result.stdout.strip() else "exit 0 and nothing printed"


def fixtures(work: Path, setup) -> SimpleNamespace:
    """Good and damaged inputs in `work`; `setup(module, args)` runs a command in a child (model, training)."""
    from medti.training.demo import phantoms
    f = SimpleNamespace(root=work)
    f.model, f.config = work / "model" / "tiny-random.safetensors", work / "model" / "tiny-random.json"
    f.data, f.fake = phantoms(work / "data", 8, 0), phantoms(work / "fake", 8, 1)
    f.inception, f.emb, f.lora = work / "inception.pth", work / "run-ti" / "x.safetensors", \
        work / "run-lora" / "lora.safetensors"
    trained = {"ti": ["--token", "<x>"], "lora": ["--method", "lora", "--instance-prompt", "a scan of sks"]}
    made = {f.model: ("hostile_files", ["model", work / "model"]), f.inception: ("hostile_files", ["inception",
            f.inception])} | {f.root / f"run-{m}": ("medti.train", ["--model", f.model, "--config", f.config, "--data",
                                                                    f.data, *extra, "--max-steps", "1", "--resolution",
                                                                    "64", "--out", work / f"run-{m}"])
                              for m, extra in trained.items()}
    for path, (module, args) in made.items():   # made once per --work folder, kept for the next run
        result = None if path.exists() else setup(module, args)
        if result is not None and result.rc != 0:
            raise SystemExit(f"could not make {path}: {result.stderr[-2000:]}")
    with warnings.catch_warnings():   # pydicom warns about the invalid values written on purpose
        warnings.simplefilter("ignore")
        f.junk = write_all(work / "junk", damaged())
    f.weights = {k: str(p) for k, p in write_all(work / "weights", weights_files()).items()}
    f.alone = alone(work / "alone", f.junk)
    f.empty = work / "empty"
    f.empty.mkdir(exist_ok=True)
    f.badname = write_all(work / "badname", {BAD_NAME + b".png": png_bytes(seed=5), "good.png": png_bytes(seed=6)})
    f.badname_dir = work / "badname"
    f.file = write_all(work, {"a-file": b"a file, not a folder\n"})["a-file"]
    f.full = write_all(work / "full", {"keep.txt": b"already here\n"})["keep.txt"].parent
    return f


def data_cases(f, new) -> list:
    def preview(what, *extra, data=None, out=None):
        out = new() if out is None else out   # "" is a case of its own: an empty --out
        return Case("data", what, "medti.data", ["preview", "--data", data or f.data, "--resolution", "64", "--out",
                                                  out, *extra], str(out))
    cases = [preview(f"--resolution {v!r}", "--resolution", v) for v in BAD + [HUGE, "7", "100000"]]
    cases += [preview(f"--window {v!r}", f"--window={v}") for v in ["nan,400", "40,0", "40", "lung,", "", "²,400",
                                                                     "1e309,1", "40,1e309"]]
    cases += [preview(f"--plane {v!r}", "--plane", v) for v in ["", "oblique", "AXIAL"]]
    cases += [preview(f"--slices {v!r}", f"--slices={v}") for v in ["0:0", "middle:0", "5:1:-1", "a:b", "", "mask",
                                                                    "1:2:0"]]
    cases += [preview(f"--channels {v!r}", "--channels", v) for v in ["", ",", "t2w,t2w", "a b"]]
    cases += [preview(f"--preprocess {v!r}", "--preprocess", v) for v in ["", "nope"]]
    cases += [preview(f"--slice-mask {v}", "--slice-mask", v) for v in ["/nonexistent/m.nii.gz", "m.nii.gz"]]
    cases += [preview("--data missing", data="/nonexistent/data"), preview("--data a file", data=f.file),
              preview("--data empty folder", data=f.empty), preview("a non-UTF-8 file name", data=f.badname_dir),
              preview("--out inside --data", out=f.data / "preview")]
    cases += [preview("--out an existing file", out=f.file), preview("--out a non-empty folder", out=f.full),
              preview("--out under a file", out=f.file / "sub"), preview("--out ''", out=""),
              preview("--out a non-UTF-8 name", out=f.root / "out" / os.fsdecode(BAD_NAME))]
    cases += [preview(f"{name} alone", data=folder) for name, folder in f.alone.items()]
    cases += [preview(f"{name} alone, --strict", "--strict", data=folder) for name, folder in f.alone.items()]
    return cases


def train_cases(f, new) -> list:
    def train(what, *extra, model=None, config=None, data=None, out=None):
        out = new() if out is None else out   # "" is a case of its own: an empty --out
        config = f.config if config is None else config   # "" is a case of its own: no config (a preset)
        return Case("train", what, "medti.train", ["--model", model or f.model, "--config", config,
                                                   "--data", data or f.data, "--token", "<x>", "--max-steps", "2",
                                                   "--resolution", "64", "--save-every", "1000", "--preview-every",
                                                   "0", "--out", out, *extra], str(out))
    numbers = {"--max-steps": ["-1", "0", "nan", "²", "", "2.5"], "--lr": ["-1", "0", "nan", "inf", "", "abc",
               "0.005:x", "0.005:-1", "0.005:10, nan"], "--batch": ["-1", "0", "nan", "", HUGE],
               "--grad-accum": ["0", "-1", "nan"], "--vectors": ["-1", "0", "76", HUGE, "nan"],
               "--resolution": ["-1", "7", "nan", HUGE, "100000"], "--seed": ["-1", str(2 ** 32), "nan", "²"],
               "--val-fraction": ["-0.1", "1", "1.5", "nan", "0.5"], "--val-draws": ["0", "-1"],
               "--save-every": ["0", "-1", "nan"], "--preview-every": ["-1"], "--threads": ["-1", "nan", HUGE],
               "--token": ["", "x", "<x y>", "<ÿ>", SURROGATE], "--init": ["", "zzqqxxjj"],
               "--method": ["", "nope"], "--latents": ["nope"], "--checkpointing": ["maybe"], "--dtype": ["fp8"],
               "--device": ["cuda", "nonsense", "cuda:99"], "--prior-weight": ["nan"]}
    cases = [train(f"{flag} {v!r}", f"{flag}={v}") for flag, values in numbers.items() for v in values]
    lora, unet = ["--method", "lora", "--instance-prompt", "a scan of sks"], ["--method", "unet", "--instance-prompt",
                                                                              "a scan of sks"]
    cases += [train(f"lora --rank {v!r}", *lora, f"--rank={v}") for v in ["0", "-1", HUGE, "nan"]]
    cases += [train(f"lora --alpha {v!r}", *lora, f"--alpha={v}") for v in ["-1", "nan", "inf"]]
    cases += [train(f"unet --ema {v!r}", *unet, f"--ema={v}") for v in ["1.5", "-1", "nan"]]
    cases += [train("unet --save-dtype fp8", *unet, "--save-dtype", "fp8"),
              train("lora --class-images missing", *lora, "--class-prompt", "a scan", "--class-images", "/no/where")]
    w = f.weights
    cases += [train(f"--template {n}", "--template", p) for n, p in (("missing", "/no/templates.txt"),
                                                                     ("empty", w["empty.txt"]),
                                                                     ("without {}", w["no-placeholder.txt"]))]
    cases += [train("--model missing", model="/no/model.safetensors"), train("--config missing", config="/no/c.json"),
              train("--model a preset, offline", model="sd2-base", config=""),
              train("--model a preset with a --config file", model="sd2-base")]
    cases += [train(f"--config {n}", config=w[n]) for n in ("bad.json", "empty.json", "wrong-types.json", "nan.json")]
    cases += [train(f"--model {n}", model=w[n]) for n in ("random.safetensors", "empty.safetensors",
                                                          "huge-header.safetensors", "bad-json.safetensors",
                                                          "random.ckpt")]
    cases += [train("--data missing", data="/no/data"), train("--data empty", data=f.empty),
              train("--data only a damaged PNG", data=f.alone["random.png"]),
              train("--data a non-UTF-8 file name", data=f.badname_dir),
              train("--val missing", "--val", "/no/val"), train("--val empty", "--val", f.empty)]
    cases += [train("--out an existing file", out=f.file), train("--out inside --data", out=f.data / "run"),
              train("--out under a file", out=f.file / "run"), train("--out ''", out=""),
              train("--resume with nothing to resume", "--resume")]
    return cases


def generate_cases(f, new) -> list:
    def generate(what, *extra, model=None, config=None, out=None, prompt="a scan"):
        out = new() if out is None else out   # "" is a case of its own: an empty --out
        return Case("generate", what, "medti.generate", ["--model", model or f.model, "--config", config or f.config,
                                                         "--prompt", prompt, "--steps", "2", "--out", out, *extra],
                    str(out))
    good_png = write_all(f.root / "init", {"init.png": png_bytes(seed=3)})["init.png"]
    init, mask = ["--init-image", good_png], ["--init-image", good_png, "--mask", good_png]
    numbers = {"--n": ["-1", "0", "nan", "", "²"], "--steps": ["-1", "0", "nan", "2.5", ""],
               "--cfg": ["nan", "inf", "-1e309", ""], "--size": ["-1", "0", "7", "63", HUGE, "nan", "100000"],
               "--width": ["0", "7", "100000"], "--height": ["0", "-8"], "--seed": ["-1", str(2 ** 64), "nan", "²"],
               "--batch": ["-1", "nan"], "--negative": [SURROGATE], "--device": ["cuda", "nonsense"],
               "--dtype": ["fp16", "fp8"], "--sampler": ["nope"], "--sigmas": ["nope"]}
    cases = [generate(f"{flag} {v!r}", f"{flag}={v}") for flag, values in numbers.items() for v in values]
    cases += [generate(f"--strength {v}", *init, f"--strength={v}") for v in ["-0.5", "1.5", "nan", "0"]]
    cases += [generate(f"--mask-blur {v}", *mask, f"--mask-blur={v}") for v in ["-1", "nan", HUGE]]
    cases += [generate(f"--sweep with --weights {v!r}", "--sweep", "a", "b", f"--weights={v}", prompt="")
              for v in ["", "a,b", "nan", "2"]]
    cases += [generate(f"--prompt {v[:30]!r}", prompt=v) for v in ["", SURROGATE, "a :nan AND b", "a AND",
                                                                    "<lora:missing:1> a", "x " * 10000]]
    w = f.weights
    cases += [generate(f"--embeddings {n}", "--embeddings", p) for n, p in [
        ("missing", "/no/e.safetensors"), ("the LoRA file", f.lora), ("a good one", f.emb)] + [
        (n, w[n]) for n in ("random.safetensors", "empty.safetensors", "bad-json.safetensors",
                            "lying-offsets.safetensors", "random.pt")]]
    cases += [generate(f"--lora {n}", "--lora", p) for n, p in [
        ("missing", "/no/l.safetensors"), ("random", w["random.safetensors"]), ("the embedding", f.emb),
        ("weight nan", f"{f.lora}:nan"), ("weight empty", f"{f.lora}:"), ("weight 0.5", f"{f.lora}:0.5")]]
    cases += [generate("--lora-dir missing", "--lora-dir", "/no/loras")]
    cases += [generate(f"--init-image {n}", "--init-image", p) for n, p in [("missing", "/no/i.png")] + [
        (n, f.junk[n]) for n in ("truncated.png", "text.png", "random-dicm", "bomb.png")]]
    cases += [generate("--mask missing", *init, "--mask", "/no/m.png"),
              generate("--mask truncated", *init, "--mask", f.junk["truncated.png"])]
    cases += [generate("--model missing", model="/no/m.safetensors"), generate("--model random", model=w[
        "random.safetensors"]), generate("--config bad", config=w["bad.json"])]
    cases += [generate("--out an existing file", out=f.file), generate("--out under a file", out=f.file / "g"),
              generate("--out a non-UTF-8 name", out=f.root / "out" / (os.fsdecode(BAD_NAME) + "-g")),
              generate("--format dicom", "--format", "dicom"), generate("--resume on a new folder", "--resume")]
    return cases


def evaluate_cases(f, new) -> list:
    def evaluate(what, *extra, real=None, fake=None, inception=None, out=None):
        out = new() if out is None else out   # "" is a case of its own: an empty --out
        return Case("evaluate", what, "medti.evaluate", ["--real", real or f.data, "--fake", fake or f.fake, "--out",
                                                         out, "--inception", inception or f.inception,
                                                         "--kid-subsets", "2", "--kid-subset-size", "4",
                                                         "--ms-ssim-pairs", "2", *extra], str(out))
    numbers = {"--kid-subsets": ["0", "-1", "nan"], "--kid-subset-size": ["0", "100", "nan"],
               "--k": ["0", "-1", "100", "nan"], "--ms-ssim-pairs": ["-1", "nan"], "--batch": ["0", "-1", "nan"],
               "--seed": ["-1", "nan"], "--window": ["x"]}
    cases = [evaluate("a good run")]
    cases += [evaluate(f"{flag} {v!r}", f"{flag}={v}") for flag, values in numbers.items() for v in values]
    w = f.weights
    cases += [evaluate("--real missing", real="/no/real"), evaluate("--fake missing", fake="/no/fake"),
              evaluate("--real only a damaged PNG", real=f.alone["random.png"]),
              evaluate("--fake empty", fake=f.empty), evaluate("--real random .npz", real=w["random.npz"]),
              evaluate("--real .npz with other keys", real=w["wrong-keys.npz"]),
              evaluate("--inception missing", inception="/no/inception.pth"),
              evaluate("--inception random bytes", inception=w["random.pt"]),
              evaluate("--save-stats under a file", "--save-stats", f.file / "s.npz"),
              evaluate("--save-features .txt", "--save-features", f.root / "features.txt"),
              evaluate("--features dinov2, --dinov2 missing", "--features", "dinov2", "--dinov2", "/no/dinov2"),
              evaluate("--run missing", "--run", "/no/run")]
    return cases


def audit_cases(f, new) -> list:
    def audit(what, *extra, train=None, synthetic=None, out=None):
        out = new() if out is None else out   # "" is a case of its own: an empty --out
        return Case("audit", what, "medti.audit", ["--train", train or f.data, "--synthetic", synthetic or f.fake,
                                                   "--out", out, *extra], str(out))
    w = f.weights
    cases = [audit("a good run")]
    cases += [audit(f"--threshold {v!r}", f"--threshold={v}") for v in ["nan", "-1", "2", ""]]
    cases += [audit("--preprocess nope", "--preprocess", "nope"), audit("--window x", "--window", "x"),
              audit("--threads -1", "--threads", "-1"), audit("--out an existing file", out=f.file)]
    cases += [audit(f"--manifest {n}", "--manifest", p) for n, p in (("missing", "/no/manifest.jsonl"),
                                                                     ("not JSON", w["bad.json"]),
                                                                     ("empty", w["empty.json"]))]
    cases += [audit("--train missing", train="/no/train"), audit("--train only damaged", train=f.alone["text.png"]),
              audit("--synthetic missing", synthetic="/no/syn"), audit("--synthetic empty", synthetic=f.empty),
              audit("--features dinov2, --dinov2 missing", "--features", "dinov2", "--dinov2", "/no/dinov2")]
    return cases


def file_cases(f, new) -> list:
    """embeddings info/export and lora info/merge on good, damaged and mistaken files."""
    w = f.weights
    damaged = [(n, w[n]) for n in ("random.safetensors", "empty.safetensors", "huge-header.safetensors",
                                   "bad-json.safetensors", "lying-offsets.safetensors", "random.pt", "random.npz")]
    bad_copy = write_all(f.root / "badname-emb", {BAD_NAME + b".safetensors": Path(f.emb).read_bytes()})
    info = [("missing", "/no/e.safetensors"), ("the LoRA file", f.lora), ("an empty folder", f.empty),
            ("a good one", f.emb), ("a non-UTF-8 name", next(iter(bad_copy.values())))] + damaged
    cases = [Case("embeddings", f"info {n}", "medti.embeddings", ["info", p], check=printed) for n, p in info]

    def export(what, source, out, *extra):
        return Case("embeddings", what, "medti.embeddings", ["export", source, out, *extra], str(out))
    cases += [export("export a1111", f.emb, new(".pt"), "--format", "a1111"),
              export("export diffusers", f.emb, new(".safetensors"), "--format", "diffusers"),
              export("export onto an existing file", f.emb, f.file, "--format", "a1111"),
              export("export into a missing folder", f.emb, "/no/where/e.pt", "--format", "a1111"),
              export("export a damaged file", w["random.safetensors"], new(".pt"), "--format", "a1111"),
              export("export under a file", f.emb, f.file / "e.pt", "--format", "a1111"),
              export("export --format nope", f.emb, new(".pt"), "--format", "nope")]
    info = [("missing", "/no/l.safetensors"), ("the embedding", f.emb), ("a good one", f.lora)] + damaged[:4]
    cases += [Case("lora", f"info {n}", "medti.lora", ["info", p], check=printed) for n, p in info]

    def merge(what, *loras, out=None, model=None):
        out = out or new(".safetensors")
        return Case("lora", what, "medti.lora", ["merge", "--model", model or f.model, "--config", f.config,
                                                 *[a for lo in loras for a in ("--lora", lo)], "--out", out], str(out))
    cases += [merge("merge a good one", f"{f.lora}:0.5"), merge("merge missing", "/no/l.safetensors"),
              merge("merge weight nan", f"{f.lora}:nan"), merge("merge weight empty", f"{f.lora}:"),
              merge("merge a random file", w["random.safetensors"]), merge("merge the embedding", f.emb),
              merge("merge onto an existing file", f.lora, out=f.file),
              merge("merge under a file", f.lora, out=f.file / "m.safetensors"),
              merge("merge --model missing", f.lora, model="/no/m.safetensors")]
    return cases


def cases(work: Path, setup) -> list:
    f = fixtures(work, setup)
    shutil.rmtree(f.root / "out", ignore_errors=True)   # the cases' outputs: new on every run
    counter = iter(range(10 ** 6))

    def new(suffix=""):   # a fresh output path per case
        return f.root / "out" / f"{next(counter):03d}{suffix}"
    (f.root / "out").mkdir(exist_ok=True)
    return (data_cases(f, new) + train_cases(f, new) + generate_cases(f, new) + evaluate_cases(f, new) +
            audit_cases(f, new) + file_cases(f, new))
