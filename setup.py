"""Build of the fastunlearn._C extension.

* CUDA torch and nvcc present  -> CUDAExtension: C++ CPU ops + csrc/cuda kernels.
* otherwise                    -> CppExtension: the C++ CPU ops only.
* FASTUNLEARN_SKIP_NATIVE=1    -> no native code; the package runs on reference.py/Triton.
* FASTUNLEARN_FORCE_CPU=1      -> CppExtension even where CUDA could be built.
The reason for the choice is printed, and a failed native build never fails the install
of the pure-Python package unless FASTUNLEARN_REQUIRE_NATIVE=1.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SUBPACKAGES = ["cli", "data", "engine", "eval", "nn", "ops", "runtime"]
PACKAGES = ["fastunlearn", "fastunlearn.kernels"] + [f"fastunlearn.{p}" for p in SUBPACKAGES]
PACKAGE_DIR = {"fastunlearn": "python/fastunlearn", "fastunlearn.kernels": "kernels",
               **{f"fastunlearn.{p}": f"python/fastunlearn/{p}" for p in SUBPACKAGES}}


def log(msg):
    print(f"[fastunlearn setup] {msg}", file=sys.stderr)


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def native_extension():
    if os.environ.get("FASTUNLEARN_SKIP_NATIVE") == "1":
        log("FASTUNLEARN_SKIP_NATIVE=1: building no native code")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        log("torch is not importable at build time: building no native code "
            "(install torch first, then pip install --no-build-isolation .)")
        return [], {}

    cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                       + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_torch.cpp")))
    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if os.environ.get("FASTUNLEARN_FORCE_CPU") == "1":
        use_cuda, why = False, "FASTUNLEARN_FORCE_CPU=1"
    elif torch.version.cuda is None:
        use_cuda, why = False, f"torch {torch.__version__} is a CPU build"
    elif not nvcc or not os.path.exists(nvcc):
        use_cuda, why = False, "nvcc not found (set CUDA_HOME)"
    else:
        use_cuda, why = True, f"torch CUDA {torch.version.cuda}, nvcc at {nvcc}"
    log(("building CUDA + CPU extension: " if use_cuda else "building CPU-only extension: ") + why)

    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    arch = os.environ.get("FASTUNLEARN_CPU_ARCH", "native")
    if arch:
        cxx.append(f"-march={arch}")
    include = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastunlearn._C", cpu_sources + cuda_sources, include_dirs=include,
            define_macros=[("FASTUNLEARN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("fastunlearn._C", cpu_sources, include_dirs=include,
                                         extra_compile_args=cxx, extra_link_args=["-fopenmp"])

    class Build(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as e:  # keep the pure-Python package installable
                if os.environ.get("FASTUNLEARN_REQUIRE_NATIVE") == "1":
                    raise
                log(f"native build failed, continuing without it: {e}")

    return [ext], {"build_ext": Build.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = native_extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
