"""Builds flora._C against the torch that is already installed.

Install with build isolation off, so the build uses that torch and never
downloads a second one:  pip install --no-build-isolation .

Environment:
  FLORA_CUDA=1|0         force or disable the CUDA sources (default: built when
                         the installed torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default "8.0;9.0")
  MAX_JOBS               parallel compile jobs (torch's ninja builder)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # build isolation on, or torch not installed yet
    sys.exit(
        "flora builds against an installed torch: install torch first, then "
        "run `pip install --no-build-isolation .` (build isolation would "
        "download a second torch)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )


def want_cuda():
    flag = os.environ.get("FLORA_CUDA", "").strip()
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "1" and not have:
        sys.exit(
            "FLORA_CUDA=1 but the installed torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found "
            f"(CUDA_HOME={cpp_extension.CUDA_HOME})."
        )
    return have if flag == "" else flag == "1"


def extension():
    # -fopenmp: at::parallel_for is inline and runs serially unless this
    # translation unit is compiled with OpenMP (torch ships the runtime).
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    srcs = (
        sources("csrc/common/**/*.cpp")
        + sources("csrc/cpu/**/*.cpp")
        + ["csrc/python/module.cpp"]
    )
    if not want_cuda():
        return cpp_extension.CppExtension(
            "flora._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    defines = ["-DFLORA_WITH_CUDA", f'-DFLORA_CUDA_ARCHS="{archs}"']
    return cpp_extension.CUDAExtension(
        "flora._C",
        srcs + sources("csrc/cuda/**/*.cu") + sources("csrc/cuda/**/*.cpp"),
        extra_compile_args={
            "cxx": cxx + defines,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines,
        },
        extra_link_args=link,
    )


def version():
    ns = {}
    with open(os.path.join(ROOT, "flora", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


setup(
    name="flora",
    version=version(),
    packages=find_packages(include=["flora", "flora.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
