"""Presets from the hub (minisd.hub) and medti's sha256 cache (medti.files.hashes), without a network.

A tiny model stands in for a preset's file: the preset table is replaced by one entry with its real size and
sha256, and huggingface_hub's cache is a temporary folder laid out as huggingface_hub lays it out
(models--org--name/{blobs/<sha256>, refs/main, snapshots/<commit>/<file>}).
"""
import hashlib
import json
import os
import sys
import time

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file
from test_load import load_error, tiny_state

import minisd
from conftest import TINY_CONFIG
from medti.files import hashes
from minisd import hub
from minisd.errors import INTERFACE

COMMIT = "0" * 40


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty huggingface_hub cache, an endpoint nothing listens on (port 9 on this machine: refused at once),
    no proxy: the hub is unreachable whatever this machine's network."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hub"


@pytest.fixture
def tiny_preset(tmp_path, monkeypatch):
    """A preset 'tiny' whose file is a tiny model: (preset dict, the file's bytes)."""
    save_file(tiny_state(), str(tmp_path / "tiny.safetensors"))
    data = (tmp_path / "tiny.safetensors").read_bytes()
    preset = {**TINY_CONFIG, "repo": "org/tiny", "filename": "tiny.safetensors", "size": len(data),
              "sha256": hashlib.sha256(data).hexdigest()}
    table = {"tiny": preset}
    for module in (sys.modules["minisd.config"], sys.modules["minisd.load"], hub):
        monkeypatch.setattr(module, "presets", lambda: table)
    return preset, data


def put_in_cache(cache, preset, data) -> str:
    """The file as huggingface_hub stores a downloaded LFS file: a blob named by its sha256, linked from the
    snapshot of the commit that refs/main names."""
    repo = cache / f"models--{preset['repo'].replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / preset["sha256"]).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    link = repo / "snapshots" / COMMIT / preset["filename"]
    link.symlink_to(repo / "blobs" / preset["sha256"])
    return str(link)


def test_unreachable_hub_fails_fast(offline_hub):
    """Before: ~25 s of huggingface_hub's HEAD retries (28 s measured). Now one connection attempt, refused at once;
    the bound is the probe's own time-out plus 2 s for a loaded machine."""
    start = time.perf_counter()
    message = load_error("sd2-base")
    assert time.perf_counter() - start < hub.PROBE_SECONDS + 2
    assert "http://127.0.0.1:9 cannot be reached" in message
    assert "minisd.load('/path/to/512-base-ema.safetensors', config='sd2-base')" in message


def test_offline_message_speaks_the_callers_words(offline_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in load_error("sd2-base")
    token = INTERFACE.set("cli")
    try:
        message = load_error("sd2-base")
    finally:
        INTERFACE.reset(token)
    assert "load it with --model /path/to/512-base-ema.safetensors --config sd2-base" in message
    assert "minisd.load" not in message and "config=" not in message


def test_preset_download_is_verified(offline_hub, tiny_preset, monkeypatch):
    """minisd.load('<preset>') downloads through huggingface_hub and hashes what arrived; a corrupt download of the
    right size is refused."""
    preset, data = tiny_preset
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint: True)
    arrived = {"bytes": data}

    def download(repo, filename, local_files_only=False):
        assert (repo, filename, local_files_only) == ("org/tiny", "tiny.safetensors", False)
        path = offline_hub / "download" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(arrived["bytes"])
        return str(path)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    sd = minisd.load("tiny")
    assert sd.preset == "tiny" and sd.path.read_bytes() == data
    arrived["bytes"] = data[:-1] + bytes([data[-1] ^ 1])
    assert "sha256 differs from preset tiny's" in load_error("tiny")


def test_offline_uses_the_cached_copy_without_rehashing(offline_hub, tiny_preset, monkeypatch):
    preset, data = tiny_preset
    put_in_cache(offline_hub, preset, data)
    monkeypatch.setattr(hub, "sha256_file", lambda path: pytest.fail("a content-addressed blob was hashed again"))
    start = time.perf_counter()
    sd = minisd.load("tiny")   # the hub is unreachable: the cached copy, without HEAD requests or retries
    assert sd.path.resolve().name == preset["sha256"] and time.perf_counter() - start < hub.PROBE_SECONDS + 2


def test_verify_checks_size_and_sha256(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"0123456789" * 1000)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    hub.verify(path, {"size": 10000, "sha256": digest}, "test", downloaded_now=True)
    with pytest.raises(minisd.LoadError, match="bytes, but preset test is 9999 bytes"):
        hub.verify(path, {"size": 9999, "sha256": digest}, "test", downloaded_now=False)
    with pytest.raises(minisd.LoadError, match="sha256 differs"):   # not named by its hash: hashed again
        hub.verify(path, {"size": 10000, "sha256": "0" * 64}, "test", downloaded_now=False)


# --- medti.files.hashes -----------------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sha256.json"


def test_sha256_is_remembered(tmp_path, cache, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 1000)
    digest = hashlib.sha256(b"x" * 1000).hexdigest()
    assert hashes.sha256_of(path) == digest and digest in cache.read_text()
    monkeypatch.setattr(hashes, "sha256_file", lambda p: pytest.fail("hashed again"))
    assert hashes.sha256_of(path) == digest


@pytest.mark.parametrize("content", [b"{torn", b"\xff\xfe", b"[1, 2]", b'{"format": 1, "files": [1]}',
                                     b'{"/x:10:5": "abc"}',   # the layout before this cache format
                                     b'{"format": 1, "files": {"X": {"size": 1, "mtime_ns": 1, "sha256": "no"}}}'])
def test_corrupt_cache_is_rebuilt(tmp_path, cache, content):
    """Before: a torn sha256.json made every run fail in json.loads until someone deleted it."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"y" * 10)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    assert hashes.sha256_of(path) == hashlib.sha256(b"y" * 10).hexdigest()
    data = json.loads(cache.read_text())
    assert data["format"] == hashes.FORMAT and list(data["files"]) == [str(path.resolve())]


def test_changed_file_is_hashed_again(tmp_path, cache):
    """Same size, new content: the entry is keyed by modification time too, and replaced, not added to."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 10)
    hashes.sha256_of(path)
    path.write_bytes(b"b" * 10)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))
    assert hashes.sha256_of(path) == hashlib.sha256(b"b" * 10).hexdigest()
    assert len(json.loads(cache.read_text())["files"]) == 1


def test_unwritable_cache_still_gives_the_hash(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("MEDTI_CACHE", str(blocker / "cache"))   # mkdir under a file: OSError
    path = tmp_path / "model.safetensors"
    path.write_bytes(torch.zeros(4).numpy().tobytes())
    assert hashes.sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
