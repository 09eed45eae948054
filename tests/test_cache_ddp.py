"""The on-disk cache under torchrun on the CPU (gloo): two ranks encode the same cache as one (rank r writes the shards
i % 2 == r, rank 0 the manifest), and two processes training from it give what one gives, within test_train_ddp.py's
bound and for its reason (two half-batch means averaged where one process takes one mean)."""
import os
import subprocess
import sys

from test_cache import encode, tiny  # noqa: F401 (tiny: the module's fixture)
from test_train_ddp import largest_difference

from medti.train import main as train_main


def torchrun(module: str, args: list):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # two ranks on two cores: one thread each
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module,
               *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_encode_the_cache_one_does_and_train_from_it_as_one(tiny, tmp_path):   # noqa: F811
    folder, model, data = tiny
    assert encode(tiny, tmp_path / "one", "--seed", "5") == 0
    torchrun("medti.data", ["encode", "--data", str(data), *model, "--shard-size", "4", "--seed", "5", "--out",
                            str(tmp_path / "two")])
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(files) == 2 * 2 + 2
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    common = [*model, "--cache", str(tmp_path / "two"), "--token", "<t>", "--vectors", "2", "--batch", "2",
              "--max-steps", "4", "--save-every", "2", "--preview-every", "0", "--seed", "5", "--latents", "random"]
    assert train_main([*common, "--out", str(tmp_path / "run-one")]) == 0
    torchrun("medti.train", ["--", *common, "--out", str(tmp_path / "run-two")])
    err = largest_difference(tmp_path / "run-one" / "t.safetensors", tmp_path / "run-two" / "t.safetensors")
    assert err <= 3e-5, err
