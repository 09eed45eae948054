"""Writing files safely: atomically (temp file, fsync, rename), reproducibly (the same tensors and metadata
always give the same bytes), and into an output folder that one run at a time holds."""
import contextlib
import fcntl
import json
import os
import struct
from pathlib import Path

import torch

from minisd.errors import UserError, arg

# safetensors dtype names (format: github.com/huggingface/safetensors, README "Format")
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """The safetensors encoding with keys in sorted order. Why our own: the library writes its metadata from a
    hash map, whose order changes from process to process, so the same embedding would not give the same bytes
    twice. Layout: 8-byte little-endian header size, JSON header (names -> dtype, shape, byte range; padded with
    spaces to a multiple of 8), then the tensors' little-endian bytes back to back."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()   # 1-D: a 0-dim tensor cannot be viewed
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_atomic(path, data: bytes):
    """Write bytes under a temporary name in the same folder, flush them to disk, then rename: a reader sees the
    old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


LOCK_NAME = ".lock"


def inside(path, folder) -> bool:
    """Whether `path` is `folder` or lies below it, after resolving links and "..": the one rule by which every
    command refuses an output folder inside one of its inputs."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def lock_name(rank: int) -> str:
    """The lock file of one process of a launch: `.lock` for a single process (and torchrun's rank 0),
    `.lock.rank<r>` for rank r > 0."""
    return LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank}"


@contextlib.contextmanager
def claim_folder(folder, flag: str = "out", rank: int = 0):
    """Hold an output folder for one run: create it if needed, check it is writable, lock it, and on failure
    remove it again if this run created it and left nothing in it (a failed run leaves no empty folder).

    The lock is an flock on FOLDER/.lock, so the kernel releases it when the process dies: a crash never leaves
    a stale lock, and a second run on the same folder is refused at once instead of mixing its files in. Under
    torchrun each rank locks its own file (lock_name): the ranks of one launch never refuse each other, and every
    rank of a second launch is refused by the first launch's process of the same rank while that one runs."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{arg(flag)} {folder}: exists and is not a folder; choose a folder path")
    created, name = not folder.exists(), lock_name(rank)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / name, "a")
    except OSError as e:
        raise UserError(f"{arg(flag)} {folder}: cannot write there ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{arg(flag)} {folder}: another run is writing there now; wait for it to end or "
                            "choose another folder") from None
        yield folder
    except BaseException:
        if created and all(p.name.startswith(LOCK_NAME) for p in folder.iterdir()):
            (folder / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):   # another rank's lock file may still be there: then it cleans up
                folder.rmdir()
        raise
    finally:
        handle.close()   # closing releases the flock
