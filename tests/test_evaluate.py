"""`python -m medti.evaluate` end to end: its figures against torchmetrics run on the same images with
torch-fidelity's own Inception network loading the same (random) weights file; statistics and feature files; a
run folder as --fake; and every bad input as one line with nothing half-written."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import private_key, rel_err
from medti import evaluate


def _write_set(folder, n: int, size=(64, 64), seed=0, mode="L"):
    """n smooth random images (a blurred noise field, so Inception features differ between images)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        low = g.random((size[1] // 8 + 1, size[0] // 8 + 1, 3 if mode == "RGB" else 1))
        image = Image.fromarray((low * 255).astype(np.uint8).squeeze()).resize(size, Image.BICUBIC)
        image.convert(mode).save(folder / f"img{i:03d}.png")
    return folder


def _run(*argv) -> int:
    return evaluate.main([str(a) for a in argv])


def _error(capsys) -> str:
    """The one error line of a failed run (stderr also carries progress lines, e.g. which weights were loaded)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


def _only_line(capsys) -> str:
    """The error line of a run refused before it started: stderr holds that line and nothing else."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def _uint8(folder) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
                        for f in files])


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    # equal sizes: torchmetrics' KID is right only for equal set sizes (its cross term divides by m²)
    return _write_set(root / "real", 6, seed=1), _write_set(root / "fake", 6, seed=2, mode="RGB")


@pytest.fixture(scope="module")
def report(sets, inception_file, tmp_path_factory):
    real, fake = sets
    out = tmp_path_factory.mktemp("eval-out") / "report"
    assert _run("--real", real, "--fake", fake, "--out", out, "--inception", inception_file, "--kid-subsets", 5,
                "--kid-subset-size", 4, "--save-features", out.parent / "features.safetensors") == 0
    return out, json.loads((out / "report.json").read_text())


def test_figures_equal_torchmetrics_with_torch_fidelity_network(sets, report, inception_file):
    """FID and full-set KID against torchmetrics, whose FID/KID call torch-fidelity's FeatureExtractorInceptionV3
    (the network of the reference study) — here loading the same weights file, so the whole chain is compared:
    image reading, resize, network, statistics and distance. KID with one subset of all images is the full-set
    MMD² (a subset of all images is a permutation, and MMD² does not depend on the order)."""
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance
    real, fake = _uint8(sets[0]), _uint8(sets[1])
    # torchmetrics' own wrapper of torch-fidelity's FeatureExtractorInceptionV3; antialias=False is the TF 1.x
    # resize (torchmetrics 1.9's default is antialiased: tested against --antialias below)
    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file),
                             antialias=False)
    fid = FrechetInceptionDistance(feature=net)
    kid = KernelInceptionDistance(feature=net, subsets=1, subset_size=len(fake))
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    _, figures = report
    # FID: both sides float64 statistics of float32 features that agree to ~1e-5 relative (summation order in
    # the convolutions); FID is a difference of traces of ~1e2, so 1e-4 relative bounds it with room.
    assert rel_err(torch.tensor(figures["fid"]), fid.compute()) <= 1e-4
    assert rel_err(torch.tensor(figures["kid"]), kid.compute()[0]) <= 1e-4
    assert figures["n_real"] == 6 and figures["n_fake"] == 6 and figures["kid_subset_size"] == 4
    assert 0 <= figures["precision"] <= 1 and 0 <= figures["recall"] <= 1
    assert figures["weights_official"] is False   # random weights: the report must not call them official


def test_report_files(report):
    out, figures = report
    for key in ("fid", "kid", "kid_mean", "kid_std", "precision", "recall", "ms_ssim_fake", "ms_ssim_real",
                "n_real", "n_fake", "features", "weights_sha256", "seed"):
        assert key in figures
    text = (out / "report.md").read_text()
    assert "trust KID over FID" in text and "NOT the official file" in text
    for name in ("samples.png", "nearest.png"):
        assert Image.open(out / name).format == "PNG"
    # 64-px images are below MS-SSIM's 5-scale minimum: reported as not computed, with the reason
    assert figures["ms_ssim_fake"] is None and figures["ms_ssim_notes"]
    assert not list(out.glob("*.tmp*"))


