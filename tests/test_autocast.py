"""Mixed precision: the flora ops follow autocast (the autocast dtype, as
torch.mm does), so bf16-autocast training of lora, ffba and zflora runs on
fp32 checkpoints and agrees with fp32 training within bf16 tolerance."""
import json

import pytest
import torch

from _train_helpers import records
from flora import AdapterConfig, FusedLlama, ops
from flora.data import TokenizedDataset, collate, pad_id_of
from flora.train import TrainConfig, train

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def rand(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


def operands(op, device, dtype=torch.float32, M=5, K=24, N=16, R=4):
    x, z = rand(M, K, device=device, dtype=dtype), rand(M, R, device=device, dtype=dtype)
    W, A, B, C = (rand(*s, device=device, dtype=dtype) for s in ((N, K), (R, K), (N, R), (R, R)))
    res = rand(M, N, device=device, dtype=dtype)
    return {"ffl": (x, W, A, 0.5, [N], R, z),
            "fbl": (x, z, W, B, 0.5, res, True),
            "ffbl": (x, z, W, B, A, C, 0.5, res, True)}[op]


def cast(args, dtype):
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["ffl", "fbl", "ffbl"])
def test_ops_run_in_the_autocast_dtype(op, dtype, device):
    args = operands(op, device)
    fn = getattr(torch.ops.flora, op)
    with torch.autocast(device, dtype=dtype):
        got = fn(*args)
        # the bug this fixes: a low-precision activation next to fp32 weights
        mixed = fn(*((args[0].to(dtype),) + args[1:]))
    assert got.dtype == dtype and mixed.dtype == dtype
    want = fn(*cast(args, dtype))  # the op on operands cast by hand, outside autocast
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(mixed, want, rtol=0, atol=0)
    # and close to fp64 within the low precision's rounding
    ref = ops.REFERENCES[op](*cast(args, torch.float64)).to(dtype).double()
    assert (got.double() - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("op", ["ffl", "fbl", "ffbl"])
def test_autocast_leaves_fp64_alone_and_grads_keep_the_leaf_dtype(op):
    args = operands(op, "cpu", torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert getattr(torch.ops.flora, op)(*args).dtype == torch.float64  # as torch.mm: fp64 is not cast
    leaves = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) else a
                   for a in operands(op, "cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = getattr(torch.ops.flora, op)(*leaves)
    out.float().square().sum().backward()
    for a in leaves:
        if isinstance(a, torch.Tensor):
            assert a.grad is not None and a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


def model(ckpt, variant):
    torch.manual_seed(0)
    m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig(variant, 4, 8.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B and C, so every adapter tensor gets a gradient
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def loss_and_grads(m, batch, autocast):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = m(**batch).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["lora", "ffba", "zflora"])
def test_bf16_autocast_step_matches_fp32(ckpt, tok, variant):
    m = model(ckpt, variant)
    ds = TokenizedDataset(records(n=4), tok, 32)
    batch = collate([ds[i] for i in range(4)], pad_id_of(tok))
    loss16, g16 = loss_and_grads(m, batch, True)
    loss32, g32 = loss_and_grads(m, batch, False)
    assert torch.isfinite(loss16)
    torch.testing.assert_close(loss16, loss32, rtol=3e-2, atol=3e-2)
    assert g16.keys() == g32.keys() and g16
    for n in g32:
        a, b = g16[n], g32[n]
        assert a.dtype == torch.float32, n  # fp32 master weights get fp32 grads
        assert torch.isfinite(a).all() and a.abs().max() > 0, n
        rel = (a - b).norm() / b.norm()
        assert rel < 0.1, (n, rel.item())  # bf16: ~3 significant digits per product


@pytest.mark.parametrize("variant", ["lora", "ffba", "zflora"])
def test_bf16_autocast_training_tracks_fp32(ckpt, tok, variant):
    cfg = dict(lr=1e-2, max_steps=6, batch_size=4, seq_len=32, progress=False, max_grad_norm=None,
               lr_schedule="constant")
    res = {}
    for bf16 in (True, False):
        m = model(ckpt, variant)
        res[bf16] = train(m, tok, records(n=32), None, TrainConfig(bf16=bf16, **cfg))
    l16 = torch.tensor([h["loss"] for h in res[True].history])
    l32 = torch.tensor([h["loss"] for h in res[False].history])
    assert torch.isfinite(l16).all() and l16[-1] < l16[0]
    torch.testing.assert_close(l16, l32, rtol=5e-2, atol=5e-2)


def test_cli_train_bf16_on_cpu(ckpt, tmp_path):
    from flora.cli import main
    from flora.synthetic import write_jsonl

    data = write_jsonl(records(n=16), tmp_path / "train.jsonl")
    out = tmp_path / "out"
    argv = ["train", "--model", str(ckpt), "--data", str(data), "--variant", "zflora", "--rank", "4",
            "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--seq-len", "32", "--bf16", "on",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in log["history"])
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(out / "adapter"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in m.adapter_state_dict().values())
