"""medti.medical's entry: the extra's libraries are imported only when a medical file is read, and their absence is
one line saying which extra to install."""
import builtins
import subprocess
import sys

import pytest

from medti.medical import EXTRA, MedicalError, require


def test_missing_library_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_pydicom(name, *args, **kwargs):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("No module named 'pydicom'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "pydicom", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    with pytest.raises(MedicalError) as info:
        require("pydicom", "data/case1/img0001.dcm")
    assert str(info.value) == ("data/case1/img0001.dcm: reading it needs pydicom, which is not installed; "
                               'pip install "medti[medical]"') and EXTRA in str(info.value)


def test_the_extra_is_not_imported_by_medti():
    """Training on PNGs must not need (or pay the import time of) pydicom, nibabel or SimpleITK."""
    probe = ("import sys, medti.medical, medti.train, medti.generate, medti.evaluate, medti.audit; "
             "print(sorted(m for m in ('pydicom', 'nibabel', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