def test_saved_features_are_the_rows_of_each_set(report, sets):
    out, _ = report
    with safe_open(out.parent / "features.safetensors", "pt") as f:
        meta = f.metadata()
        real, fake = f.get_tensor("real"), f.get_tensor("fake")
    named = private_key(out.parent / "features.names.private.tsv")   # the real images by pseudonym, and the key
    assert [named[name] for name in json.loads(meta["real_files"])] == [p.name for p in sorted(sets[0].glob("*.png"))]
    assert json.loads(meta["fake_files"]) == [p.name for p in sorted(sets[1].glob("*.png"))]
    assert real.shape == (6, 2048) and fake.shape == (6, 2048)


def test_stats_file_gives_the_same_figures(sets, report, inception_file, tmp_path):
    real, fake = sets
    stats = tmp_path / "real-stats.npz"
    assert _run("--real", real, "--save-stats", stats, "--inception", inception_file) == 0
    out = tmp_path / "again"
    assert _run("--real", stats, "--fake", fake, "--out", out, "--inception", inception_file, "--kid-subsets", 5,
                "--kid-subset-size", 4) == 0
    again, first = json.loads((out / "report.json").read_text()), report[1]
    # The same float32 features and the same seed: identical arithmetic, so equal to the last bit.
    for key in ("fid", "kid", "kid_mean", "kid_std", "precision", "recall"):
        assert again[key] == first[key], key


def test_stats_file_checks(sets, inception_file, tmp_path, capsys):
    real, fake = sets
    stats = tmp_path / "s.npz"
    assert _run("--real", real, "--save-stats", stats, "--inception", inception_file) == 0
    data = dict(np.load(stats))
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{**data, "mu": data["mu"][:100]})
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, mu=data["mu"], sigma=data["sigma"])   # pytorch-fid's layout: no network, no weights hash
    other = tmp_path / "other.npz"
    np.savez(other, **{**data, "weights_sha256": np.array("0" * 64)})
    for path, words in ((bad, "mu has shape"), (foreign, "not a medti statistics file"), (other, "made with")):
        capsys.readouterr()
        assert _run("--real", path, "--fake", fake, "--out", tmp_path / "o", "--inception", inception_file) == 2
        err = _only_line(capsys)   # before: the network's line came first
        assert words in err and str(path) in err
        assert not (tmp_path / "o").exists()


