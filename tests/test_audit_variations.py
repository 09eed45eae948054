"""`python -m medti.audit` on variations of a case (`medti.generate --condition-image`): each variation scored against
its own source image, found by the pseudonym and sha256 its manifest record names, among the training images or
--sources; a source found nowhere reported by pseudonym; no source named by its path in anything shared.

The manifests here are written by hand, following the contract of medti.generate's image-conditioned records
(`"condition": [{"pseudonym": "img-<sha12>", "sha256": "<64 hex>"}]`, two entries with "mix" for --mix): that
command is being built beside this one, and these tests must not wait for it. The images are the simulated chest
X-rays of tests/test_privacy.py at 128 px, as in tests/test_audit.py."""
import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_audit import one_line_error, save
from test_privacy import chest
from test_volume import _write_nifti

from conftest import private_key
from medti.audit import main
from medti.quality.folders import Reading, load_set

SIZE = 128
PATIENT = "DOE_JOHN_MRN4242"   # in every source's file and folder name: no shared output may hold it


def source(path) -> dict:
    """A "condition" entry for a file, computed here from its bytes by the documented rule (docs/privacy-audit.md):
    `img-` and the first 12 hex digits of its sha256, and the whole sha256."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"pseudonym": f"img-{digest[:12]}", "sha256": digest}


def shifted_noisy(image: np.ndarray) -> np.ndarray:
    """What a variation that keeps much of its source looks like: moved 3 px down and right (2.3 %), noise σ 12."""
    noise = np.random.default_rng(5).normal(0, 12, image.shape)
    return np.clip(np.roll(image, (3, 3), (0, 1)) + noise, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """train/ (10 patients, named after a patient), held/ (one held-out case, not in train/) and var/, a run of
    variations with manifest.jsonl: 00000 an exact copy of its source p3; 00001 p5 shifted and noised; 00002 a copy
    of the held-out case; 00003 a --mix of p3 and p7 (r 0.75: three quarters p7) that copies p7; 00004 made from
    a file that is nowhere; 00005 a text-only image (no "condition")."""
    tmp = tmp_path_factory.mktemp("variations")
    train, held = tmp / "train" / PATIENT, tmp / "held" / PATIENT
    for i in range(10):
        save(train / f"{PATIENT}_{i}.png", chest(i, SIZE))
    save(held / f"{PATIENT}_heldout.png", chest(700, SIZE))
    (tmp / "elsewhere.png").write_bytes(b"a conditioning image the audit is not given")
    p = {i: source(train / f"{PATIENT}_{i}.png") for i in (3, 5, 7)}
    images = [chest(3, SIZE), shifted_noisy(chest(5, SIZE)), chest(700, SIZE), chest(7, SIZE), chest(600, SIZE),
              chest(601, SIZE)]
    conditions = [[p[3]], [p[5]], [source(held / f"{PATIENT}_heldout.png")],
                  [p[3], p[7]], [source(tmp / "elsewhere.png")], None]
    lines = []
    for i, (image, condition) in enumerate(zip(images, conditions, strict=True)):
        save(tmp / "var" / f"{i:05d}.png", image)
        record = {"file": f"{i:05d}.png", "prompt": "x-ray", "seed": i} | ({"mix": 0.75} if i == 3 else {})
        lines.append(json.dumps(record | ({"condition": condition} if condition else {})))
    (tmp / "var" / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return tmp, p


def run(tmp, out, *extra) -> dict:
    assert main(["--train", str(tmp / "train"), "--synthetic", str(tmp / "var"), "--out", str(tmp / out),
                 *map(str, extra)]) == 0
    return json.loads((tmp / out / "audit.json").read_text())


@pytest.fixture(scope="module")
def audited(sets):
    """The audit with --sources held/, with every text drawn into a sheet recorded (pixels cannot be searched)."""
    tmp, _ = sets
    with pytest.MonkeyPatch.context() as patch:
        drawn, text = [], ImageDraw.ImageDraw.text
        patch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, words, *a, **k: (
            drawn.append(str(words)), text(self, xy, words, *a, **k))[1])
        return run(tmp, "out", "--sources", tmp / "held"), drawn


def test_an_exact_copy_is_flagged_as_a_copy_of_its_own_source(sets, audited):
    _, p = sets
    pair, = audited[0]["images"][0]["sources"]
    assert pair["source"] == p[3]["pseudonym"] and pair["found_in"] == "train"
    assert pair["similarity"] == 1.0 and pair["copy"] and pair["rank"] == 1 and pair["nearest_is_source"]


def test_a_shifted_noisy_variation_scores_lower_by_the_audits_own_score(audited):
    """Lower than the exact copy; and the same number the audit gives the image against its nearest training image
    when that image is the source (both are privacy.exact against the same whitened image; 2e-4: two 4-digit
    roundings of float32 scores whose whitening ran in batches of different sizes)."""
    images = audited[0]["images"]
    pair, = images[1]["sources"]
    assert pair["similarity"] < images[0]["sources"][0]["similarity"]
    assert pair["nearest_is_source"] and images[1]["nearest"] == pair["source"]
    assert abs(pair["similarity"] - images[1]["similarity"]) <= 2e-4


def test_a_held_out_source_is_found_with_sources_and_named_in_the_key(sets, audited):
    tmp, _ = sets
    pair, = audited[0]["images"][2]["sources"]
    assert pair["found_in"] == "sources" and pair["copy"] and pair["similarity"] == 1.0
    assert private_key(tmp / "out")[pair["source"]] == str(tmp / "held" / PATIENT / f"{PATIENT}_heldout.png")


def test_a_mix_reports_both_sources_and_which_one_is_copied(sets, audited):
    """The mix copies p7: p7's pair is a copy of its source; p3's is not, and p7 (among others) is nearer."""
    _, p = sets
    first, second = audited[0]["images"][3]["sources"]
    assert (first["source"], second["source"]) == (p[3]["pseudonym"], p[7]["pseudonym"])
    assert first["mix"] == second["mix"] == 0.75 and (first["share"], second["share"]) == (0.25, 0.75)
    assert second["copy"] and second["nearest_is_source"]
    assert not first["copy"] and first["rank"] > 1 and not first["nearest_is_source"]


def test_a_missing_source_is_reported_by_pseudonym_and_the_summary_counts(sets, audited):
    tmp, p = sets
    found = audited[0]
    missing = source(tmp / "elsewhere.png")["pseudonym"]
    assert found["images"][4]["sources"] == [{"source": missing, "found_in": None,
                                             "note": "not among the training images or --sources"}]
    assert "sources" not in found["images"][5]   # a text-only image is no variation
    summary = found["summary"]["variations"]
    scores = sorted(s["similarity"] for e in found["images"] for s in e.get("sources", []) if s["found_in"])
    # 6 source entries name 5 different images (p[3] is the source of 00000 and half of 00003's mix); 5 found
    assert (summary["variations"], summary["sources"], summary["found"]) == (5, 5, 5)
    assert summary["not_found"] == [missing] and summary["copies_of_own_source"] == 3
    assert summary["median_similarity"] == scores[2] and summary["highest_similarity"] == scores[-1]
    report = (tmp / "out" / "audit.md").read_text()
    assert "## Variations and their own sources" in report and missing in report
    assert "3 of 5 variation-source pairs are flagged as copies of their own source" in report


def test_without_sources_the_held_out_case_is_reported_missing(sets):
    tmp, _ = sets
    found = run(tmp, "out-alone")
    pair, = found["images"][2]["sources"]
    assert pair["found_in"] is None and pair["source"] in found["summary"]["variations"]["not_found"]


def test_the_sheet_puts_each_source_beside_its_variation(sets, audited):
    tmp, p = sets
    sheet = Image.open(tmp / "out" / "sources.png")
    assert sheet.size == (4 * 256, 3 * 256)   # 5 found pairs, two pairs (four tiles of 256) per row
    assert f"source: {p[3]['pseudonym']}" in " ".join(audited[1])


def test_no_shared_output_names_a_source_by_its_path(sets, audited):
    """As tests/test_names.py: every output but the key, and every text drawn into a sheet, holds neither the
    patient's name nor the temporary folder's path; the key does (else this proves nothing)."""
    tmp, _ = sets
    markers = (PATIENT, str(tmp))
    files = [f for f in (tmp / "out").iterdir() if f.is_file()]
    shared = [f for f in files if ".private." not in f.name]
    assert {f.name for f in shared} >= {"audit.json", "audit.md", "sources.png", "flagged.png"}
    leaks = [(f.name, m) for f in shared for m in markers if m.encode() in f.read_bytes()]
    assert not leaks and not [w for w in audited[1] if any(m in w for m in markers)]
    assert PATIENT.encode() in (tmp / "out" / "names.private.tsv").read_bytes()


def test_a_damaged_condition_is_one_line_naming_the_manifest(sets, tmp_path, capsys):
    tmp, _ = sets
    shutil.copytree(tmp / "var", tmp_path / "var")
    record = {"file": "00000.png", "condition": [{"pseudonym": "img-0123", "sha256": "0" * 64}]}
    (tmp_path / "var" / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["--train", str(tmp / "train"), "--synthetic", str(tmp_path / "var"), "--out",
                 str(tmp_path / "out")]) == 2
    line = one_line_error(capsys)
    assert "manifest of --synthetic" in line and "00000.png" in line and "\"condition\"" in line
    assert not (tmp_path / "out" / "audit.json").exists()


def test_sources_without_variations_is_refused(sets, tmp_path, capsys):
    tmp, _ = sets
    save(tmp_path / "plain" / "00000.png", chest(600, SIZE))
    assert main(["--train", str(tmp / "train"), "--synthetic", str(tmp_path / "plain"), "--out",
                 str(tmp_path / "out"), "--sources", str(tmp / "held")]) == 2
    assert "--sources" in one_line_error(capsys) and not (tmp_path / "out" / "audit.json").exists()


def test_fail_on_flag_counts_a_copy_of_a_held_out_source(sets, tmp_path, capsys):
    """A copy of a held-out case is no training image's near-copy, so only its own-source score flags it; the gate
    must stop it as it stops a training copy (and lets it through when its source is not given: nothing to show)."""
    tmp, _ = sets
    save(tmp_path / "one" / "00000.png", chest(700, SIZE))
    record = {"file": "00000.png", "condition": [source(tmp / "held" / PATIENT / f"{PATIENT}_heldout.png")]}
    (tmp_path / "one" / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    given = ["--train", str(tmp / "train"), "--synthetic", str(tmp_path / "one"), "--fail-on-flag"]
    assert main([*given, "--out", str(tmp_path / "out"), "--sources", str(tmp / "held")]) == 3
    assert "0 of 1 synthetic images flagged" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())["summary"]
    assert summary["flagged"] == 0 and summary["variations"]["copies_of_own_source"] == 1
    assert main([*given, "--out", str(tmp_path / "out-alone")]) == 0


def test_a_volume_source_is_compared_by_its_best_slice(tmp_path):
    """generate reads one slice of a volume --condition-image and records the volume's pseudonym: the audit scores
    the variation against each of the volume's slices and reports the one compared. The variation is slice 2 as the
    audit reads it (load_set with the audit's reading: preprocess center at the variations' 128 px)."""
    for i in range(6):
        save(tmp_path / "train" / f"p{i}.png", chest(i, SIZE))
    volume = np.stack([chest(20 + k, SIZE) for k in range(4)]).astype(np.float32)   # [k, j, i]
    _write_nifti(tmp_path / "train" / f"{PATIENT}.nii.gz", volume, np.eye(3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    read = load_set(tmp_path / "train", "train", how=Reading(preprocess="center", resolution=SIZE, as_training=True))
    slices = [r for r, name in enumerate(read.names) if "#" in name]
    assert len(slices) == 4
    save(tmp_path / "var" / "00000.png", read.images[slices[2]].permute(1, 2, 0).numpy())
    record = {"file": "00000.png", "condition": [source(tmp_path / "train" / f"{PATIENT}.nii.gz")]}
    (tmp_path / "var" / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    pair, = run(tmp_path, "out")["images"][0]["sources"]
    assert pair["found_in"] == "train" and pair["compared"] == read.pseudonyms[slices[2]] != pair["source"]
    assert pair["similarity"] == 1.0 and pair["copy"] and pair["nearest_is_source"]
