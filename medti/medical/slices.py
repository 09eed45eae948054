"""3-D volumes (NIfTI, MetaImage, NRRD) as training images: each chosen slice of a volume (or of a case's sequences,
stacked as R, G, B) becomes one 8-bit image with square pixels, named `<file>#<plane><index>` (`case1/t2w.mha#axial012`)
so the skip list and the private keys name the slice (shared files give it after the volume's
pseudonym). medti.dataset calls this for every volume file it finds.

Intensities: the --window if given (LINEAR, as for DICOM), else min-max over the whole VOLUME, never per slice: the
slices of one scan keep one scale, so an organ that is dark in one slice is not stretched to white in the next (MR
values have no absolute unit, but within one series they are comparable; a per-slice rescale would destroy that).

--slice-mask, three forms, in this order: a FOLDER holds one mask per volume, named after it -- the volume file's stem
(the Medical Segmentation Decathlon's labelsTr/prostate_00.nii.gz for imagesTr/prostate_00.nii.gz), a case's name
(PI-CAI's whole-gland masks, anatomical_delineations/whole_gland/AI/10000_1000000.nii.gz, for the case
10000/10000_1000000) or a DICOM series' name -- with any volume suffix; a bare file name (no "/") is looked up in each
volume's own folder (`case1/mask.nii.gz` for `case1/t2w.mha`); a path (with a "/") is one mask file for every volume.
Mask files (that name, or anything in that folder) are never training images. A volume without its mask is skipped
with the reason. DICOM series and multi-frame files (medti.medical.dicom_series) are volumes like the others, scaled by
--window, else their own window: one for a whole series of files (theirs, or their median where they differ:
window.series_window), a multi-frame file's first frame's (or each frame's own where they differ,
dicom_series.by_frame), else min-max over the whole series.
"""
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import MedicalError
from .dicom import Patient
from .dicom_series import DicomVolume
from .volume import (
    PLANES,
    SUFFIXES,
    SliceSpec,
    case_slices,
    element_data_file,
    parse_slices,
    plane_spacing,
    read_volume,
    resample_onto,
    square_pixels,
)
from .volume import slices as volume_slices
from .window import Window, described, display_scale


def is_volume(path) -> bool:
    """A DICOM volume, or a volume file by its name (`.nii.gz` has two suffixes; a `.mhd` header's `.raw`/`.zraw`
    data is not one)."""
    return isinstance(path, DicomVolume) or Path(path).name.lower().endswith(SUFFIXES)


def stem(path) -> str:
    """The file name without its volume suffix: `t2w.nii.gz` -> `t2w`."""
    name = Path(path).name
    return next((name[: -len(s)] for s in SUFFIXES if name.lower().endswith(s)), Path(path).stem)


@dataclass(frozen=True)
class SliceOptions:
    """--plane, --slices, --slice-mask and --window, checked once (check_options) before any file is read."""
    plane: str = "axial"
    spec: SliceSpec = SliceSpec("all")
    mask: str = ""                 # --slice-mask: a folder, a file name in each volume's folder, or a path (see above)
    window: Window | None = None

    def is_mask(self, path: Path) -> bool:
        """A file that is some volume's mask (a bare --slice-mask name, or in the --slice-mask folder): not a
        training image."""
        if not self.mask:
            return False
        if Path(self.mask).is_dir():
            return Path(path).resolve().is_relative_to(Path(self.mask).resolve())
        return "/" not in self.mask and Path(path).name == self.mask


def check_options(plane: str = "axial", slices: str = "all", slice_mask: str = "", window=None) -> SliceOptions:
    """SliceOptions from the flags' text, or one MedicalError line naming the flag."""
    if plane not in PLANES:
        raise MedicalError(f"--plane {plane!r}: expected one of {', '.join(PLANES)}")
    spec = parse_slices(slices, "--slices")
    if spec.kind == "mask" and not slice_mask:
        raise MedicalError("--slices mask: needs --slice-mask: a folder of masks named after each volume or case, a "
                           "mask file name found in each volume's folder, or one mask file's path")
    if "/" in slice_mask and not Path(slice_mask).exists():
        raise MedicalError(f"--slice-mask {slice_mask}: no such file or folder (a name without '/' is looked up in "
                           "each volume's folder)")
    return SliceOptions(plane, spec, slice_mask, window)


