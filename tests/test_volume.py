"""medti.medical.volume: one orientation whatever the file's axis order, the radiological display convention,
sequences meeting in physical space, the --slices forms, and one-line refusals. Every file is made here: the
geometry is computed by hand (numpy), written with SimpleITK (.mha/.nrrd) or nibabel (NIfTI, RAS+ affine), so
the reader's LPS reorientation is checked against an independent statement of where each voxel is."""
import sys

import nibabel as nib  # the test extra pins both: never skipped
import numpy as np
import pytest
import SimpleITK as sitk

from medti.medical import MedicalError  # noqa: E402
from medti.medical.volume import (
    case_slices,
    parse_slices,
    read_case,
    read_volume,
    resample_onto,
    slices,
    square_pixels,
    stack_channels,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])   # nibabel's world is RAS+: x and y negated


def _stored(canonical, spacing, origin, order, flips):
    """The same anatomy in another storage: numpy axes permuted by `order` and flipped on `flips`, with the
    direction, spacing and origin (SimpleITK's x, y, z order) that keep each voxel at its physical point.
    `canonical` is [k, j, i] over LPS axes (z, y, x) with identity direction; `spacing`, `origin` are (x, y, z)."""
    stored = np.flip(np.transpose(canonical, order), flips)
    direction, spacing_out, origin_out = np.zeros((3, 3)), [], np.array(origin, float)
    for d in range(3):                     # SimpleITK axis d is numpy axis 2 - d
        n = 2 - d
        physical = 2 - order[n]            # canonical numpy axis c is physical axis 2 - c
        sign = -1.0 if n in flips else 1.0
        direction[physical, d] = sign
        spacing_out.append(spacing[physical])
        if n in flips:                     # index 0 now sits at the far end of that physical axis
            origin_out[physical] += (canonical.shape[order[n]] - 1) * spacing[physical]
    return stored, direction, spacing_out, origin_out


def _write_sitk(path, array, direction, spacing, origin):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, np.float32))
    image.SetDirection(tuple(direction.ravel()))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    sitk.WriteImage(image, str(path))
    return path


