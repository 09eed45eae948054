"""Our safetensors writer: the library's own reader gets back exactly what was written, and the bytes depend
only on the content (the library's writer orders metadata differently from process to process)."""
import subprocess
import sys

import torch
from safetensors import safe_open

from medti.files.atomic import safetensors_bytes, write_atomic


def test_library_reads_our_bytes(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "h": torch.randn(4).half(), "z": torch.zeros(0, 2), "s": torch.tensor(2.5, dtype=torch.bfloat16)}
    meta = {"token": "<x>", "step": 7}
    write_atomic(tmp_path / "t.safetensors", safetensors_bytes(tensors, meta))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.metadata() == {"token": "<x>", "step": "7"}
        assert set(f.keys()) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor) and f.get_tensor(name).dtype == tensor.dtype
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_same_content_same_bytes_across_processes():
    code = ("import torch, sys; from medti.files.atomic import safetensors_bytes; "
            "sys.stdout.buffer.write(safetensors_bytes({'v': torch.ones(2, 2)}, {k: k for k in 'qwertyuiop'}))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout for _ in range(3)}
    assert len(outputs) == 1