def _mask_for(path: Path, key: str, options: SliceOptions):
    """The mask Volume for the volume at `path` named `key` (its stem, case or series name), None without
    --slice-mask; the three forms of the module's docstring."""
    if not options.mask:
        return None
    given = Path(options.mask)
    if given.is_dir():
        found = [given / f"{key}{suffix}" for suffix in SUFFIXES if (given / f"{key}{suffix}").is_file()]
        if not found:
            raise MedicalError(f"no mask {key}{{{','.join(SUFFIXES)}}} in --slice-mask {options.mask}")
        return read_volume(found[0])
    mask = given if "/" in options.mask else path.parent / options.mask
    if not mask.is_file():
        raise MedicalError(f"no --slice-mask {options.mask} in its folder")
    return read_volume(mask)


def _scaled(volume, window: Window | None, photometric: str = "MONOCHROME2"):
    """The volume's values on the 0..255 display scale (float, rounded only after resampling to square pixels):
    the window, else min-max over the whole volume (see the module's docstring); MONOCHROME1 inverted."""
    return replace(volume, array=display_scale(volume.array, window, photometric).astype(np.float32))


def _to_image(array: np.ndarray, spacing) -> Image.Image:
    """[H, W] or [H, W, 3] on the 0..255 scale -> an 8-bit L or RGB image with square pixels."""
    planes = [square_pixels(array[..., c], *spacing) for c in range(array.shape[-1])] if array.ndim == 3 \
        else [square_pixels(array, *spacing)]
    pixels = np.floor(np.clip(np.stack(planes, -1), 0, 255) + 0.5).astype(np.uint8)   # round half up
    return Image.fromarray(pixels[..., 0]) if len(planes) == 1 else Image.fromarray(pixels, "RGB")


def _named(name: str, options: SliceOptions, chosen, total: int, window: str) -> list[tuple[str, Image.Image]]:
    """[(`name#planeNNN`, image)], each image saying in info["window"] which window scaled it (data.jsonl)."""
    if not chosen:
        mask = f" and --slice-mask {options.mask} (empty on those slices?)" if options.mask else ""
        raise MedicalError(f"no slice chosen by --slices {options.spec.text}{mask} of the {total} {options.plane} "
                           "slices")
    for _, image in chosen:
        image.info["window"] = window
    return [(f"{name}#{options.plane}{index:03d}", image) for index, image in chosen]


def volume_images(path: Path, name: str, options: SliceOptions) -> list[tuple[str, Image.Image]]:
    """[(`name#planeNNN`, 8-bit L image)] of one volume file; a MedicalError (one line) when it is unusable."""
    return _sliced(_scaled(read_volume(path), options.window), name, options, _mask_for(path, stem(path), options),
                   described(options.window, None, "min-max over the volume"))


def _sliced(volume, name: str, options: SliceOptions, mask, window: str) -> list[tuple[str, Image.Image]]:
    spacing = plane_spacing(volume, options.plane)
    chosen = volume_slices(volume, options.plane, options.spec, mask)
    total = volume.array.shape[PLANES[options.plane]]
    return _named(name, options, [(k, _to_image(s, spacing)) for k, s in chosen], total, window)


def dicom_images(source: DicomVolume, name: str, options: SliceOptions) -> tuple[list, Patient]:
    """([(`name#planeNNN`, 8-bit L image)], its Patient) of a DICOM series or multi-frame file."""
    volume, first, own = source.read(name, window=options.window)
    volume = _scaled(volume, options.window or own, first.photometric)
    mask = _mask_for(Path(source.paths[0]), name.rpartition("/")[2], options)
    window = described(options.window, own, "min-max over the series")
    return _sliced(volume, name, options, mask, window), first.patient


