"""Where the small data files of `weights/` live, installed or in a source checkout."""
from importlib import resources
from pathlib import Path


def weights_dir() -> Path:
    # Installed (`pip install .`), weights/ is the package `minisd.weights`; in a plain source checkout
    # (nothing installed) it is the folder beside this package.
    try:
        return Path(str(resources.files("minisd.weights")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "weights"
