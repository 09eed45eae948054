"""Volumes (NIfTI, MetaImage) as training data: medti.dataset turns each volume into one image per chosen slice, named
`<file>#<plane><index>`, all of one patient (its case folder), resampled to square pixels and scaled over the whole
volume. Every file is made here with SimpleITK or nibabel (the geometry helpers of test_volume)."""
import numpy as np
import pytest
import SimpleITK as sitk
from test_volume import _asymmetric, _stored, _write_nifti, _write_sitk

from conftest import private_key
from medti.dataset.folder import DataError, find_images, load_dataset
from medti.medical import MedicalError
from medti.training.validation import split_patients


def _cases(folder, n=2, name="t2w.mha"):
    """`n` case folders with one asymmetric volume each (5 axial slices, 0.8 x 1.1 mm pixels, 3 mm apart)."""
    canonical, spacing, origin = _asymmetric()
    for c in range(n):
        (folder / f"case{c}").mkdir(parents=True, exist_ok=True)
        write = _write_nifti if ".nii" in name else _write_sitk
        write(folder / f"case{c}" / name, canonical + c, np.eye(3), spacing, origin)
    return canonical


def test_one_image_per_slice_named_by_plane_and_index_of_one_patient(tmp_path):
    _cases(tmp_path)
    _write_nifti(tmp_path / "loose.nii.gz", *_stored(*_asymmetric(), (0, 1, 2), ()))   # directly in --data
    data = load_dataset(tmp_path, 16)
    want = [f"case{c}/t2w.mha#axial{k:03d}" for c in range(2) for k in range(5)]
    assert data.names == want + [f"loose.nii.gz#axial{k:03d}" for k in range(5)] and data.skipped == []
    assert data.patients == ["case0"] * 5 + ["case1"] * 5 + ["loose"] * 5
    assert data.images.shape == (15, 3, 16, 16)


def test_square_pixels_and_one_scale_over_the_volume(tmp_path):
    """preprocess none at the square-pixel size: the slice equals volume.square_pixels of the volume's min-max."""
    canonical, spacing, origin = _asymmetric()          # [5, 6, 7]; x 0.8, y 1.1 mm -> rows 6 * 1.1 / 0.8 = 8
    (tmp_path / "c").mkdir()
    _write_sitk(tmp_path / "c" / "t2w.mha", canonical, np.eye(3), spacing, origin)
    from medti.medical.volume import square_pixels
    with pytest.raises(DataError, match="wrong size: 7x8"):
        load_dataset(tmp_path, 8, preprocess="none", strict=True)
    scaled = (canonical - canonical.min()) * 255 / (canonical.max() - canonical.min())
    got = (load_dataset(tmp_path, 7).images[:, 0].numpy() + 1) * 127.5   # center: the top 7 of 8 rows, no resize
    for k in range(5):
        want = np.floor(square_pixels(scaled[k], 1.1, 0.8) + 0.5)
        assert want.shape == (8, 7) and np.abs(got[k] - want[:7]).max() < 1e-3, k
    # a square volume in-plane passes preprocess none: compare exactly
    square = np.random.default_rng(1).random((4, 8, 8)).astype(np.float32) * 1000
    _write_sitk(tmp_path / "c" / "t2w.mha", square, np.eye(3), (0.5, 0.5, 3.0), (0, 0, 0))
    data = load_dataset(tmp_path, 8, preprocess="none")
    scaled = (square.astype(np.float64) - square.min()) * 255 / (square.max() - square.min())
    got = (data.images[:, 0].numpy() + 1) * 127.5
    assert np.abs(got - np.floor(scaled + 0.5)).max() < 1e-3   # one min-max over the volume, not per slice


def test_the_same_anatomy_in_another_orientation_gives_identical_images(tmp_path):
    canonical, spacing, origin = _asymmetric()
    for folder, write, name, order, flips in [("a", _write_sitk, "t2w.mha", (0, 1, 2), ()),
                                               ("b", _write_sitk, "t2w.mha", (2, 0, 1), (0, 2)),
                                               ("c", _write_nifti, "t2w.nii.gz", (1, 2, 0), (1,))]:
        (tmp_path / folder / "case").mkdir(parents=True)
        write(tmp_path / folder / "case" / name, *_stored(canonical, spacing, origin, order, flips))
    for plane in ("axial", "coronal", "sagittal"):
        a, b, c = (load_dataset(tmp_path / f, 16, plane=plane) for f in "abc")
        assert [n.split("#")[1] for n in a.names] == [n.split("#")[1] for n in c.names]
        assert a.images.equal(b.images) and a.images.equal(c.images), plane


