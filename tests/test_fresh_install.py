"""What a new user meets on a fresh machine: the build's torch and CUDA decisions (setup.py),
the package metadata, why a backend is unavailable, and ``check``'s provenance line."""
import dataclasses
import os
import subprocess
import sys
import sysconfig
import tarfile

import pytest
import torch

from mhpo_kernels import __version__, backends
from mhpo_kernels.tools import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def _setup_py(args, tmp_path, env=None, pre=""):
    """Run ``setup.py args`` from the repository root in a fresh interpreter; ``pre`` runs first."""
    code = (f"import sys; {pre}\nsys.argv = ['setup.py', *{list(args)!r}]\n"
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), "
            "{'__name__': '__main__', '__file__': 'setup.py'})")
    full_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "MHPO_BUILD_CUDA",
                                                                  "MHPO_BUILD_NATIVE")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=300)


def _fake_torch(tmp_path, body):
    """A folder with a ``torch`` package that shadows the real one (PYTHONPATH comes first)."""
    pkg = tmp_path / "shadow" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    return str(tmp_path / "shadow")


# ----------------------------------------------------------------------------- setup.py


def test_pyproject_does_not_fetch_torch_for_the_build():
    """A torch in [build-system] requires makes pip's isolated build download a second torch."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    section = text.split("[build-system]", 1)[1].split("\n[", 1)[0]
    requires = section.split("requires", 1)[1].split("]", 1)[0]
    assert "torch" not in requires, requires


@pytest.mark.slow
def test_build_uses_the_torch_pip_isolation_hides(tmp_path):
    """pip's build isolation removes the target environment's site-packages from sys.path;
    setup.py puts it back (after the build environment's packages) and says so."""
    purelib = sysconfig.get_paths()["purelib"]
    hide = (f"import setuptools, os; sys.path[:] = [p for p in sys.path if os.path.realpath(p) != "
            f"os.path.realpath({purelib!r})]; sys.modules.pop('torch', None)")
    r = _setup_py(["--version"], tmp_path, pre=hide)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"building against the installed torch {torch.__version__}" in r.stdout, r.stdout
    assert r.stdout.strip().endswith(__version__)


@pytest.mark.parametrize("command", [["build_ext", "--inplace"], ["dist_info", "--output-dir", "{tmp}"]])
def test_build_without_torch_stops_at_once(tmp_path, command):
    """No torch: stop before compiling anything, and already at pip's metadata step (dist_info),
    before pip resolves and downloads the runtime dependencies (a torch among them)."""
    shadow = _fake_torch(tmp_path, "raise ImportError('no torch here')\n")
    command = [c.format(tmp=tmp_path) for c in command]
    r = _setup_py(command, tmp_path, env={"PYTHONPATH": shadow})
    assert r.returncode != 0
    assert "pip install --no-build-isolation ." in r.stderr and "MHPO_BUILD_NATIVE=0" in r.stderr, r.stderr
    # metadata-only steps still work without torch (sdist, egg_info)
    r = _setup_py(["--version"], tmp_path, env={"PYTHONPATH": shadow})
    assert r.returncode == 0 and r.stdout.strip().endswith(__version__), r.stderr[-2000:]


def test_build_with_too_old_torch_stops(tmp_path):
    shadow = _fake_torch(tmp_path, "__version__ = '2.4.1+cu121'\n")
    r = _setup_py(["bdist_wheel"], tmp_path, env={"PYTHONPATH": shadow})
    assert r.returncode != 0
    assert "needs torch >= 2.11, this environment has 2.4.1+cu121" in r.stderr, r.stderr


@pytest.mark.slow
def test_cuda_skip_reason_and_metadata(tmp_path):
    """A CUDA_HOME that is no toolkit root: the build says why the CUDA extension is skipped.
    The same run writes the package metadata a wheel gets, and an sdist that can be built
    (every native source and header) and documents the math (docs/)."""
    not_a_toolkit = tmp_path / "not-cuda"
    not_a_toolkit.mkdir()
    egg, dist = tmp_path / "egg", tmp_path / "dist"
    egg.mkdir()
    r = _setup_py(["-q", "egg_info", "--egg-base", str(egg), "sdist", "-d", str(dist)], tmp_path,
                  env={"CUDA_HOME": str(not_a_toolkit)})
    assert r.returncode == 0, r.stderr[-2000:]
    if torch.version.cuda:
        why = f"CUDA_HOME={not_a_toolkit} is not a CUDA toolkit root (no bin/nvcc or include/cuda_runtime_api.h)"
    else:
        why = f"torch {torch.__version__} is a CPU-only build"
    assert f"NOT building the CUDA extension (CPU backend only): {why}" in r.stdout, r.stdout
    info = egg / "mhpo_kernels.egg-info"
    requires = (info / "requires.txt").read_text().split("\n\n")[0].split()
    assert sorted(requires) == ["numpy", "torch>=2.11"]
    meta = (info / "PKG-INFO").read_text()
    assert "Description-Content-Type: text/markdown" in meta
    assert "# mhpo-kernels" in meta  # the README is the long description
    assert "Project-URL: Paper, https://arxiv.org/abs/2603.16929" in meta
    assert "Requires-Python: >=3.10" in meta
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc"))
              for f in fs if f.endswith((".h", ".cpp", ".cu", ".inc"))}
    wanted |= {"README.md", "docs/mhpo.md", "setup.py", "pyproject.toml"}
    assert wanted <= names, sorted(wanted - names)


