"""The inputs of tools/hostile_rerun.py's hostile cases: good files to run the commands on (a tiny random model, phantom
images, an embedding and a LoRA file trained for one step, random Inception weights) and damaged files with every
extension the commands read (deterministic: the same bytes on every run, numpy's generator with fixed seeds); and
the real medical files installed with the test dependencies (real_files), for its part (a).

    python tools/hostile_files.py model DIR        # the tiny random model (medti.training.demo.tiny_model)
    python tools/hostile_files.py inception FILE   # Inception weights in torch-fidelity's layout, random values

Both run in a child of the harness (torch work in the harness's own process would make its later forks unsafe)."""
import gzip
import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

BAD_NAME = b"\xff\xfe-scan"   # not UTF-8: how a file name from another system's encoding arrives


def rng_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def png_bytes(size=(64, 64), seed: int = 0) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb() -> bytes:
    """A valid PNG header claiming 100,000 x 100,000 gray pixels (10 GB decoded) with a tiny compressed body."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 100_001 * 4)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def dicom_bytes(**fields) -> bytes:
    """A small CT slice with pydicom (invented values); `fields` override or add attributes."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(entropy_srcs=["hostile"])
    ds.PatientID, ds.Modality, ds.Rows, ds.Columns = "PHANTOM", "CT", 32, 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(1).integers(0, 3000, (32, 32), dtype=np.uint16).tobytes()
    for keyword, value in fields.items():
        if isinstance(value, bytes):   # the text as a file may hold it, valid or not: pydicom would refuse to set it
            tag = tag_for_keyword(keyword)
            value += b" " * (len(value) % 2)   # DICOM values have even length (PS3.5 7.1.1)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def nifti_bytes(values: np.ndarray) -> bytes:
    import nibabel
    return nibabel.Nifti1Image(values, np.eye(4)).to_bytes()


def safetensors_header(header: bytes, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, then the JSON header (no tensor data)."""
    return struct.pack("<Q", len(header) if length is None else length) + header


def damaged() -> dict:
    """{file name: bytes}: damaged or misleading files, one per kind the commands read."""
    good_png, good_dcm = png_bytes(), dicom_bytes()
    volume = nifti_bytes(np.random.default_rng(2).random((4, 8, 8)).astype(np.float32))
    return {
        "truncated.png": good_png[: len(good_png) // 2], "random.png": rng_bytes(3000), "empty.png": b"",
        "text.png": b"not an image\n", "bomb.png": png_bomb(), "flat.png": png_bytes((1, 1)),
        "truncated.jpg": b"\xff\xd8\xff\xe0" + rng_bytes(200, 1), "random.tif": b"II*\x00" + rng_bytes(500, 2),
        "random.bmp": b"BM" + rng_bytes(500, 3),
        "truncated.dcm": good_dcm[: len(good_dcm) // 2], "header-only.dcm": good_dcm[:300],
        "random-dicm": bytes(128) + b"DICM" + rng_bytes(400, 4),
        "pixels-short.dcm": dicom_bytes(PixelData=bytes(100)),
        "rows-zero.dcm": dicom_bytes(Rows=0, PixelData=b""),
        "huge-rows.dcm": dicom_bytes(Rows=65535, Columns=65535),
        "rescale-nan.dcm": dicom_bytes(RescaleSlope=b"nan", RescaleIntercept=b"0"),
        "window-zero.dcm": dicom_bytes(WindowCenter=b"40", WindowWidth=b"0"),
        "rgb.dcm": dicom_bytes(SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                               BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=rng_bytes(32 * 32 * 3, 5)),
        "frames-text.dcm": dicom_bytes(NumberOfFrames=b"1A"),
        "orientation-one-value.dcm": dicom_bytes(ImageOrientationPatient=b"1"),
        "truncated.nii": volume[: len(volume) // 2], "random.nii.gz": rng_bytes(2000, 6),
        "truncated.nii.gz": gzip.compress(volume, mtime=0)[:300],
        "nan.nii.gz": gzip.compress(nifti_bytes(np.full((4, 8, 8), np.nan, np.float32)), mtime=0),
        "4d.nii.gz": gzip.compress(nifti_bytes(np.ones((4, 8, 8, 3), np.float32)), mtime=0),
        "random.mha": rng_bytes(2000, 7),
        "huge.mha": b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_FLOAT\n"
                    b"ElementDataFile = LOCAL\n" + bytes(64),
        "missing-raw.mhd": b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
                           b"ElementDataFile = nowhere.raw\n",
        "random.nrrd": b"NRRD0004\n" + rng_bytes(300, 8),
    }


def weights_files() -> dict:
    """{file name: bytes}: damaged model, embedding, LoRA, statistics and config files."""
    npz = io.BytesIO()
    np.savez(npz, a=np.arange(3))
    return {
        "random.safetensors": rng_bytes(3000, 9), "empty.safetensors": b"",
        "huge-header.safetensors": safetensors_header(b"{}", 2 ** 63),
        "bad-json.safetensors": safetensors_header(b"{{{{{{{{"),
        "lying-offsets.safetensors": safetensors_header(json.dumps({"emb_params": {
            "dtype": "F32", "shape": [64, 1024], "data_offsets": [0, 262144]}}).encode()),
        "random.pt": rng_bytes(3000, 10), "random.ckpt": rng_bytes(3000, 11),
        "random.npz": rng_bytes(3000, 12), "wrong-keys.npz": npz.getvalue(),
        "bad.json": b"{not json", "empty.json": b"", "wrong-types.json": b'{"unet": 5, "vae": "x", "text": []}',
        "nan.json": b'{"unet": {"model_channels": NaN}}',
        "empty.txt": b"", "no-placeholder.txt": b"a photo of nothing\n",
    }


def write_all(folder: Path, files: dict) -> dict:
    """Write each file (a name given as bytes is written as those bytes); {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in files.items():
        path = folder / (os.fsdecode(name) if isinstance(name, bytes) else name)   # bytes: surrogate-escaped
        path.write_bytes(data)
        paths[name] = path
    return paths


def alone(root: Path, paths: dict) -> dict:
    """{name: a folder holding only that file} (a copy), for commands that read a folder."""
    folders = {}
    for n, (name, path) in enumerate(paths.items()):
        folder = root / f"{n:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Path(folder / Path(path).name).write_bytes(Path(path).read_bytes())
        folders[name] = folder
    return folders


def real_files() -> list:
    """Every DICOM (the DICM magic, or *.dcm), NIfTI, MetaImage and NRRD file under the installed packages, once
    per content (pydicom's test files and pydicom-data hold copies of each other)."""
    import hashlib
    import site
    suffixes = (".dcm", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
    found, seen = [], set()
    for root in site.getsitepackages():
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                path = Path(folder, name)
                if path.is_symlink() or path.suffix in (".py", ".pyc", ".so"):
                    continue
                with path.open("rb") as f:
                    head = f.read(132)
                if name.lower().endswith(suffixes) or head[128:132] == b"DICM":
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    if digest not in seen:
                        seen.add(digest)
                        found.append(path)
    return found


def make_model(folder: str):
    from medti.training.demo import tiny_model
    tiny_model(Path(folder))


def make_inception(file: str):
    import torch
    from test_inception import calibrated_state  # tests/: the suite's own random Inception weights
    torch.save(calibrated_state(), file)


if __name__ == "__main__":
    {"model": make_model, "inception": make_inception}[sys.argv[1]](sys.argv[2])
