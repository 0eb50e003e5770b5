"""Build script. The Python packages always install; the native extension
(csrc/) is added by ``_native_extensions()``."""
from setuptools import find_packages, setup


def _native_extensions():
    return [], {}


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