def _read_source(source, case: str, window: Window | None):
    """(Volume, its own window, photometric interpretation, Patient) of a volume file or a DICOM volume."""
    if isinstance(source, DicomVolume):
        volume, first, own = source.read(str(source.paths[0]), case, window)
        return volume, own, first.photometric, first.patient
    return read_volume(source, case), None, "MONOCHROME2", None


def case_images(sources: list, case: str, options: SliceOptions) -> tuple[list, Patient | None]:
    """([(`case#planeNNN`, RGB image)], the first sequence's Patient, None for a volume file): a case's sequence
    volumes (files or DICOM series) on the first one's grid (resample_onto, as read_case), each scaled over its own
    volume (sequences have unrelated units) by --window, else its own window, else min-max; slices stacked in
    `sources` order; one volume: gray."""
    read = [_read_source(s, case, options.window) for s in sources]
    reference = read[0][0]
    volumes = [reference] + [resample_onto(v, reference) for v, *_ in read[1:]]
    volumes = [_scaled(v, options.window or own, photometric)
               for v, (_, own, photometric, _) in zip(volumes, read, strict=True)]
    spacing = plane_spacing(volumes[0], options.plane)
    mask = _mask_for(data_files(sources[0])[0], case.rpartition("/")[2], options)
    chosen = case_slices(volumes, options.plane, options.spec, mask)
    rgb = [(k, s if s.shape[-1] == 3 else np.repeat(s, 3, -1)) for k, s in chosen]
    total = volumes[0].array.shape[PLANES[options.plane]]
    window = "; ".join(described(options.window, own, "min-max over the volume") for _, own, _, _ in read)
    return _named(case, options, [(k, _to_image(s, spacing)) for k, s in rgb], total, window), read[0][3]


def item(name: str, source, channels: list | None, options: SliceOptions):
    """(images [(name, Image)], patient, files read) of one volume file (`source` a Path) or one case of volume
    sequences (`source` {channel: Path}), else None (not volumes: medti.dataset reads it). The patient is the case:
    the file's folder relative to --data (`name`'s parent), or its stem for a file directly in --data; with
    channels, the case's folder too (PI-CAI: images/10000/10000_1000000_t2w.mha is patient 10000, whose second
    study 10000_1000001 must land on the same side), else the case name. So no patient's slices are on both sides
    of --val-fraction's split. A DICOM volume's patient is its header's Patient (medti.medical.dicom) with its folder,
    as a volume file's, for `fallback`: medti.dataset.patients decides which keys it."""
    if isinstance(source, DicomVolume):
        images, patient = dicom_images(source, name, options)
        return images, replace(patient, fallback=name.rpartition("/")[0] or name), list(source.paths)
    if channels:
        if not (set(channels) <= set(source) and all(is_volume(p) for p in source.values())):
            if any(is_volume(p) for p in source.values()) and set(channels) <= set(source):
                raise MedicalError("channels mix volumes and 2-D images; give every sequence as a volume")
            return None
        sources = [source[c] for c in channels]
        images, patient = case_images(sources, name, options)
        fallback = name.rpartition("/")[0] or name
        return images, replace(patient, fallback=fallback) if patient else fallback, \
            [f for p in sources for f in data_files(p)]
    if not is_volume(source):
        return None
    patient = name.rpartition("/")[0] or stem(source)
    return volume_images(source, name, options), patient, data_files(source)


def data_files(path) -> list[Path]:
    """The files a volume's pixels come from, for the data fingerprint: a DICOM volume's files; the file, and a
    `.mhd` header's ElementDataFile (`.raw`/`.zraw`) when it is one file in the same folder."""
    if isinstance(path, DicomVolume):
        return list(path.paths)
    extra = element_data_file(path)
    return [path, extra] if extra is not None and extra.is_file() else [path]