def test_slices_forms_and_planes(tmp_path):
    _cases(tmp_path, 1)
    names = load_dataset(tmp_path, 16, slices="middle:3").names
    assert names == [f"case0/t2w.mha#axial{k:03d}" for k in (1, 2, 3)]
    assert load_dataset(tmp_path, 16, slices="0:5:2").names == [f"case0/t2w.mha#axial{k:03d}" for k in (0, 2, 4)]
    coronal = load_dataset(tmp_path, 16, plane="coronal", slices="2:4")
    assert coronal.names == ["case0/t2w.mha#coronal002", "case0/t2w.mha#coronal003"]
    assert len(load_dataset(tmp_path, 16, plane="sagittal").names) == 7


def test_window_and_a_slice_flat_under_it(tmp_path):
    """--window maps values by DICOM's LINEAR (as for CT files); a slice that the window makes one gray level (air
    at a volume's end, all below the window) is skipped alone, by its slice name, whatever the --preprocess
    (before: trained on as a black square, or skipped as "all black" under cxr only)."""
    from medti.medical.window import parse_window, voi_linear
    square = np.random.default_rng(2).random((3, 8, 8)).astype(np.float32) * 400 - 200
    square[0] = -1000                                           # air: below the window, black
    (tmp_path / "c").mkdir()
    _write_sitk(tmp_path / "c" / "ct.mha", square, np.eye(3), (0.7, 0.7, 2.0), (0, 0, 0))
    for preprocess in ("none", "cxr"):
        data = load_dataset(tmp_path, 8, preprocess=preprocess, window=parse_window("40,400"))
        assert data.names == ["c/ct.mha#axial001", "c/ct.mha#axial002"]
        assert data.skipped == [("c/ct.mha#axial000", "flat image: every pixel is 0 (--window 40,400): every value "
                                 "lies outside that window; try another --window")]
    data = load_dataset(tmp_path, 8, preprocess="none", window=parse_window("40,400"))
    got = (data.images[:, 0].numpy() + 1) * 127.5
    assert np.abs(got - np.floor(voi_linear(square[1:], parse_window("40,400")) + 0.5)).max() < 1e-3


def test_slice_mask_by_name_in_each_case_folder(tmp_path):
    canonical = _cases(tmp_path, 2)
    _, spacing, origin = _asymmetric()
    for c, keep in ((0, [1, 2]), (1, [3])):
        mask = np.zeros_like(canonical)
        mask[keep, 2, 3] = 1
        _write_sitk(tmp_path / f"case{c}" / "mask.mha", mask, np.eye(3), spacing, origin)
    data = load_dataset(tmp_path, 16, slices="mask", slice_mask="mask.mha")   # the masks are not training images
    assert data.names == ["case0/t2w.mha#axial001", "case0/t2w.mha#axial002", "case1/t2w.mha#axial003"]
    (tmp_path / "case1" / "mask.mha").unlink()
    data = load_dataset(tmp_path, 16, slices="mask", slice_mask="mask.mha")
    assert data.skipped == [("case1/t2w.mha", "no --slice-mask mask.mha in its folder")]


def test_channels_of_three_volumes_stack_onto_the_first_grid(tmp_path):
    """T2w 0.5 mm, ADC 2 mm, hbv 1 mm of one anatomy (a gradient along x): stacked on T2w's grid, the three
    channels agree (each min-max scaled over its own volume) to within the interpolation of the coarse ones."""
    case = tmp_path / "p1"
    case.mkdir()
    for name, n, step in (("t2w.mha", 32, 0.5), ("adc.nii.gz", 8, 2.0), ("hbv.mha", 16, 1.0)):
        x = (np.arange(n) + 0.5) * step                         # voxel centres in mm over one 16 mm field
        array = np.broadcast_to(x, (3, n, n)).astype(np.float32)
        write = _write_nifti if ".nii" in name else _write_sitk
        write(case / name, array, np.eye(3), (step, step, 3.0), (step / 2, step / 2, 0.0))
    data = load_dataset(tmp_path, 32, preprocess="none", channels=["t2w", "adc", "hbv"])
    assert data.names == [f"p1#axial{k:03d}" for k in range(3)] and data.patients == ["p1"] * 3
    rgb = (data.images[1].numpy() + 1) * 127.5                  # [3, 32, 32]
    middle = slice(4, 28)                                       # away from the coarse grids' edge clamping
    assert np.abs(rgb[0, :, middle] - rgb[1, :, middle]).max() < 20
    assert np.abs(rgb[0, :, middle] - rgb[2, :, middle]).max() < 12
    assert not np.array_equal(rgb[0], rgb[1])                   # three sequences, not one replicated


def test_split_patients_never_splits_a_volume(tmp_path):
    _cases(tmp_path, 4)
    data = load_dataset(tmp_path, 16)
    for seed in range(10):
        train, val = split_patients(data.patients, 0.5, seed)
        assert {data.patients[i] for i in train}.isdisjoint({data.patients[i] for i in val})
        assert len(val) == 10                                   # 2 whole cases of 5 slices


