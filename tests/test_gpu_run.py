"""bench/gpu_run.sh's dry run (GPU_RUN_DRY=1): the default is one call of
the quick stages, each with its own timeout, the summary table last."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["build", "cuda-kernels", "test-cuda", "attention", "latency-1b", "kernels-short", "step-profile"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def dry(tmp_path, *stages, root=ROOT, **env):
    e = dict(os.environ, GPU_RUN_DRY="1", OUT=str(tmp_path / "out"))
    # the defaults under test, not the caller's (CI exports MAX_JOBS=2)
    for k in ("GPU_RUN_BUDGET", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "FLORA_KERNEL_ARCHS"):
        e.pop(k, None)
    e.update(env)
    p = subprocess.run(["bash", str(root / "bench" / "gpu_run.sh"), *stages], capture_output=True, text=True,
                       env=e, timeout=120)
    return p, p.stdout


def table(out):
    lines = out.rstrip().splitlines()
    i = max(k for k, line in enumerate(lines) if line.startswith("stage ") and "status" in line)
    return lines[i + 1:], lines


def test_default_is_one_quick_call(tmp_path):
    p, out = dry(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    rows, lines = table(out)
    # the summary table is the last thing printed: one row per quick stage, all dry
    assert [r.split()[0] for r in rows] == QUICK
    assert all(r.split()[1] == "dry" for r in rows)
    assert "budget 480s" in out  # one call of ~7 minutes, under the 600 s limit
    # each stage has its own timeout, none past the budget
    caps = [int(c) for c in re.findall(r"== stage \S+ \(at most (\d+)s\)", out)]
    assert len(caps) == len(QUICK) and all(0 < c <= 480 - 20 for c in caps)  # budget - reserve
    assert "MAX_JOBS=16" in out and "TORCH_CUDA_ARCH_LIST=9.0a" in out
    assert "pip install --no-deps --no-build-isolation" in out
    assert re.search(r"pytest tests .*-m cuda", out)
    # the issue's latency rows, the goals' variants first (a cap cuts the last ones)
    assert re.search(r"-m flora bench latency --device cuda --model 1b .*--batch 1 8 --prompt 512 .*"
                     r"--rows base ffba zflora pf-lora lora transformers peft peft-merged", out)
    assert re.search(r"bench/kernels.py --device cuda --models llama-3.2-1b", out)
    assert re.search(r"bench/attention.py --device cuda --shapes 1b --batch 1 8 --seq 512 2048", out)
    assert re.search(r"bench/step_profile.py --device cuda --model 1b --variants base ffba zflora --batch 1 8", out)
    assert "FLORA_CUDA_KERNELS=1" in out
    # results land in $OUT stage by stage: a log per stage and the summary
    names = {f.name for f in (tmp_path / "out").iterdir()}
    assert {f"{s}.log" for s in QUICK} | {"summary.txt"} <= names


def test_cuda_kernels_stage_tests_memchecks_and_switches_the_kernels_on(tmp_path):
    """The kernel tests run once (cuda-kernels, not test-cuda); memcheck runs
    named cases that exist in the test file; the stages after it run the
    kernels once it passed, and the summary says so."""
    p, out = dry(tmp_path, "test-cuda", "cuda-kernels", "kernels-short")
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"pytest tests .*-m cuda .*--ignore=tests/test_cuda_kernels.py", out)
    assert re.search(r"\+ .*pytest tests/test_cuda_kernels.py .*-m cuda", out)
    assert any("compute-sanitizer --tool racecheck" in l for l in out.splitlines())
    line = next(l for l in out.splitlines() if "compute-sanitizer --tool memcheck" in l)
    ids = [i.replace("\\", "") for i in re.findall(r"tests/test_cuda_kernels.py::(\S+)", line)]
    assert len(ids) >= 8
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_cuda_kernels.py")], capture_output=True, text=True, cwd=ROOT).stdout
    assert set(ids) <= {l.split("::", 1)[1] for l in collected.splitlines() if "::" in l}
    assert "flora CUDA kernels in the benchmarks: on in the kernel sweeps (cuda-kernels passed)" in out
    assert "as if verified (FLORA_CUDA_ASSUME_VERIFIED=all)" in out
    p, out = dry(tmp_path, "cuda-kernels", GPU_RUN_KERNELS="0")
    assert "flora CUDA kernels in the benchmarks: off (GPU_RUN_KERNELS=0)" in out


def test_unknown_stage_is_a_clear_error(tmp_path):
    p, _ = dry(tmp_path, "bogus")
    assert p.returncode == 2 and "unknown stage 'bogus'" in p.stderr


def test_stage_caps_can_be_overridden(tmp_path):
    p, out = dry(tmp_path, "generate", CAP_generate="33")
    assert p.returncode == 0
    assert "== stage generate (at most 33s)" in out


def test_generate_smoke_script_on_cpu(tmp_path):
    # the device script's generation stage, run here without graphs (cuda: + graph == eager)
    import json
    import sys

    out = tmp_path / "g.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "generate_smoke.py"), "--device", "cpu",
                        "--tokens", "3", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["ok"] and [r["case"] for r in d["results"]] == [
        "float32 base: eager == transformers", "bfloat16 base: eager == transformers"]
    assert d["results"][0]["equal"]


def _functions(*names):
    """bench/gpu_run.sh's shell functions ``names``, as text to run in bash."""
    body = (ROOT / "bench" / "gpu_run.sh").read_text()
    return "\n".join(re.search(rf"^{name}\(\) {{(?:[^\n]*}}\n|\n.*?^}}\n)", body, re.S | re.M).group(0)
                     for name in names)