def _write_nifti(path, array, direction, spacing, origin, qform_only=False):
    """nibabel's voxel array is indexed [x, y, z] (SimpleITK's order, numpy's reversed); its affine maps to RAS+.
    nibabel stores the affine as the sform (code 2); `qform_only` stores it as the qform alone, as some scanners'
    converters do, so both header fields are read."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, float)
    image = nib.Nifti1Image(np.ascontiguousarray(np.asarray(array, np.float32).T), affine)
    if qform_only:
        image.set_qform(affine, code=1)
        image.set_sform(np.eye(4), code=0)    # a wrong matrix, marked unused: reading it would fail the test
    nib.save(image, str(path))
    return path


def _write_nifti_qform(path, *geometry):
    return _write_nifti(path, *geometry, qform_only=True)


def _asymmetric():
    rng = np.random.default_rng(0)
    return rng.random((5, 6, 7)).astype(np.float32), (0.8, 1.1, 3.0), (10.0, -20.0, 30.0)   # [k, j, i]; x, y, z


def test_the_same_anatomy_in_any_storage_gives_identical_slices(tmp_path):
    canonical, spacing, origin = _asymmetric()
    reference = read_volume(_write_sitk(tmp_path / "ref.mha", canonical, np.eye(3), spacing, origin))
    np.testing.assert_array_equal(reference.array, canonical)
    variants = [(_write_sitk, "a.mha", (2, 0, 1), (0, 2)), (_write_nifti, "b.nii.gz", (1, 2, 0), (1,)),
                (_write_sitk, "c.nrrd", (0, 2, 1), (0, 1, 2)), (_write_nifti_qform, "d.nii", (2, 1, 0), (0, 1)),
                (_write_sitk, "e.mhd", (1, 0, 2), (2,))]                 # .mhd: header with a separate .raw
    for write, name, order, flips in variants:
        stored = _stored(canonical, spacing, origin, order, flips)
        assert stored[0].shape != canonical.shape or flips, "each variant changes the storage"
        volume = read_volume(write(tmp_path / name, *stored), case="case001")
        assert volume.case == "case001" and volume.array.dtype == np.float32
        np.testing.assert_allclose(volume.spacing, spacing[::-1], atol=1e-5)
        for plane in ("axial", "coronal", "sagittal"):
            got, want = slices(volume, plane), slices(reference, plane)
            assert [k for k, _ in got] == [k for k, _ in want]
            for (_, a), (_, b) in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {plane}")


def test_an_oblique_acquisition_keeps_its_plane(tmp_path):
    """Tilted 20° about z, stored in two axis orders: the same array either way (axes permuted and flipped to the
    closest LPS order, never interpolated)."""
    canonical, spacing, origin = _asymmetric()
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    tilt = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    stored, direction, spacing_out, origin_out = _stored(canonical, spacing, (0, 0, 0), (1, 0, 2), (0, 2))
    volumes = [read_volume(_write_sitk(tmp_path / "plain.mha", canonical, tilt, spacing, origin)),
               read_volume(_write_nifti(tmp_path / "tilted.nii.gz", stored, tilt @ direction, spacing_out,
                                        tilt @ origin_out + origin))]
    for volume in volumes:
        np.testing.assert_allclose(volume.array, canonical, atol=1e-6)
        np.testing.assert_allclose(np.reshape(volume.image.GetDirection(), (3, 3)), tilt, atol=1e-5)


def test_radiological_display_orientation(tmp_path):
    """A marker in the patient's right-anterior-superior corner, placed in nibabel's RAS+ terms (largest x = most
    right, largest y = most anterior, largest z = most superior), shows at the top-left of its axial, coronal and
    sagittal slice: anterior/superior at the top, the patient's right on the image's left (axial, coronal),
    anterior on the left (sagittal)."""
    data = np.zeros((7, 6, 5), np.float32)    # nibabel [x, y, z], identity affine: axes R, A, S
    data[-1, -1, -1] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "ras.nii.gz"))
    volume = read_volume(tmp_path / "ras.nii.gz")
    for plane in ("axial", "coronal", "sagittal"):
        marked = [(k, s) for k, s in slices(volume, plane) if s.any()]
        assert len(marked) == 1 and marked[0][1][0, 0] == 1 and marked[0][1].sum() == 1, plane
    assert [s.shape for _, s in slices(volume, "coronal")][0] == (5, 7)    # rows S→I, columns R→L


def _sphere(shape_xyz, spacing, origin, centre, radius=6.0, edge=2.0):
    """A soft-edged ball (1 inside, 0 outside, a linear ramp `edge` mm wide) sampled at each voxel's physical
    point; [k, j, i] with identity direction."""
    axes = [origin[a] + spacing[a] * np.arange(shape_xyz[a]) for a in range(3)]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    return np.clip((radius - distance) / edge + 0.5, 0, 1).astype(np.float32)


def test_a_lesion_lands_on_the_same_pixel_in_all_channels(tmp_path):
    """Three sequences of one session, each with its own spacing, origin and storage, resampled onto the first.
    The centroid of the ball's disc in the stacked slice must be within 1 reference pixel (0.5 mm) of the true
    centre in every channel. Why 1 pixel is the right bound: sampling a smooth symmetric bump wider than the voxel
    and interpolating it linearly keeps its centroid to a small fraction of the coarsest voxel (2 mm here; under
    0.1 pixel measured), while a physical-space mistake moves it by at least 1 mm = 2 pixels (half an ADC voxel for an
    origin at the corner instead of the centre, several mm for a flipped or swapped axis)."""
    centre = (1.3, -2.7, 0.9)                                    # LPS mm
    grids = [("t2w.mha", (80, 80, 12), (0.5, 0.5, 3.0), (-20.0, -20.0, -18.0), (0, 1, 2), ()),
             ("adc.nii.gz", (24, 24, 14), (2.0, 2.0, 3.0), (-23.0, -21.5, -20.5), (0, 1, 2), (1, 2)),
             ("hbv.nrrd", (44, 44, 10), (1.0, 1.0, 4.0), (-22.0, -22.5, -19.0), (2, 0, 1), (0,))]
    paths = []
    for name, shape, spacing, origin, order, flips in grids:
        stored = _stored(_sphere(shape, spacing, origin, centre), spacing, origin, order, flips)
        paths.append((_write_nifti if name.endswith(".nii.gz") else _write_sitk)(tmp_path / name, *stored))
    volumes = read_case(paths, case="case7")
    k = round((centre[2] - -18.0) / 3.0)                         # the reference slice through the centre
    [(index, stacked)] = case_slices(volumes, "axial", f"{k}:{k + 1}")
    assert index == k and stacked.shape == (80, 80, 3) and stacked.dtype == np.float32
    want = np.array([(centre[1] - -20.0) / 0.5, (centre[0] - -20.0) / 0.5])    # (row = y, column = x) pixels
    rows, cols = np.mgrid[:80, :80]
    for channel in range(3):
        disc = stacked[..., channel]
        centroid = np.array([(disc * rows).sum(), (disc * cols).sum()]) / disc.sum()
        assert np.abs(centroid - want).max() < 1.0, (grids[channel][0], centroid, want)


def _volume(tmp_path, name, array, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    return read_volume(_write_sitk(tmp_path / name, array, np.eye(3), spacing, origin))


def test_slice_spec_forms_and_mask(tmp_path):
    image = _volume(tmp_path, "image.mha", np.arange(10 * 4 * 3, dtype=np.float32).reshape(10, 4, 3))
    mask_array = np.zeros((10, 4, 3), np.float32)
    mask_array[4:6, 1, 2] = 1
    mask = _volume(tmp_path, "mask.nrrd", mask_array)
    picked = {spec: [k for k, _ in slices(image, "axial", spec, **kw)] for spec, kw in
              [("all", {}), ("2:8:2", {}), ("-3:", {}), (":2", {}), ("middle:3", {}), ("middle:40", {}),
               ("mask", {"mask": mask}), ("0:5", {"mask": mask})]}
    assert picked == {"all": list(range(10)), "2:8:2": [2, 4, 6], "-3:": [7, 8, 9], ":2": [0, 1],
                      "middle:3": [3, 4, 5], "middle:40": list(range(10)), "mask": [4, 5], "0:5": [4]}
    assert [k for k, _ in slices(image, "coronal", "mask", mask)] == [1]
    assert [k for k, _ in slices(image, "sagittal", parse_slices("MASK"), mask)] == [2]
    np.testing.assert_array_equal(slices(image, "axial", "3:4")[0][1], image.array[3])
    labels = resample_onto(mask, image, label=True)              # same grid: nearest neighbour is the identity
    np.testing.assert_array_equal(labels.array, mask_array)


def test_square_pixels_is_linear_and_keeps_the_extent():
    ramp = np.repeat(np.arange(4, dtype=np.float32)[:, None], 6, axis=1)   # value = row index, 3 mm rows
    out = square_pixels(ramp, 3.0, 1.0)
    assert out.shape == (12, 6) and out.dtype == np.float32
    centres = np.clip((np.arange(12) + 0.5) / 3 - 0.5, 0, 3)   # new pixel centres in old rows, edges aligned
    np.testing.assert_allclose(out[:, 0], centres, atol=1e-6)
    assert square_pixels(ramp, 0.7, 0.7).shape == (4, 6)
    assert square_pixels(ramp.T, 1.0, 3.0).shape == (6, 12)


def test_a_2d_file_is_one_slice(tmp_path):
    image = sitk.GetImageFromArray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    sitk.WriteImage(image, str(tmp_path / "flat.mha"))
    volume = read_volume(tmp_path / "flat.mha")
    assert volume.array.shape == (1, 3, 4)
    np.testing.assert_array_equal(slices(volume)[0][1], np.arange(12).reshape(3, 4))
    data = np.zeros((4, 3), np.float32)      # a 2-D NIfTI, nibabel [x, y] on R, A: the marker is right-anterior
    data[-1, -1] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "flat.nii.gz"))
    [(_, axial)] = slices(read_volume(tmp_path / "flat.nii.gz"))
    assert axial.shape == (3, 4) and axial[0, 0] == 1 and axial.sum() == 1


def test_without_the_extra_one_line_names_it(tmp_path, monkeypatch):
    path = _write_sitk(tmp_path / "t2w.mha", np.zeros((2, 3, 4)), np.eye(3), (1, 1, 1), (0, 0, 0))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)    # `import SimpleITK` now raises ImportError
    with pytest.raises(MedicalError) as e:
        read_volume(path)
    _one_line(e, "t2w.mha", "SimpleITK", 'pip install "medti[medical]"')


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_refusals_are_one_line(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), str(tmp_path / "dwi4d.nii.gz"))
    with pytest.raises(MedicalError) as e:
        read_volume(tmp_path / "dwi4d.nii.gz")
    _one_line(e, "dwi4d.nii.gz", "4-D", "(4, 5, 6, 3)")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 2), np.float32), isVector=True), str(tmp_path / "v.mha"))
    with pytest.raises(MedicalError) as e:                     # 2 values per voxel (a vector image): refused too
        read_volume(tmp_path / "v.mha")
    _one_line(e, "v.mha", "4-D", "(6, 5, 4, 2)")
    image = _volume(tmp_path, "image.mha", np.zeros((10, 4, 3), np.float32))
    other_grids = [("coarse.mha", (1.0, 1.0, 3.0), (0, 0, 0)), ("moved.mha", (1.0, 1.0, 2.0), (0, 5, 0))]
    for name, spacing, origin in other_grids:
        mask = _volume(tmp_path, name, np.ones((10, 4, 3), np.float32), spacing, origin)
        with pytest.raises(MedicalError) as e:
            slices(image, "axial", "mask", mask)
        _one_line(e, name, "not on the grid", "spacing" if name == "coarse.mha" else "origin")
    for bad in ("middle:0", "1:5:0", "some", "1-5", "middle", "1:2:3:4", ""):
        with pytest.raises(MedicalError) as e:
            parse_slices(bad)
        _one_line(e, "--slices", "middle:N", "START:STOP[:STEP]")
    with pytest.raises(MedicalError) as e:
        slices(image, "axial", "mask")
    _one_line(e, "--slices mask", "mask")
    with pytest.raises(MedicalError) as e:
        slices(image, "oblique")
    _one_line(e, "oblique", "axial")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.mha").write_text("not a header")
    for name, words in [("notes.txt", ("notes.txt", ".nii.gz")), ("gone.nii", ("gone.nii", "no such file")),
                        ("broken.mha", ("broken.mha", "not readable"))]:
        with pytest.raises(MedicalError) as e:
            read_volume(tmp_path / name)
        _one_line(e, *words)
    with pytest.raises(MedicalError) as e:
        stack_channels([np.zeros((3, 4)), np.zeros((3, 5))])
    _one_line(e, "one shape", "resample_onto")


def test_a_header_without_its_data_file_is_one_line_and_nothing_else(tmp_path, capfd):
    """A .mhd whose data file is missing: before, ITK printed "MetaImage: Read: Cannot open data file" (from C++,
    on file descriptor 2) before medti's own line. Now the file is looked for first, and the one line names it."""
    (tmp_path / "scan.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
                                       "ElementDataFile = scan.raw\n")
    capfd.readouterr()
    with pytest.raises(MedicalError) as e:
        read_volume(tmp_path / "scan.mhd")
    _one_line(e, "scan.mhd", "(ElementDataFile) scan.raw is missing")
    assert capfd.readouterr().err == ""
