"""Writing files safely: atomically (temp file, fsync, rename), reproducibly (the same tensors and metadata
always give the same bytes), and into an output folder that one run at a time holds."""
import contextlib
import fcntl
import json
import os
import re
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


def text_bytes(text: str) -> bytes:
    """Text as UTF-8 for a file a person reads (reports, lists). A file name that is not valid UTF-8 on disk comes
    to Python with its odd bytes as lone surrogates, which UTF-8 cannot encode: they are written as U+FFFD, so the
    report is whole and valid text (str.encode raised, and left half a report)."""
    return re.sub("[\udc80-\udcff]", "\ufffd", text).encode("utf-8")


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
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:   # a failed write or fsync (disk full) names no file: name the one being written
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


LOCK_NAME = ".lock"
TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")   # write_atomic's temporary names: .NAME.PID.tmp


def inside(path, folder) -> bool:
    """Whether `path` is `folder` or lies below it, after resolving links and "..": the one rule by which every
    command refuses an output folder inside one of its inputs."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _flock(path: Path, mode: int, flag: str, folder: Path):
    """An open handle on `path` holding a non-blocking flock of `mode`, or the one-line refusal."""
    handle = open(path, "a")
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{arg(flag)} {folder}: another run is writing there now; wait for it to end or choose "
                        "another folder") from None
    return handle


def _locks(folder: Path, flag: str, rank: int, world: int) -> list:
    """The flocks a process holds on its output folder. FOLDER/.lock: exclusive for a single process, shared by
    every process of a launch (world > 1), so a single run and a launch never hold one folder together, whatever
    RANK a process was given. Each process of a launch also holds FOLDER/.lock.rank<r> exclusively: a second
    launch into the folder meets the first's process of the same rank and is refused."""
    handles = [_flock(folder / LOCK_NAME, fcntl.LOCK_SH if world > 1 else fcntl.LOCK_EX, flag, folder)]
    if world > 1:
        try:
            handles.append(_flock(folder / f"{LOCK_NAME}.rank{rank}", fcntl.LOCK_EX, flag, folder))
        except BaseException:
            handles[0].close()
            raise
    return handles


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete write_atomic's temporary files whose writer is dead (a kill -9 mid-write leaves one, and at SD2 size
    it is gigabytes); called by the run that holds the folder, so no live writer of another run can own one. A
    file of a live process (this launch's other ranks) is left alone."""
    stale = [p for p in folder.rglob(".*.tmp") if (m := TEMP.match(p.name)) and not _alive(int(m[1]))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def claim_folder(folder, flag: str = "out", rank: int = 0, world: int = 1):
    """Hold an output folder for one run: create it if needed, check it is writable, lock it (_locks), remove the
    temporary files of dead writers, and on failure remove the folder again if this run created it and left
    nothing in it (a failed run leaves no empty folder). `rank`, `world`: this process's place in a torchrun
    launch ((0, 1) for a single process).

    The locks are flocks, so the kernel releases them when the process dies: a crash never leaves a stale lock,
    and a second run on the same folder is refused at once instead of mixing its files in."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{arg(flag)} {folder}: exists and is not a folder; choose a folder path")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LOCK_NAME).touch()
    except OSError as e:
        raise UserError(f"{arg(flag)} {folder}: cannot write there ({e.strerror or e})") from None
    handles = _locks(folder, flag, rank, world)
    try:
        remove_stale_temps(folder)
        yield folder
    except BaseException:
        if created and all(p.name.startswith(LOCK_NAME) for p in folder.iterdir()):
            for name in (LOCK_NAME, f"{LOCK_NAME}.rank{rank}"):
                (folder / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):   # another rank's lock file may still be there: then it cleans up
                folder.rmdir()
        raise
    finally:
        for handle in handles:
            handle.close()   # closing releases the flock
