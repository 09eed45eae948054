"""Medical image files (DICOM, NIfTI, MetaImage/NRRD) read with the field's own libraries, `pip install
"medti[medical]"`: pydicom, nibabel, SimpleITK. Nothing here is imported unless a medical file is read."""
import importlib

from minisd.errors import UserError

EXTRA = 'pip install "medti[medical]"'


class MedicalError(UserError):
    """A medical file or setting we cannot use, in one line naming the file or flag."""


class MissingExtra(MedicalError):
    """One of the extra's libraries is not installed: the run's problem (one line for the run), not one file's."""


def require(module: str, what: str):
    """Import one of the extra's libraries, or one line saying which extra to install for `what` (a file)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what}: reading it needs {module}, which is not installed; {EXTRA}") from None
