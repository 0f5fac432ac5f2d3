"""Builds flora._C against the torch that is already installed.

Install with build isolation off, so the build uses that torch and never
downloads a second one:  pip install --no-build-isolation .

Environment:
  FLORA_CUDA=1|0         force or disable the CUDA sources (default: built when
                         the installed torch has CUDA and nvcc is found)
  FLORA_CUTLASS_DIR      CUTLASS headers (default third_party/cutlass, fetched by
                         tools/fetch_cutlass.sh); without them the CUDA build has
                         no custom kernels (cuBLAS only)
  FLORA_KERNEL_ARCHS     which kernel TUs to build: "80;90" (default), "90", "80"
  CUDA_HOME              the toolkit (default: torch's guess from nvcc on the
                         PATH, corrected when that nvcc is a wrapper script)
  MAX_JOBS               parallel compile jobs (torch's ninja builder)
  FLORA_DEBUG_INFO=1     keep -g (Python's CFLAGS; dropped by default)

The kernel TUs (csrc/cuda/kernels/*.cu, no torch) are compiled here with
nvcc, each for its own arch (*_sm90_* -> sm_90a, *_sm80_* -> sm_80, the rest
-> sm_80 + sm_90a), with -Xptxas -v logged beside each object in
build/flora_kernels/ (tools/check_cuda_kernels.py reads the logs and SASS).
"""
import glob
import os
import re
import resource
import shlex
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

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


def has_cudart(home):
    pats = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*")
    return any(glob.glob(os.path.join(home, p)) for p in pats)


def resolve_cuda_home():
    """torch takes CUDA_HOME from the grandparent of `which nvcc`. An nvcc that
    is a wrapper script (/usr/local/bin/nvcc: exec /usr/local/cuda-13.0/bin/nvcc)
    then gives /usr/local, which has no libcudart, and the link fails. When
    CUDA_HOME is not set and torch's guess has no libcudart, ask nvcc where its
    toolkit is (`nvcc --dryrun` prints TOP=<toolkit>/bin/..)."""
    home = cpp_extension.CUDA_HOME
    if torch.version.cuda is None or home is None:
        return
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if has_cudart(home):
        return
    try:
        out = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--dryrun", "-x", "cu", "-c",
             os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    top = os.path.realpath(m.group(1).strip()) if m else None
    if top and top != home and has_cudart(top):
        print(f"flora: CUDA_HOME={top} (nvcc's toolkit; {home} has no libcudart)")
        cpp_extension.CUDA_HOME = top
        os.environ["CUDA_HOME"] = top


def want_cuda():
    resolve_cuda_home()
    flag = os.environ.get("FLORA_CUDA", "").strip()
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag == "1" and not have:
        sys.exit(
            "FLORA_CUDA=1 but the installed torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found "
            f"(CUDA_HOME={cpp_extension.CUDA_HOME})."
        )
    return have if flag == "" else flag == "1"


def cutlass_dir():
    d = os.environ.get("FLORA_CUTLASS_DIR") or os.path.join(ROOT, "third_party", "cutlass")
    return d if os.path.isfile(os.path.join(d, "include", "cutlass", "version.h")) else None


KERNEL_DIR = os.path.join(ROOT, "build", "flora_kernels")


def kernel_gencode(src):
    """-gencode flags of one kernel TU, from its name (the -arch=sm_90a
    shorthand would add a compute_90 pass that rejects wgmma)."""
    name = os.path.basename(src)
    sm80 = ["-gencode=arch=compute_80,code=sm_80"]
    sm90 = ["-gencode=arch=compute_90a,code=sm_90a"]
    if "_sm90" in name:
        return sm90
    if "_sm80" in name:
        return sm80
    return sm80 + sm90


def kernel_sources():
    archs = os.environ.get("FLORA_KERNEL_ARCHS", "80;90").split(";")
    out = []
    for src in sources("csrc/cuda/kernels/*.cu"):
        name = os.path.basename(src)
        if ("_sm90" in name and "90" not in archs) or ("_sm80" in name and "80" not in archs):
            continue
        out.append(src)
    return out


def kernel_flags(cutlass):
    return [
        "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo",
        "-Xcompiler=-fPIC", "-Xptxas=-v",
        "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1",
        f"-I{os.path.join(cutlass, 'include')}",
        f"-I{os.path.join(cutlass, 'tools', 'util', 'include')}",
        f"-I{os.path.join(ROOT, 'csrc')}",
    ]


