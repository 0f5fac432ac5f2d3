"""A prefill forward's own cost, learned (flora.forward_cost): the robust line against numpy's
least squares, outliers trimmed, the default until the timings span enough lengths; the engine's
constant pinned (Engine(admit_cost=N), --admit-cost) or learned from its own admits (each forward
timed once, its tokens counted as the model's calls show), on SmolLM2 too."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from test_serve import setup  # noqa: F401
from test_serve_metrics import parse

from flora import FusedLlama
from flora.cli import main
from flora.data import load_tokenizer
from flora.forward_cost import HIGH, LOW, MIN_POINTS, PER_BIN, SKIP, ForwardCostFit, robust_line
from flora.generation import ADMIT_FORWARD_TOKENS, Sampling
from flora.serve import Engine, Request


def _timings(rng, n: int, fixed: float, per_token: float, noise: float) -> tuple:
    """n forwards of 1 .. 512 tokens (log-uniform), time = fixed + per_token * tokens, times a
    Gaussian factor 1 +- noise."""
    x = np.unique(np.exp(rng.uniform(0, np.log(512), 4 * n)).round().astype(int))[:n]
    rng.shuffle(x)
    y = (fixed + per_token * x) * (1 + rng.normal(0, noise, len(x)))
    return x, y


def _lstsq(x, y) -> np.ndarray:
    return np.linalg.lstsq(np.c_[np.ones(len(x)), x], y, rcond=None)[0]


def test_robust_line_is_least_squares_on_clean_timings():
    """Timings with small noise (1%, within the 5% trim floor): nothing trimmed, the line numpy's
    lstsq gives; noisier ones (3%): a few of the Gaussian tail trimmed at most (a tenth), least
    squares on the rest, near lstsq over all; exact timings give the line exactly."""
    rng = np.random.default_rng(0)
    for fixed, per_token in ((0.030, 0.001), (0.017, 0.0013), (0.004, 8e-6)):
        x, y = _timings(rng, 60, fixed, per_token, 0.01)
        a, b, kept = robust_line(x.tolist(), y.tolist())
        assert all(kept)
        np.testing.assert_allclose([a, b], _lstsq(x, y), rtol=1e-9)
        assert abs(a / b - fixed / per_token) < 0.1 * fixed / per_token
        x, y = _timings(rng, 60, fixed, per_token, 0.03)
        a, b, kept = robust_line(x.tolist(), y.tolist())
        k = np.array(kept)
        assert k.sum() >= 54
        np.testing.assert_allclose([a, b], _lstsq(x[k], y[k]), rtol=1e-9)
        ref = _lstsq(x, y)
        assert abs(a / b - ref[0] / ref[1]) < 0.1 * ref[0] / ref[1]
        a, b, kept = robust_line(x.tolist(), (fixed + per_token * x).tolist())
        assert all(kept) and abs(a - fixed) < 1e-12 and abs(b - per_token) < 1e-15
    with pytest.raises(ValueError, match="two distinct token counts"):
        robust_line([8, 8], [0.1, 0.2])
    with pytest.raises(ValueError, match="> 0 seconds"):
        robust_line([1, 8], [0.1, 0.0])


def test_robust_line_trims_stalls_and_a_first_call():
    """A fifth of the timings stalled 1.5-10x (another process, a GC pause) and the first 40x (a
    process's first forward): those are trimmed (hardly a clean one), the rest fitted by least
    squares (numpy's on the kept timings), while least squares over all of them misses the line by far."""
    rng = np.random.default_rng(1)
    fixed, per_token = 0.030, 0.001
    for _ in range(20):
        x, y = _timings(rng, 50, fixed, per_token, 0.01)
        bad = rng.choice(len(x), 10, replace=False)
        dirty = y.copy()
        dirty[bad] *= rng.uniform(1.5, 10, len(bad))
        dirty[0], bad = dirty[0] * 40, np.union1d(bad, [0])
        a, b, kept = robust_line(x.tolist(), dirty.tolist())
        clean = np.ones(len(x), bool)
        clean[bad] = False
        k = np.array(kept)
        assert not (k & ~clean).any() and (clean & ~k).sum() <= 2  # every stall out, hardly a clean one
        np.testing.assert_allclose([a, b], _lstsq(x[k], y[k]), rtol=1e-9)
        assert abs(a / b - 30) < 3
        a_all, b_all = _lstsq(x, dirty)  # (its ratio may land near by chance, its line does not)
        assert max(abs(a_all / fixed - 1), abs(b_all / per_token - 1)) > 0.5


def test_fit_waits_for_spread_then_learns():
    """ForwardCostFit: the first SKIP timings never count; the default until MIN_POINTS timings
    span 4x in tokens (a run of like lengths leaves it there); then fixed / per-token, clamped,
    the latest PER_BIN of a power-of-two bucket kept."""
    line = lambda n: 0.030 + 0.001 * n  # noqa: E731 - 30 tokens
    f = ForwardCostFit(13)
    f.add(5, 60.0)  # a first call's set-up (skipped however slow)
    f.add(300, 0.001)
    for n in [100, 120, 150, 180, 200, 240, 260, 300, 350, 399] * 2:  # spread < 4x
        f.add(n, line(n))
        assert f.forward_tokens() == 13 and not f.learned
    assert len(f.points()) == 20 and f.timed_forwards == 22
    f.add(20, line(20))  # 20 .. 399: spread, enough points
    assert f.forward_tokens() == 30 and f.learned
    assert abs(f.fixed_s - 0.030) < 1e-9 and abs(f.per_token_s - 0.001) < 1e-12
    for _ in range(40):  # one bucket keeps its latest PER_BIN
        f.add(20, line(20))
    assert sum(n == 20 for n, _ in f.points()) == PER_BIN
    # clamped: a forward costing nothing of its own (negative intercept: noise) and one costing more
    for fixed, want in ((-0.002, LOW), (10.0, HIGH), (0.3, 300)):
        g = ForwardCostFit(13, skip=0)
        for n in [4, 8, 16, 32, 64, 128, 256, 512][:MIN_POINTS]:
            g.add(n, fixed + 0.001 * n)
        assert g.forward_tokens() == want and g.learned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events")
def test_cuda_timings_are_read_without_a_sync():
    """On CUDA a forward is timed by two events; the fit reads them once the stream has passed them
    (Event.query), never waiting: after a synchronize every timing is in, each the events' own."""
    f = ForwardCostFit(512, skip=0)
    a = torch.randn(2048, 2048, device="cuda")
    for n in (1, 8, 64, 256, 512, 1, 8, 64, 256, 512):
        t0 = f.clock("cuda")
        for _ in range(n // 8 + 1):
            a @ a
        f.timed(t0, f.clock("cuda"), n)
    torch.cuda.synchronize()
    f.forward_tokens()
    assert len(f.points()) == 10 and all(s > 0 for _, s in f.points()) and not f._pending


def test_pinned_admit_cost_and_its_validation(setup, capsys):  # noqa: F811
    """Engine(admit_cost=N): the grouping's constant is N however many admits run, GET /metrics
    shows it as pinned; bad values are a ValueError, --admit-cost's a one-line error."""
    _, ckpt, _ = setup
    model, tok = FusedLlama.from_pretrained(str(ckpt)), load_tokenizer(ckpt)
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="admit_cost must be None"):
            Engine(model, tok, {"base": None}, admit_cost=bad)
    eng = Engine(model, tok, {"base": None}, max_batch=2, admit_cost=40).start()
    for n in (3, 12, 40, 3, 12, 40, 3, 12, 40, 50, 50):
        r, = eng.submit([Request("base", list(range(3, 3 + n)), 1, Sampling())])
        while r.events.get(timeout=60)[0] != "done":
            pass
    assert eng.admit_forward_tokens() == 40 and eng.admit_cost_source() == "pinned"
    _, samples = parse(eng.metrics_text())
    assert [(ls, v) for n, ls, v in samples if n == "flora:admit_forward_tokens"] == [({"source": "pinned"}, 40)]
    eng.close()
    eng._worker.join(timeout=60)
    learning = Engine(model, tok, {"base": None})
    _, samples = parse(learning.metrics_text())
    assert [(ls, v) for n, ls, v in samples if n == "flora:admit_forward_tokens"] == \
        [({"source": "default"}, ADMIT_FORWARD_TOKENS)]  # the CPU's, until timings come
    assert main(["serve", "--model", str(ckpt), "--device", "cpu", "--admit-cost", "-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora serve: error:") and "--admit-cost must be >= 0" in err and "\n" not in err


def test_engine_times_each_admit_forward(setup):  # noqa: F811
    """The engine's fit gets one timing a prefill forward, of the tokens it computed: its distinct
    rows (an equal prompt computed once) times its span, as the model's own run_layers calls show
    (bursts joining together in groups of like length), the first SKIP never fitted."""
    from test_serve import counted_prefills

    _, ckpt, _ = setup
    model, tok = FusedLlama.from_pretrained(str(ckpt)), load_tokenizer(ckpt)
    calls = counted_prefills(model)
    eng = Engine(model, tok, {"base": None}, max_batch=8, wait_s=0.5, prefix_cache=0)
    rng = np.random.default_rng(2)
    for burst in ([5], [40], [3, 50, 50, 6], [2, 30, 4], [60, 1, 1, 20, 9]):
        reqs = [Request("base", rng.integers(3, 60, n).tolist(), 1, Sampling()) for n in burst]
        eng.submit(reqs)  # queued at once: one admit (the worker not started yet, or idle)
        if not eng._worker.is_alive():
            eng.start()
        for r in reqs:
            while r.events.get(timeout=60)[0] != "done":
                pass
        while eng.busy:
            time.sleep(0.01)
    fit = eng._admit_fit
    assert fit.timed_forwards == len(calls) > 5  # (bursts split into groups)
    assert sorted(n for n, _ in fit.points()) == sorted(len(rows) * w for rows, w in calls[SKIP:])
    eng.close()
    eng._worker.join(timeout=60)


def test_engine_learns_smollm2s_forward_cost(gguf_path):
    """An engine serving SmolLM2-135M on the CPU, fed real admits (one request at a time, prompts of
    8 .. 256 tokens), learns its constant: from the timings of those admits (their tokens the
    prompts'), once they span 4x, shown in GET /metrics and told once. (How near it comes to
    bench/admit_cost.py's measurement is a bench check, `python bench/admit_cost.py --engine 30`:
    timings on a loaded 2-core machine swing 3-5x, more than any bound a unit test could hold.)"""
    model = FusedLlama.from_pretrained(gguf_path)
    told = []
    eng = Engine(model, load_tokenizer(gguf_path), {"base": None}, max_batch=4, prefix_cache=0)
    eng.on_admit_cost = lambda v, fit: told.append(v)
    eng.start()
    g = torch.Generator().manual_seed(0)
    lengths = [(8, 32, 96, 256)[i % 4] for i in range(24)]
    for n in lengths:
        r, = eng.submit([Request("base", torch.randint(3, 40000, (n,), generator=g).tolist(), 1, Sampling())])
        while r.events.get(timeout=120)[0] != "done":
            pass
    while eng.busy:  # drained: the worker idle, the fit read here
        time.sleep(0.01)
    learned = eng.admit_forward_tokens()
    assert sorted(n for n, _ in eng._admit_fit.points()) == sorted(lengths[SKIP:])
    assert eng.admit_cost_source() == "learned" and len(told) == 1 and LOW <= learned <= HIGH
    _, samples = parse(eng.metrics_text())
    assert [(ls, v) for n, ls, v in samples if n == "flora:admit_forward_tokens"] == [({"source": "learned"}, learned)]
    eng.close()
    eng._worker.join(timeout=60)