def test_find_images_lists_volumes_not_their_raw_data(tmp_path):
    canonical, spacing, origin = _asymmetric()
    _write_sitk(tmp_path / "a.mhd", canonical, np.eye(3), spacing, origin)     # writes a.raw next to it
    _write_nifti(tmp_path / "b.NII.GZ", canonical, np.eye(3), spacing, origin)
    assert (tmp_path / "a.raw").exists()
    assert [p.name for p in find_images(tmp_path)] == ["a.mhd", "b.NII.GZ"]
    data = load_dataset(tmp_path, 16)
    assert len(data.names) == 10 and data.patients[:5] == ["a"] * 5 and data.patients[5:] == ["b"] * 5
    before = data.fingerprint
    (tmp_path / "a.raw").write_bytes(bytes(len((tmp_path / "a.raw").read_bytes())))  # the pixels change
    assert load_dataset(tmp_path, 16).fingerprint != before      # the .raw data file is fingerprinted too


def test_bad_input_is_one_line(tmp_path):
    _cases(tmp_path, 1)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 5, 6), np.float32)), str(tmp_path / "case0" / "dwi.mha"))
    data = load_dataset(tmp_path, 16)
    assert len(data.names) == 5 and data.skipped[0][0] == "case0/dwi.mha" and "4-D" in data.skipped[0][1]
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path, 16, strict=True)
    assert "dwi.mha" in str(e.value) and "4-D" in str(e.value) and "\n" not in str(e.value)
    for kwargs, words in (({"slices": "middle:0"}, "--slices"), ({"plane": "oblique"}, "--plane"),
                          ({"slices": "mask"}, "--slice-mask"), ({"slice_mask": "no/such.mha"}, "--slice-mask")):
        with pytest.raises(MedicalError) as e:
            load_dataset(tmp_path, 16, **kwargs)
        assert words in str(e.value) and "\n" not in str(e.value)


def _train_args(tmp_path, *extra):
    from medti.training.demo import tiny_model
    model, config = tiny_model(tmp_path / "model", seed=0)
    return ["--model", str(model), "--config", str(config), "--data", str(tmp_path / "data"), "--token", "<t2w>",
            "--vectors", "2", "--max-steps", "2", "--resolution", "64", "--preview-every", "0", "--save-every", "2",
            "--val-draws", "2", "--out", str(tmp_path / "run"), *extra]


def test_train_on_volumes_holds_out_whole_cases(tmp_path, capsys):
    from medti.train import main
    _cases(tmp_path / "data", 2)
    assert main(_train_args(tmp_path, "--val-fraction", "0.5")) == 0
    assert "--data: 10 image(s): 10 slice(s) of 2 volume(s) or series; 2 patient(s)" in capsys.readouterr().out
    held = [private_key(tmp_path / "run")[name] for name in (tmp_path / "run" / "val.txt").read_text().split()]
    assert len(held) == 5 and len({name.split("/")[0] for name in held}) == 1 and all("#axial" in n for n in held)


@pytest.mark.parametrize("flags, words", [(["--slices", "middle:0"], "--slices"), (["--plane", "oblique"], "--plane"),
                                          (["--slices", "mask"], "--slice-mask")])
def test_bad_volume_flags_are_one_line_before_anything_loads(tmp_path, capsys, flags, words):
    from medti.train import main
    (tmp_path / "data").mkdir()
    assert main(["--data", str(tmp_path / "data"), "--token", "<x>", *flags, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --") and words in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_the_pi_cai_layout_trains_by_patient(tmp_path):
    """PI-CAI (the study's prostate set): images/<patient>/<patient>_<study>_{t2w,adc,hbv}.mha, T2W at 0.5 mm and
    ADC/HBV at 2 mm. `--channels t2w,adc,hbv` groups each study's three sequences; a patient's two studies are one
    patient, so --val-fraction never puts them on both sides."""
    rng = np.random.default_rng(0)
    for patient, studies in (("10000", ("1000000", "1000001")), ("10001", ("1000002",)), ("10002", ("1000003",))):
        for study in studies:
            for channel, spacing, side in (("t2w", (0.5, 0.5, 3.0), 32), ("adc", (2.0, 2.0, 3.0), 8),
                                           ("hbv", (2.0, 2.0, 3.0), 8)):
                volume = sitk.GetImageFromArray(rng.random((3, side, side)).astype(np.float32))
                volume.SetSpacing(spacing)
                (tmp_path / patient).mkdir(exist_ok=True)
                sitk.WriteImage(volume, str(tmp_path / patient / f"{patient}_{study}_{channel}.mha"))
    data = load_dataset(tmp_path, 32, channels=["t2w", "adc", "hbv"])
    assert len(data.names) == 4 * 3 and data.skipped == []
    assert data.names[0] == "10000/10000_1000000#axial000" and set(data.patients) == {"10000", "10001", "10002"}
    for seed in range(10):
        train, val = split_patients(data.patients, 0.34, seed)
        assert not {data.patients[i] for i in train} & {data.patients[i] for i in val}
