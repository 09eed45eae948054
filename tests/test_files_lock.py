"""claim_folder: one run at a time per output folder, no empty folder left by a failed run."""
import os
import subprocess
import sys

import pytest

from medti.files.atomic import claim_folder
from minisd.errors import UserError

HOLD = """import sys, time
from medti.files.atomic import claim_folder
with claim_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(30)
"""


def test_second_holder_is_refused_and_lock_dies_with_its_process(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="another run is writing there"):
            with claim_folder(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claim_folder(folder):   # the kernel dropped the dead holder's lock
        (folder / "x").write_text("1")


def test_failed_run_leaves_no_new_empty_folder(tmp_path):
    folder = tmp_path / "a" / "out"
    with pytest.raises(RuntimeError):
        with claim_folder(folder):
            raise RuntimeError("failed before writing")
    assert not folder.exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with claim_folder(existing):
            raise RuntimeError("x")
    assert existing.is_dir()   # not ours to remove


def test_file_and_unwritable_paths_are_user_errors(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        with claim_folder(tmp_path / "f"):
            pass
    with pytest.raises(UserError, match="cannot write there"):
        with claim_folder("/proc/medti-out"):
            pass


def test_ranks_of_one_launch_share_a_folder_and_a_second_launch_is_refused(tmp_path):
    """torchrun: rank 0 and rank 1 of one launch both hold the folder; rank 1 of a second launch is refused while
    the first launch's rank 1 runs (it would otherwise write its share into the same folder)."""
    folder = tmp_path / "out"
    with claim_folder(folder, rank=0, world=3), claim_folder(folder, rank=1, world=3):
        holder = subprocess.Popen([sys.executable, "-c", HOLD.replace("claim_folder(sys.argv[1])",
                                   "claim_folder(sys.argv[1], rank=2, world=3)"), str(folder)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
        finally:
            holder.kill()
            holder.wait()
        with pytest.raises(UserError, match="another run is writing there"):
            with claim_folder(folder, rank=1, world=3):   # flock is per open file: a second open conflicts too
                pass


@pytest.mark.parametrize("first, second", [((0, 1), (1, 2)), ((1, 2), (0, 1)), ((0, 2), (0, 1))])
def test_a_single_run_and_a_launch_never_share_a_folder(tmp_path, first, second):
    """(rank, world) of the holder and of the newcomer. A plain run and a process started with RANK=1 WORLD_SIZE=2
    by hand used to hold one folder together (different lock files) and mix their images and manifests."""
    folder = tmp_path / "out"
    code = HOLD.replace("claim_folder(sys.argv[1])", f"claim_folder(sys.argv[1], rank={first[0]}, world={first[1]})")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="another run is writing there"):
            with claim_folder(folder, rank=second[0], world=second[1]):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    """A kill -9 during write_atomic leaves .NAME.PID.tmp (gigabytes for a model); the next run that claims the
    folder removes those of dead processes, in subfolders too, and keeps a live writer's and every other file."""
    folder = tmp_path / "out"
    (folder / "class-images").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()   # a pid that no longer runs (reused within the test: vanishingly unlikely)
    stale = [folder / f".model.safetensors.{dead.pid}.tmp", folder / "class-images" / f".00001.png.{dead.pid}.tmp"]
    kept = [folder / f".log.jsonl.{os.getpid()}.tmp", folder / "model.safetensors", folder / ".notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    with claim_folder(folder):
        assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in kept)
