"""Host time per flora op call, against torch.mm on the same data.

    python bench/host_overhead.py [--reps 2000] [--rounds 15] [--json out.json]

Tiny operands (M=1, K=N=64, R=4) so the call is all host work: the
dispatcher, the autograd layer and argument checks, not the GEMM. Each
round times every (mode, op) pair once, in one interleaved order, so a
noisy neighbour hits them alike; the table gives medians over rounds of the
per-call mean in microseconds of this thread's CPU time (time.thread_time,
one torch thread): host overhead is CPU work, and on a shared machine wall
time mostly measures the other tenants (--wall times wall clock instead).
Modes:

  no_grad         torch.no_grad(): the Autograd key is still visited
  inference_mode  torch.inference_mode(): the Autograd key is skipped
  grad            inputs require grad: the op records its backward node

--python-autograd re-registers the Python autograd formulas of flora/ops.py
over the compiled (C++) Autograd kernels, i.e. the dispatch path of builds
before the autograd moved to C++: run the script with and without it
(alternately, a few times) for a before/after on the same build.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

import flora
from flora import ops


def cases(grad: bool):
    M, K, N, R = 1, 64, 64, 4
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    x, W, A, B, C, z = t(M, K), t(N, K), t(R, K), t(N, R), t(R, R), t(M, R)
    return {
        "torch.mm": lambda: torch.mm(x, W.t()),
        "flora.ffl": lambda: torch.ops.flora.ffl(x, W, A, 1.0, [], 0, None),
        "flora.fbl": lambda: torch.ops.flora.fbl(x, z, W, B, 1.0, None, False),
        "flora.ffbl": lambda: torch.ops.flora.ffbl(x, z, W, B, A, C, 1.0, None, False),
        "ops.ffl (wrapper)": lambda: ops.ffl(x, W, A),
    }


MODES = {
    "no_grad": (torch.no_grad, False),
    "inference_mode": (torch.inference_mode, False),
    "grad": (contextlib.nullcontext, True),
}


CLOCK = time.thread_time


def per_call_us(fn, ctx, reps):
    with ctx():
        t0 = CLOCK()
        for _ in range(reps):
            fn()
        return (CLOCK() - t0) / reps * 1e6


def use_python_autograd():
    """The pre-C++ registration: torch.library.register_autograd with the
    formulas in flora/ops.py (overrides the C++ Autograd kernel; torch warns)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in ops.OPS:
            torch.library.register_autograd(f"flora::{op}", getattr(ops, f"_{op}_backward"),
                                            setup_context=getattr(ops, f"_{op}_setup"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2000, help="calls per timing")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median over them)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--python-autograd", action="store_true",
                   help="time the Python autograd registration (the path before the C++ one)")
    p.add_argument("--wall", action="store_true", help="time wall clock, not thread CPU time")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if a.wall else time.thread_time
    torch.set_num_threads(a.threads)
    if a.python_autograd:
        use_python_autograd()
    jobs = [(m, name, fn, MODES[m][0]) for m in MODES for name, fn in cases(MODES[m][1]).items()]
    for _, _, fn, ctx in jobs:  # warm-up (first-call lookups, allocator)
        per_call_us(fn, ctx, 200)
    samples = {(m, name): [] for m, name, _, _ in jobs}
    for _ in range(a.rounds):
        for m, name, fn, ctx in jobs:
            samples[(m, name)].append(per_call_us(fn, ctx, a.reps))
    med = {k: statistics.median(v) for k, v in samples.items()}
    info = flora.info()
    print(f"torch {torch.__version__}, flora extension: {info['extension']}, "
          f"{platform.processor() or platform.machine()}, threads {a.threads}, autograd: "
          f"{'Python (torch.library.register_autograd)' if a.python_autograd else 'as built'}, "
          f"clock: {'wall' if a.wall else 'thread CPU time'}")
    names = list(cases(False))
    print(f"{'op':<20}" + "".join(f"{m:>16}" for m in MODES))
    for name in names:
        print(f"{name:<20}" + "".join(f"{med[(m, name)]:>13.2f} us" for m in MODES))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": a.threads, "python_autograd": a.python_autograd,
                       "clock": "wall" if a.wall else "thread_time",
                       "median_us": {f"{m}/{n}": v for (m, n), v in med.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