def test_sanitize_verdicts(tmp_path):
    """sanitize (cuda-kernels, sanitize stages): the sanitizer's summary line when
    clean, the pytest status when a test fails; a stand-in compute-sanitizer
    (no GPU here) runs the command it is given and prints its summary."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fake = bin_ / "compute-sanitizer"
    fake.write_text("#!/usr/bin/env bash\nshift 6\n\"$@\"; rc=$?\n"
                    "echo '========= ERROR SUMMARY: 0 errors'\nexit $rc\n")
    fake.chmod(0o755)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_y.py").write_text("def test_ok(): pass\ndef test_bad(): assert False\n")
    script = _functions("say", "run", "sanitize") + (
        '\nSTATE="$1"; DRY=0; PY="$2"\n'
        'v="$(sanitize memcheck 60 "$STATE/a.log" tests/test_y.py::test_ok)"; echo "clean=$v rc=$?"\n'
        'v="$(sanitize memcheck 60 "$STATE/b.log" tests/test_y.py)"; echo "fail=$v rc=$?"\n')
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}")
    p = subprocess.run(["bash", "-c", script, "x", str(tmp_path), sys.executable], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env)
    assert "clean=ERROR: 0 errors rc=0" in p.stdout, p.stdout + p.stderr
    assert "fail=ERROR: 0 errors, pytest rc 1 rc=1" in p.stdout, p.stdout + p.stderr
    assert "1 passed" in (tmp_path / "a.log").read_text()


def test_a_crashing_test_does_not_hide_the_rest(tmp_path):
    """pytest_survive (the test-cuda stage): when a test kills pytest (an H200
    run's opcheck segfaulted, and nothing after it ran), the run goes on
    without that test and names it."""
    funcs = _functions("say", "run", "pytest_survive", "crash_note")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import os, signal\n"
        "def test_a(): pass\n"
        "def test_b(): os.kill(os.getpid(), signal.SIGSEGV)\n"
        "def test_c(): pass\n")
    script = funcs + (
        '\nSTATE="$1"; DRY=0; PY="$2"\n'
        'pytest_survive "$STATE/log" tests -p no:cacheprovider; echo "rc=$?"\n'
        'echo "note=$(crash_note)"\n')
    p = subprocess.run(["bash", "-c", script, "x", str(tmp_path), sys.executable], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert "rc=0" in p.stdout, p.stdout + p.stderr
    assert "note=; CRASHED (rc >= 128): tests/test_x.py::test_b" in p.stdout
    assert "test_x.py::test_c PASSED" in (tmp_path / "log").read_text()


@pytest.mark.extension  # --aten-too rows switch the extension's kernels off
def test_kernels_md_sets_each_call_against_its_cublas_twin(tmp_path):
    """kernels_md (kernels, kernels-short): with --aten-too rows, a table of each
    flora call over the same call on the ATen / cuBLAS path, per M: the
    evidence measured_faster is widened with. Rows from a real CPU sweep."""
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--device", "cpu", "--models", "1024-wide",
                    "--shapes", "o", "--ms", "1,4", "--ranks", "32", "--dtypes", "float32", "--min-time", "0.001",
                    "--aten-too", "--json", str(out / "kernels-graphs.json")],
                   check=True, capture_output=True, timeout=300)
    script = _functions("say", "kernels_md") + (
        '\nOUT="$1"; STATE="$1"; STAGE=kernels; DRY=0; PY="$2"\nkernels_md\n')
    p = subprocess.run(["bash", "-c", script, "x", str(out), sys.executable], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (out / "kernels.md").read_text()
    assert "flora call / the same call on cuBLAS" in md
    twins = md.split("flora call / the same call on cuBLAS")[1].splitlines()
    for call in ("fbl", "ffbl", "fbl+res", "ffl+z_in+res"):
        row = next(line for line in twins if line.startswith(f"| 1024-wide | o | {call} | float32 |"))
        cells = row.strip("|").split("|")[4:]
        assert len(cells) == 2 and all(float(c) > 0 for c in cells), row