def test_run_folder_as_fake_leaves_out_the_grid(sets, inception_file, tmp_path):
    """A generation run's folder is read through its manifest: grid.png (the --grid contact sheet) is not a
    sample, and counting it would shift every figure."""
    run = _write_set(tmp_path / "run", 4, seed=3)
    lines = [json.dumps({"file": p.name, "prompt": "x", "seed": i}) for i, p in enumerate(sorted(run.glob("*.png")))]
    (run / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    Image.new("RGB", (256, 64)).save(run / "grid.png")
    out = tmp_path / "o"
    assert _run("--real", sets[0], "--fake", run, "--out", out, "--inception", inception_file,
                "--kid-subset-size", 4) == 0
    assert json.loads((out / "report.json").read_text())["n_fake"] == 4


def test_sizes_may_differ(tmp_path, inception_file):
    real = _write_set(tmp_path / "r", 4, size=(80, 64), seed=4)
    fake = _write_set(tmp_path / "f", 4, size=(200, 200), seed=5)
    out = tmp_path / "o"
    assert _run("--real", real, "--fake", fake, "--out", out, "--inception", inception_file) == 0
    figures = json.loads((out / "report.json").read_text())
    assert figures["ms_ssim_fake"] is not None and figures["ms_ssim_real"] is None   # 200 px vs 64 px


@pytest.mark.parametrize("case, words", [
    ("empty", "0 usable image(s)"), ("single", "1 usable image(s)"), ("no-out", "--out DIR is needed"),
    ("nothing", "nothing to do"), ("stats-suffix", "name the file *.npz"), ("missing", "no such folder"),
    ("k", "--k 6: each set needs more than k images"), ("subset", "--kid-subset-size 9: larger than the smaller"),
])
def test_bad_input_is_one_line(case, words, sets, inception_file, tmp_path, capsys):
    real, fake = sets
    empty = tmp_path / "empty"
    empty.mkdir()
    single = _write_set(tmp_path / "single", 1)
    out = tmp_path / "o"
    argv = {"empty": ["--real", empty, "--fake", fake, "--out", out],
            "single": ["--real", real, "--fake", single, "--out", out],
            "no-out": ["--real", real, "--fake", fake], "nothing": ["--real", real],
            "stats-suffix": ["--real", real, "--save-stats", tmp_path / "s.json"],
            "missing": ["--real", tmp_path / "nope", "--fake", fake, "--out", out],
            "k": ["--real", real, "--fake", fake, "--out", out, "--k", 6],
            "subset": ["--real", real, "--fake", fake, "--out", out, "--kid-subset-size", 9]}[case]
    assert _run(*argv, "--inception", inception_file) == 2
    assert words in _error(capsys)
    assert not out.exists() and not (tmp_path / "s.json").exists()


def test_a_set_of_damaged_files_is_one_line(sets, inception_file, tmp_path, capsys):
    """Before: the warning listing the skipped file, then the error saying the same."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "random.png").write_bytes(bytes(range(256)) * 4)
    assert _run("--real", damaged, "--fake", sets[1], "--out", tmp_path / "o", "--inception", inception_file) == 2
    assert "0 usable image(s), 1 skipped, e.g. random.png: not an image PIL can read" in _only_line(capsys)


def test_wrong_weights_file_is_one_line(sets, tmp_path, capsys):
    wrong = tmp_path / "unet.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    assert _run("--real", sets[0], "--fake", sets[1], "--out", tmp_path / "o", "--inception", wrong) == 2
    assert str(wrong) in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_statistics_of_the_other_resize_are_refused(sets, inception_file, tmp_path, capsys):
    """--antialias (torchmetrics 1.9's default resize) gives other features: a TF1-resize statistics file must
    not silently be mixed with them."""
    stats = tmp_path / "tf1.npz"
    assert _run("--real", sets[0], "--save-stats", stats, "--inception", inception_file) == 0
    assert _run("--real", stats, "--fake", sets[1], "--out", tmp_path / "o", "--inception", inception_file,
                "--antialias") == 2
    err = _error(capsys)
    assert "antialiased resize" in err and "drop --antialias" in err and not (tmp_path / "o").exists()


def test_out_inside_an_input_or_holding_other_files_is_refused_first(sets, inception_file, tmp_path, capsys):
    """--out inside --real would put sheets of the images among the images (counted next time); a folder with
    the user's own files is not ours to write into. Both refused before anything is encoded."""
    real, fake = sets
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    for out, words in ((real / "eval", "is inside --real"), (fake / "e", "is inside --fake"),
                       (mine, "holds other files (e.g. notes.txt)"), (tmp_path / "nodir" / "s.npz", None)):
        argv = ["--real", real, "--fake", fake, "--out", out] if words else ["--real", real, "--save-stats", out]
        assert _run(*argv, "--inception", inception_file) == 2
        err = capsys.readouterr().err
        assert (words or "does not exist; create it first") in err and "encoding" not in err
        assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1
    assert not (real / "eval").exists() and not (fake / "e").exists()


def test_default_kid_subsets_have_a_spread(sets, inception_file, tmp_path):
    """Equal set sizes under 1,000: the default subset is half the smaller set, so the 100 subsets differ (a
    subset of all images is the full set each time, and the spread of identical figures is 0)."""
    out = tmp_path / "o"
    assert _run("--real", sets[0], "--fake", sets[1], "--out", out, "--inception", inception_file) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kid_subset_size"] == 3 and report["kid_std"] > 1e-6 * abs(report["kid_mean"])


def _pickled(path):
    with open(path, "wb") as f:   # an object array: np.load refuses it without allow_pickle
        np.save(f, np.array([{"x": 1}], dtype=object), allow_pickle=True)


# case -> (how the valid statistics file is damaged, words of the one-line error)
DAMAGED = {
    "truncated": (lambda path, data: path.write_bytes(path.read_bytes()[:300]), "not a readable .npz archive"),
    "text": (lambda path, data: path.write_text("mu,sigma\n1,2\n"), "not a readable .npz archive"),
    "pickle": (lambda path, data: _pickled(path), "pickled (object) arrays, which are never loaded"),
    "n-string": (lambda path, data: np.savez(path, **{**data, "n": np.array("six")}), "'n' is missing or not a number"),
    "files-not-json": (lambda path, data: np.savez(path, **{**data, "files": np.array("a.png, b.png")}),
                       "'files' is missing or not JSON"),
    "int-names": (lambda path, data: np.savez(path, **{**data, "files": np.array(json.dumps(list(range(6))))}),
                  "6 file name(s)"),
    "nan-mean": (lambda path, data: np.savez(path, **{**data, "mu": data["mu"] * np.nan}), "mu holds NaN"),
    "no-sigma": (lambda path, data: np.savez(path, **{k: v for k, v in data.items() if k != "sigma"}),
                 "sigma is missing"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_statistics_file_is_one_line(sets, inception_file, tmp_path, capsys, case):
    """Each was a traceback or a NaN figure naming no file; numpy's advice to load with allow_pickle (which runs
    code from the file) is never passed on."""
    real, fake = sets
    stats = tmp_path / "s.npz"
    assert _run("--real", real, "--save-stats", stats, "--inception", inception_file) == 0
    damage, words = DAMAGED[case]
    damage(stats, dict(np.load(stats)))
    capsys.readouterr()
    assert _run("--real", stats, "--fake", fake, "--out", tmp_path / "o", "--inception", inception_file) == 2
    err = _only_line(capsys)   # before: the network's line came first
    assert words in err and str(stats) in err and "allow_pickle" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("line, words", [
    (b'{"file": 7}', "line 1 is not a manifest record"),
    (b'{"file": "/etc/img.png"}', "outside the manifest's folder"),
    (b'{"file": "../real/img000.png"}', "outside the manifest's folder"),
    (b'{"file": "a.png", "prompt": "\xff\xfe"}', "not UTF-8 text"),
    (b'[1, 2]', "line 1 is not a manifest record"),
])
def test_a_damaged_manifest_is_one_line(sets, inception_file, tmp_path, capsys, line, words):
    """A manifest names the images to score: an entry outside its folder was scored silently (`..`, an absolute
    path), others were tracebacks (an int name, bytes that are not UTF-8)."""
    real, _ = sets
    run = _write_set(tmp_path / "run", 3)
    (run / "manifest.jsonl").write_bytes(line + b"\n")
    assert _run("--real", real, "--fake", run, "--out", tmp_path / "o", "--inception", inception_file) == 2
    err = _error(capsys)
    assert words in err and "manifest.jsonl" in err, err
    assert not (tmp_path / "o").exists()


def test_a_seed_torch_cannot_take_is_one_line(sets, inception_file, tmp_path, capsys):
    real, fake = sets
    assert _run("--real", real, "--fake", fake, "--out", tmp_path / "o", "--seed", 2 ** 70) == 2
    assert "--seed 1180591620717411303424: torch takes seeds from 0 to 2**64 - 1" in _error(capsys)
    assert not (tmp_path / "o").exists()