def local_includes(path, seen=None):
    """`path` and the project headers it includes, transitively (#include "x")."""
    seen = set() if seen is None else seen
    if path in seen or not os.path.isfile(path):
        return seen
    seen.add(path)
    with open(path) as f:
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read(), re.M):
            for base in (os.path.dirname(path), os.path.join(ROOT, "csrc")):
                local_includes(os.path.normpath(os.path.join(base, name)), seen)
    return seen


def compile_kernels(nvcc, cutlass):
    """Compile each kernel TU (skipped when its object is newer than it and
    every header under csrc/cuda/kernels); returns the object paths."""
    os.makedirs(KERNEL_DIR, exist_ok=True)
    jobs = []
    for src in kernel_sources():
        obj = os.path.join(KERNEL_DIR, os.path.basename(src)[:-3] + ".o")
        full = os.path.join(ROOT, src)
        newest = max(os.path.getmtime(f) for f in local_includes(full))
        if os.path.exists(obj) and os.path.getmtime(obj) > newest:
            jobs.append((obj, None))
            continue
        cmd = [nvcc, *kernel_gencode(src), *kernel_flags(cutlass), "-c", full, "-o", obj]
        jobs.append((obj, cmd))

    def build(job):
        obj, cmd = job
        if cmd is None:
            return obj
        t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
        with open(obj[:-2] + ".ptxas.log", "w") as f:
            f.write(" ".join(shlex.quote(c) for c in cmd) + "\n" + r.stdout + r.stderr)
            # CPU seconds are this TU's alone only with MAX_JOBS=1.
            f.write(f"# compile seconds: {time.time() - t0:.1f} wall, {cpu:.1f} cpu\n")
        if r.returncode != 0:
            sys.stderr.write(r.stdout + r.stderr)
            raise RuntimeError(f"nvcc failed on {obj}")
        return obj

    workers = max(1, int(os.environ.get("MAX_JOBS", "1")))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(build, jobs))


def plain_build_temp():
    """The object folder of `pip install .` (setuptools' default)."""
    tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    return os.path.join(ROOT, "build", f"temp.{tag}")


class BuildExt(cpp_extension.BuildExtension):
    def finalize_options(self):
        super().finalize_options()
        # setuptools gives an editable install a fresh temporary object folder,
        # so `pip install -e .` after `pip install .` recompiled everything:
        # share the folder `pip install .` uses (ninja still recompiles
        # whatever changed: sources, headers or the compile command).
        if getattr(self, "editable_mode", False):
            self.build_temp = plain_build_temp()

    def build_extensions(self):
        if os.environ.get("FLORA_DEBUG_INFO") != "1":
            # Python's own CFLAGS carry -g: debug info for every torch header made
            # the torch-facing TUs compile ~40% longer (and the .so far larger).
            self.compiler.set_executable("compiler_so", [f for f in self.compiler.compiler_so if f != "-g"])
        cutlass = cutlass_dir()
        for ext in self.extensions:
            if cutlass and "-DFLORA_WITH_CUTLASS" in ext.extra_compile_args.get("cxx", []):
                nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
                ext.extra_objects = list(ext.extra_objects or []) + compile_kernels(nvcc, cutlass)
        super().build_extensions()


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
    defines = ["-DFLORA_WITH_CUDA"]
    if cutlass_dir():
        defines.append("-DFLORA_WITH_CUTLASS")
        tus = kernel_sources()
        defines += [f"-DFLORA_HAVE_SM{a}" for a in ("80", "90") if any(f"_sm{a}" in t for t in tus)]
    else:
        print("flora: no CUTLASS headers (tools/fetch_cutlass.sh or FLORA_CUTLASS_DIR): "
              "CUDA build without custom kernels", file=sys.stderr)
    # The torch glue (csrc/cuda/*.cpp) is host code: the C++ compiler builds it
    # with the CUDA headers, nvcc only the kernel TUs (compile_kernels).
    return cpp_extension.CUDAExtension(
        "flora._C",
        srcs + sources("csrc/cuda/*.cpp"),
        extra_compile_args={"cxx": cxx + defines},
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
    cmdclass={"build_ext": BuildExt},
)
