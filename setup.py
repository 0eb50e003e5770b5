"""Build script. The Python packages always install; the native extension
(csrc/) is added by ``_native_extensions()``, compiled against the torch already
installed in the target environment (``_installed_torch()``)."""
import os
import sys
import sysconfig

from setuptools import find_packages, setup

TORCH_MIN = "2.11"  # the oldest torch CI tests (install_requires below)
# setup.py commands that build or install the package; dist_info is pip's wheel-metadata step, which
# comes before pip resolves (and downloads) the runtime dependencies
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist_egg", "develop", "install", "editable_wheel",
                   "dist_info"}


def _major_minor(version):
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2])


def _installed_torch():
    """Make the target environment's torch importable for the build, or stop at once.

    The native extensions must be compiled against the torch they will load
    into. ``pip install .`` builds in an isolated environment that hides the
    target's site-packages; pyproject.toml does not list torch as a build
    requirement (pip would download a second torch just for the build), so
    the torch installed in the environment pip installs into is put back on the
    path here, after the build environment's own packages. Without any torch,
    or with one older than TORCH_MIN (pip would replace it after the build, and
    the extensions would not load), a build stops with a message before
    compiling or downloading anything; sdist and egg_info go on without torch.
    """
    if os.environ.get("MHPO_BUILD_NATIVE") == "0":
        return
    try:
        import torch
    except ImportError:
        torch = None
        paths = sysconfig.get_paths()
        for path in dict.fromkeys((paths["purelib"], paths["platlib"])):
            if path not in sys.path and os.path.isdir(os.path.join(path, "torch")):
                sys.path.append(path)  # pip's build isolation hid it: build against it
                try:
                    import torch
                except ImportError:
                    sys.path.remove(path)
                    continue
                print(f"mhpo-kernels: building against the installed torch {torch.__version__} ({path}); "
                      "pip's build isolation hides it, nothing else is downloaded")
                break
    if not _BUILD_COMMANDS & set(sys.argv[1:]):
        return
    if torch is None:
        sys.exit(
            "mhpo-kernels: no torch in this environment. The native extensions are compiled against the torch "
            "they load into, so install it first and build without isolation:\n"
            f"    pip install 'torch>={TORCH_MIN}' && pip install --no-build-isolation .\n"
            "(python -m build: --no-isolation), or MHPO_BUILD_NATIVE=0 for a pure-Python install "
            "(Triton and the reference only)."
        )
    if _major_minor(torch.__version__) < _major_minor(TORCH_MIN):
        sys.exit(
            f"mhpo-kernels needs torch >= {TORCH_MIN}, this environment has {torch.__version__} "
            f"({os.path.dirname(torch.__file__)}): upgrade it first (pip install 'torch>={TORCH_MIN}'), then "
            "pip install --no-build-isolation ."
        )


_installed_torch()


def _cuda_skip_reason(torch, cuda_home):
    """Why the CUDA extension cannot be built here (None when it can)."""
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build"
    if not cuda_home:
        return "no CUDA toolkit found (CUDA_HOME is not set and no nvcc is on the PATH)"
    missing = [os.path.join(*p) for p in (("bin", "nvcc"), ("include", "cuda_runtime_api.h"))
               if not os.path.exists(os.path.join(cuda_home, *p))]
    if not missing:
        return None
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return f"CUDA_HOME={cuda_home} is not a CUDA toolkit root (no {' or '.join(missing)})"
    import shutil

    nvcc = shutil.which("nvcc")
    where = f"the nvcc on the PATH ({nvcc}) is not inside a toolkit root (a wrapper script?)" if nvcc else \
        "no nvcc on the PATH"
    return (f"{where}: torch guessed CUDA_HOME={cuda_home}, which has no {' or '.join(missing)}; "
            "set CUDA_HOME to the toolkit root")