@pytest.mark.slow
def test_cuda_skip_reason_wrapper_nvcc(tmp_path):
    """nvcc on the PATH is a wrapper script outside any toolkit: torch guesses its grandparent
    folder as CUDA_HOME; the build names the wrapper and asks for CUDA_HOME."""
    wrapper = tmp_path / "wrap" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text("#!/bin/sh\nexec /opt/somewhere/bin/nvcc \"$@\"\n")
    wrapper.chmod(0o755)
    r = _setup_py(["--version"], tmp_path, env={"PATH": f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr[-2000:]
    if torch.version.cuda:
        assert (f"the nvcc on the PATH ({wrapper}) is not inside a toolkit root (a wrapper script?): torch guessed "
                f"CUDA_HOME={tmp_path / 'wrap'}, which has no include/cuda_runtime_api.h; set CUDA_HOME") in r.stdout, \
            r.stdout
    else:
        assert f"torch {torch.__version__} is a CPU-only build" in r.stdout, r.stdout


# ----------------------------------------------------------------------------- backend hints


@pytest.fixture
def fresh_backends(monkeypatch):
    """backends' load cache emptied for the test (restored afterwards)."""
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "_errors", {})
    return monkeypatch


def _failing_triton_row(missing):
    """The registry's triton row with a loader that fails as an import of ``missing`` would."""
    def load():
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    return dataclasses.replace(backends.REGISTRY["triton"], load=load)


def test_triton_hint_names_missing_numpy(fresh_backends):
    """Without numpy Triton's interpreter cannot load: the hint says so instead of blaming TRITON_INTERPRET."""
    fresh_backends.setitem(backends.REGISTRY, "triton", _failing_triton_row("numpy"))
    fresh_backends.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError) as e:
        backends.resolve("triton", CPU)
    assert "(Triton's interpreter needs numpy, which is not installed (pip install numpy))" in str(e.value)
    assert "TRITON_INTERPRET" not in str(e.value)
    assert "triton" not in backends.available_backends(CPU)


def test_triton_hint_names_missing_triton(fresh_backends):
    fresh_backends.setitem(backends.REGISTRY, "triton", _failing_triton_row("triton"))
    with pytest.raises(RuntimeError, match=r"\(Triton is not installed \(pip install triton\)\)"):
        backends.resolve("triton", CPU)


def test_triton_hint_interpret_not_set(fresh_backends):
    fresh_backends.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError) as e:
        backends.resolve("triton", CPU)
    msg = str(e.value)
    assert ("Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 in the environment "
            "before the first import of triton") in msg
    assert "setting it later gives '0 active drivers'" in msg


@pytest.mark.slow
def test_triton_interpret_set_after_import():
    """TRITON_INTERPRET=1 set after the kernels were imported: Triton built them for a GPU and a
    CPU launch fails with '0 active drivers'. The backend is unavailable on CPU and says why."""
    code = ("import os, torch\nimport mhpo_kernels.triton_kernels\nos.environ['TRITON_INTERPRET'] = '1'\n"
            "from mhpo_kernels import backends\nprint(backends.available_backends('cpu'))\n"
            "backends.resolve('triton', torch.device('cpu'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "'triton'" not in r.stdout.splitlines()[-1], r.stdout
    assert ("TRITON_INTERPRET=1 was set after the Triton kernels were imported, so they were built for a GPU "
            "('0 active drivers' on CPU tensors): set it before the first import of triton") in r.stderr, r.stderr


# ----------------------------------------------------------------------------- check's provenance


def test_check_source_in_checkout():
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    if sha:  # this test tree is a git checkout (CI, a developer's clone)
        assert check.source(ROOT).startswith(f"{__version__} @ {sha}")
    else:  # an unpacked sdist
        assert check.source(ROOT) == f"{__version__} (installed package)"


def test_check_source_installed(tmp_path):
    """Installed from a wheel: no commit, the package version. A site-packages folder inside some
    other git repository (a venv in a project folder) must not report that repository's commit."""
    site = tmp_path / "project" / ".venv" / "lib" / "site-packages"
    (site / "mhpo_kernels").mkdir(parents=True)
    assert check.source(str(site)) == f"{__version__} (installed package)"
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path / "project", capture_output=True, check=True)
    git("init", "-q")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x")
    assert check.source(str(site)) == f"{__version__} (installed package)"


def test_check_prints_version_when_installed(monkeypatch, tmp_path, capsys):
    from mhpo_kernels.tools import bench_utils as _bench_utils

    monkeypatch.setattr(_bench_utils, "ROOT", str(tmp_path))  # where an installed package lives: no checkout
    monkeypatch.setattr(check, "_cases", lambda quick, large: [])
    assert check.main(["--backends", "torch"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"mhpo-kernels {__version__} (installed package) | torch")
    assert "unknown" not in first
