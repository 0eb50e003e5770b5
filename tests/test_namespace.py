"""The folder triton_kernels/ installs as ``mhpo_kernels.triton_kernels``, never as a top-level
``triton_kernels``: that name is triton-lang's kernel library (PyPI ``triton-kernels``), which
inference stacks import. After ``pip install`` (a normal and an editable one) into an environment that
already has a ``triton_kernels``, ``import triton_kernels`` still gives the user's, and ours works.

The environment: a fresh venv without system site packages (nothing of this checkout's install is
visible there), on the running interpreter; torch, Triton, setuptools and pip come from this
environment's site-packages through a folder of links to all of it but mhpo-kernels. The package is
installed pure-Python (``MHPO_BUILD_NATIVE=0``: no native build) from a copy of the tree.
"""
import os
import shutil
import site
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # fresh venvs and pip installs: the quick loop (-m 'not slow') leaves them out
pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ("mhpo_kernels", "mhpo-kernels", "__editable__", "triton_kernels", "triton-kernels")

CHECK = r"""
import importlib.metadata, os, sys
import triton_kernels
assert getattr(triton_kernels, "USERS", False), f"import triton_kernels gave {triton_kernels.__file__}"
import mhpo_kernels as mk
from mhpo_kernels import backends
ours = backends.get("triton")
import mhpo_kernels.triton_kernels
assert ours is mhpo_kernels.triton_kernels and callable(ours.fwd) and callable(ours.finish), ours
assert os.path.realpath(ours.__file__) == os.path.realpath(sys.argv[1]), (ours.__file__, sys.argv[1])
assert "triton" in mk.available_backends("cpu"), mk.available_backends("cpu")
assert sys.modules["triton_kernels"] is triton_kernels
import triton_kernels as again
assert again is triton_kernels
files = [str(f) for f in importlib.metadata.files("mhpo-kernels") or ()]
assert not [f for f in files if f.split("/")[0] == "triton_kernels"], files
finders = [type(f).__name__ for f in sys.meta_path]
if sys.argv[2] == "editable":  # setuptools' finder maps the name (the checkout's finder would find it too)
    maps = [getattr(m, "MAPPING", {}) for n, m in list(sys.modules.items()) if n.startswith("__editable__")]
    assert any(m.get("mhpo_kernels.triton_kernels") == os.path.dirname(sys.argv[1]) for m in maps), maps
else:  # an installed package needs no finder of its own
    assert "CheckoutFinder" not in finders, finders
print("ok", mk.available_backends("cpu"))
"""

CHECKOUT = r"""
import os, sys
import mhpo_kernels as mk
from mhpo_kernels import backends
tree = os.path.realpath(sys.argv[1])
assert os.path.realpath(mk.__file__) == os.path.join(tree, "mhpo_kernels", "__init__.py"), mk.__file__
ours = backends.get("triton")
assert os.path.realpath(ours.__file__) == os.path.join(tree, "triton_kernels", "__init__.py"), ours.__file__
assert ours.__name__ == "mhpo_kernels.triton_kernels" and callable(ours.fwd)
assert "triton" in mk.available_backends("cpu"), mk.available_backends("cpu")
assert "triton_kernels" not in sys.modules, sys.modules["triton_kernels"]
print("ok")
"""


def _copy_tree(dst):
    """What a build needs (the top-level files and the sources), without build outputs."""
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "build")
    dst.mkdir()
    for entry in os.scandir(ROOT):
        if entry.is_file():
            shutil.copy2(entry.path, dst / entry.name)
    for sub in ("mhpo_kernels", "triton_kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, sub), dst / sub, ignore=ignore)
    return dst


def _venv(path):
    """A venv without system site packages that sees this environment's packages but not ours,
    with a top-level ``triton_kernels`` of its own already installed. Returns (python, site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = str(path / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    shim = path / "outer-packages"  # links to this environment's packages (.pth files are not run from here)
    shim.mkdir()
    for outer in site.getsitepackages():
        for entry in os.scandir(outer) if os.path.isdir(outer) else ():
            name = entry.name
            if name.startswith(OURS) or name.endswith(".pth") or (shim / name).exists():
                continue
            (shim / name).symlink_to(entry.path)
    with open(os.path.join(purelib, "outer-packages.pth"), "w") as f:
        f.write(f"{shim}\n")
    users = os.path.join(purelib, "triton_kernels")  # the user's (triton-lang's) package
    os.makedirs(users)
    with open(os.path.join(users, "__init__.py"), "w") as f:
        f.write("USERS = True\n")
    return python, purelib


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(MHPO_BUILD_NATIVE="0", TRITON_INTERPRET="1", PYTHONNOUSERSITE="1", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_installs_inside_our_namespace(tmp_path, editable):
    tree = _copy_tree(tmp_path / "tree")
    python, purelib = _venv(tmp_path / "venv")
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                        *(["-e"] if editable else []), str(tree)],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    users = open(os.path.join(purelib, "triton_kernels", "__init__.py")).read()
    assert users == "USERS = True\n", f"the install overwrote the user's triton_kernels: {users[:200]!r}"
    ours = tree / "triton_kernels" if editable else os.path.join(purelib, "mhpo_kernels", "triton_kernels")
    # from a folder with no triton_kernels in it (a checkout's would shadow both on sys.path)
    r = subprocess.run([python, "-c", CHECK, os.path.join(ours, "__init__.py"), "editable" if editable else "install"],
                       cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]


def test_checkout_used_in_place(tmp_path):
    """Not installed, on PYTHONPATH (bench/gpu_report.sh, .ci's tree copies): the package finds
    mhpo_kernels.triton_kernels in the same tree (mhpo_kernels/_checkout.py), even with an editable
    install of another tree in the environment, and never imports a top-level triton_kernels."""
    tree = _copy_tree(tmp_path / "tree")
    env = {**_env(), "PYTHONPATH": str(tree)}
    r = subprocess.run([sys.executable, "-c", CHECKOUT, str(tree)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]