def _shared_libstdcxx_link_args():
    """Link arguments that make an extension use the C++ runtime torch already loaded.

    A toolchain that links libstdc++ statically (``-static-libstdc++``, or a GCC
    that ships only ``libstdc++.a``) gives the extension a private copy of the
    C++ runtime beside the shared one torch loaded; the copy's code meets the
    shared copy's data (two counters number the locale facets), and every
    ``TORCH_CHECK`` message that formats a number segfaults or loses the number.
    So on Linux the very ``libstdc++.so.6`` this process mapped when it imported
    torch goes on the link line. It comes before the driver's own ``-lstdc++``:
    every symbol it defines binds to it (``NEEDED libstdc++.so.6``) and a static
    archive adds no member for those; any member still taken from the archive
    (a compiler newer than that runtime) stays local (``--exclude-libs``), so it
    never interposes. Keeping the whole private runtime local instead
    (``--exclude-libs,ALL`` alone) also gives whole messages, but leaves two C++
    runtimes in one process (and 1.4 MB more per extension); not kept. Nothing
    to add off Linux or when no libstdc++ is mapped (libc++).
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:  # torch is imported: its libstdc++ is mapped
            mapped = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    libs = sorted(p for p in mapped if os.path.basename(p).startswith("libstdc++.so") and os.path.isfile(p))
    if not libs:
        return []
    return [libs[0], "-Wl,--exclude-libs,libstdc++.a"]


def _native_extensions():
    """(ext_modules, cmdclass) of the native backends, or ([], {}) for a pure-Python install.

    * ``mhpo_kernels._C_cpu``: the op library (schemas, CPU and Meta kernels),
      always built. The row kernels are compiled once per ISA (baseline,
      AVX2, AVX-512) and picked at run time, so no ``-march=native``.
    * ``mhpo_kernels._C_cuda``: the CUDA kernels, when a CUDA toolkit is found
      (``CUDA_HOME``) and torch is a CUDA build; SASS for sm_80 and sm_90 plus
      PTX for newer GPUs (``MHPO_CUDA_ARCHS="80;90;100"`` changes the list).

    ``MHPO_BUILD_NATIVE=0`` skips all native code. ``MHPO_BUILD_CUDA=0`` skips
    the CUDA part, ``=1`` makes a missing toolkit an error.
    """
    native = os.environ.get("MHPO_BUILD_NATIVE", "auto")
    want_cuda = os.environ.get("MHPO_BUILD_CUDA", "auto")
    if native == "0":
        return [], {}
    try:  # torch only here: metadata-only steps (egg_info, sdist) work without it
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if native == "1" or want_cuda == "1":
            raise
        print("mhpo-kernels: torch not importable: metadata only, no native backends")
        return [], {}
    if os.name == "nt" and native != "1":
        print("mhpo-kernels: the native backends need GCC or Clang; skipped on Windows")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = "csrc"
    cxx = ["-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno"]
    cpu_sources = [
        os.path.join(csrc, "mhpo_cpu.cpp"),
        os.path.join(csrc, "mhpo_combine.cpp"),
        os.path.join(csrc, "mhpo_fused_grad_plan.cpp"),
        os.path.join(csrc, "cpu", "rows_default.cpp"),
        os.path.join(csrc, "cpu", "rows_avx2.cpp"),
        os.path.join(csrc, "cpu", "rows_avx512.cpp"),
    ]
    exts = [
        cpp_extension.CppExtension(
            "mhpo_kernels._C_cpu",
            cpu_sources,
            include_dirs=[os.path.join(here, csrc)],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp", *_shared_libstdcxx_link_args()],
        )
    ]

    cuda_home = cpp_extension.CUDA_HOME  # $CUDA_HOME, else guessed from the nvcc on the PATH
    no_cuda = _cuda_skip_reason(torch, cuda_home)  # e.g. a wrapper nvcc on the PATH: no toolkit root
    if want_cuda == "1" and no_cuda:
        raise RuntimeError(f"MHPO_BUILD_CUDA=1 but the CUDA extension cannot be built: {no_cuda}")
    if want_cuda != "0" and not no_cuda:
        spec = os.environ.get("MHPO_CUDA_ARCHS", "80;90").replace(",", ";")
        archs = [a.strip() for a in spec.split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
        exts.append(
            cpp_extension.CUDAExtension(
                "mhpo_kernels._C_cuda",
                [os.path.join(csrc, "mhpo_cuda_ops.cpp"), os.path.join(csrc, "mhpo_cuda.cu"),
                 os.path.join(csrc, "mhpo_finish.cu"), os.path.join(csrc, "mhpo_fused_grad_ops.cpp"),
                 os.path.join(csrc, "mhpo_fused_grad.cu")],
                include_dirs=[os.path.join(here, csrc)],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *gencode]},
                extra_link_args=_shared_libstdcxx_link_args(),
            )
        )
        print(f"mhpo-kernels: building the CUDA extension with the toolkit at {cuda_home} (sm {', '.join(archs)})")
    elif want_cuda != "0":
        print(f"mhpo-kernels: NOT building the CUDA extension (CPU backend only): {no_cuda}")
    else:
        print("mhpo-kernels: NOT building the CUDA extension (CPU backend only): MHPO_BUILD_CUDA=0")
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extensions()

TRITON_PACKAGE = "mhpo_kernels.triton_kernels"  # what the source folder triton_kernels/ installs as


def _packages():
    """mhpo_kernels and its subpackages, and the folder triton_kernels/ as ``TRITON_PACKAGE``
    (``package_dir``; listed once even where a mhpo_kernels/triton_kernels folder exists)."""
    own = [p for p in find_packages(include=["mhpo_kernels", "mhpo_kernels.*"])
           if p != TRITON_PACKAGE and not p.startswith(TRITON_PACKAGE + ".")]
    return own + [TRITON_PACKAGE] + [f"{TRITON_PACKAGE}.{p}" for p in find_packages("triton_kernels")]

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as _f:
    _readme = _f.read()

setup(
    name="mhpo-kernels",
    version="0.1.0",
    description="Fused GPU/CPU kernels for the MHPO policy loss (arXiv 2603.16929)",
    long_description=_readme,
    long_description_content_type="text/markdown",
    license="MIT",
    project_urls={"Paper": "https://arxiv.org/abs/2603.16929"},
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Environment :: GPU :: NVIDIA CUDA",
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    # triton_kernels/ installs inside our namespace, as mhpo_kernels.triton_kernels: a top-level
    # triton_kernels would shadow triton-lang's kernel library (PyPI triton-kernels) of the same name
    packages=_packages(),
    package_dir={TRITON_PACKAGE: "triton_kernels"},
    python_requires=">=3.10",  # torch >= 2.11 has no wheels for older Pythons
    # numpy: torch warns on every import without it, and Triton's CPU interpreter needs it
    install_requires=[f"torch>={TORCH_MIN}", "numpy"],
    extras_require={
        "test": ["pytest"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["mhpo-kernels=mhpo_kernels.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
