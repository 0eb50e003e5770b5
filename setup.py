"""Build script. The Python packages always install; the native extension
(csrc/) is added by ``_native_extensions()``."""
import os
import sys

from setuptools import find_packages, setup


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
        print("mhpo-kernels: torch not importable, building without the native backends")
        return [], {}
    if os.name == "nt" and native != "1":
        print("mhpo-kernels: the native backends need GCC or Clang; skipped on Windows")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = "csrc"
    cxx = ["-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno"]
    cpu_sources = [
        os.path.join(csrc, "mhpo_cpu.cpp"),
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
    nvcc = bool(cuda_home) and all(
        os.path.exists(os.path.join(cuda_home, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime_api.h"))
    )  # a wrapper nvcc on the PATH makes torch guess a folder that is no toolkit root
    if want_cuda == "1" and not (nvcc and torch.version.cuda):
        raise RuntimeError(
            "MHPO_BUILD_CUDA=1 but no usable CUDA toolkit: set CUDA_HOME to the toolkit root "
            f"(found {cuda_home!r}) and use a CUDA build of torch (torch.version.cuda={torch.version.cuda})"
        )
    if want_cuda != "0" and nvcc and torch.version.cuda:
        archs = [a.strip() for a in os.environ.get("MHPO_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
        exts.append(
            cpp_extension.CUDAExtension(
                "mhpo_kernels._C_cuda",
                [os.path.join(csrc, "mhpo_cuda_ops.cpp"), os.path.join(csrc, "mhpo_cuda.cu")],
                include_dirs=[os.path.join(here, csrc)],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *gencode]},
                extra_link_args=_shared_libstdcxx_link_args(),
            )
        )
    elif want_cuda != "0":
        print("mhpo-kernels: no CUDA toolkit (CUDA_HOME) or CPU-only torch: building the CPU backend only")
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extensions()

setup(
    name="mhpo-kernels",
    version="0.1.0",
    description="Fused GPU/CPU kernels for the MHPO policy loss (arXiv 2603.16929)",
    packages=find_packages(include=["mhpo_kernels", "mhpo_kernels.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest", "numpy"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["mhpo-kernels=mhpo_kernels.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
