"""Writing files safely: atomically (temp file, fsync, rename) and reproducibly (the same tensors and metadata
always give the same bytes)."""
import json
import os
import struct
from pathlib import Path

import torch

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
