"""``mhpo_kernels.triton_kernels`` in a source checkout used in place.

setup.py installs the folder triton_kernels/ as ``mhpo_kernels.triton_kernels`` (``package_dir``; an
editable install maps it the same way), never as a top-level ``triton_kernels``: that name is
triton-lang's kernel library. A checkout used without installing (``PYTHONPATH=<checkout>`` after
``setup.py build_ext --inplace``: bench/gpu_report.sh, the tree copies of .ci/) has no
mhpo_kernels/triton_kernels folder. Importing this module (the package does, first) puts a finder
first on ``sys.meta_path`` that answers that one name with the checkout's triton_kernels/ folder
(first: ahead of an editable install of another tree, so the kernels come from the tree the package
came from). An installed package has the folder and gets no finder.
"""
import importlib.abc
import importlib.util
import os
import sys

NAME = __name__.rpartition(".")[0] + ".triton_kernels"
_PKG = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_PKG)
FOLDER = os.path.join(_ROOT, "triton_kernels")


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``NAME`` (only) in ``folder``; its submodules are found on the package's ``__path__``."""

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(self.folder, "__init__.py"),
                                                      submodule_search_locations=[self.folder])


def in_checkout() -> bool:
    """This package is a checkout's folder: no triton_kernels inside, the checkout's setup.py and
    triton_kernels/ beside it (not some other top-level triton_kernels of a site-packages)."""
    return (not os.path.isdir(os.path.join(_PKG, "triton_kernels"))
            and os.path.isfile(os.path.join(_ROOT, "setup.py"))
            and os.path.isfile(os.path.join(FOLDER, "fused_logprob.py")))


def install() -> None:
    if in_checkout() and not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder(FOLDER))


install()
