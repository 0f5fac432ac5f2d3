"""flora.train / flora.finetune / `flora train`: the loop, accumulation, resume,
atomic checkpoints, DDP, transformers.Trainer, exact-match evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_helpers import records
from flora import AdapterConfig, FusedLlama
from flora.data import TokenizedDataset
from flora.evaluate import eval_stats
from flora.train import Interrupted, TrainConfig, train

HERE = Path(__file__).parent


def fused(ckpt, variant="ffba", rank=4, seed=0):
    torch.manual_seed(seed)
    return FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig(variant, rank, 2.0 * rank))


def cfg(**kw):
    base = dict(lr=1e-2, max_steps=6, batch_size=4, seq_len=32, progress=False, max_grad_norm=None)
    return TrainConfig(**{**base, **kw})


def adapter(model):
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


def test_adapter_learns_base_stays_frozen(ckpt, tok):
    model = fused(ckpt)
    base = {k: v.clone() for k, v in model.base_state_dict().items()}
    before = adapter(model)
    ev = TokenizedDataset(records(n=32, split="eval"), tok, 32)
    loss0 = eval_stats(model, ev, tok)["loss"]
    res = train(model, tok, records(n=128), ev, cfg(max_steps=30, eval_every=10, lr_schedule="constant"))
    assert res.steps == 30 and len(res.history) == 30
    assert [e["step"] for e in res.eval_history] == [10, 20, 30]
    assert res.final_eval["loss"] < 0.8 * loss0
    after = model.adapter_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every adapter tensor moved
    for k, v in model.base_state_dict().items():
        assert torch.equal(v, base[k]), f"base weight {k} changed"
    assert res.tokens_per_s > 0


def test_grad_accum_matches_one_big_batch(ckpt, tok):
    # token-weighted loss over the global batch: 2 x 4 accumulated == 1 x 8 (different lengths per micro-batch)
    a, b = fused(ckpt), fused(ckpt)
    ra = train(a, tok, records(n=64), config=cfg(batch_size=8, grad_accum=1))
    rb = train(b, tok, records(n=64), config=cfg(batch_size=4, grad_accum=2))
    torch.testing.assert_close([h["loss"] for h in ra.history], [h["loss"] for h in rb.history], rtol=1e-5, atol=1e-6)
    for k, v in a.adapter_state_dict().items():
        torch.testing.assert_close(b.adapter_state_dict()[k], v, rtol=1e-4, atol=1e-6)


def test_lr_schedule():
    c = TrainConfig(lr=1.0, warmup_steps=4, lr_schedule="cosine")
    assert [c.lr_at(s, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert c.lr_at(4, 14) == 1.0 and abs(c.lr_at(9, 14) - 0.5) < 1e-12 and c.lr_at(14, 14) < 1e-12
    lin = TrainConfig(lr=1.0, lr_schedule="linear")
    assert lin.lr_at(5, 10) == 0.5


def test_epoch_order_groups_by_length():
    import random

    from flora.train import GROUP_BATCHES, epoch_order

    rng = random.Random(0)
    n, gb = 1000, 8
    lengths = [rng.randint(5, 500) for _ in range(n)]
    plain = epoch_order(n, 3, 1)
    # without lengths: the seeded permutation runs before the option kept (their resumes unchanged)
    assert plain == torch.randperm(n, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1)).tolist()
    order = epoch_order(n, 3, 1, lengths, gb)
    assert sorted(order) == list(range(n)) and order == epoch_order(n, 3, 1, lengths, gb)
    assert order != epoch_order(n, 3, 2, lengths, gb)
    full = [order[i:i + gb] for i in range(0, n // gb * gb, gb)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(full) < 0.1 * padding([plain[i:i + gb] for i in range(0, n // gb * gb, gb)])
    pools = [set(plain[p:p + GROUP_BATCHES * gb]) for p in range(0, n, GROUP_BATCHES * gb)]
    assert all(any(set(b) <= pool for pool in pools) for b in full)  # sorted within a pool, not over the data
    assert max(lengths[i] for i in full[0]) == max(lengths[i] for b in full for i in b)  # longest first
    heads = [lengths[b[0]] for b in full[1:]]
    assert heads != sorted(heads, reverse=True)  # the batches shuffled, not a slow length sweep


@pytest.mark.parametrize("group", [False, True])
def test_resume_after_interrupt_equals_uninterrupted(ckpt, tok, tmp_path, group):
    c = cfg(max_steps=7, save_every=2, batch_size=4, grad_accum=2, lr_schedule="cosine", warmup_steps=2,
            group_by_length=group)
    ref = fused(ckpt, "ffba-ab", seed=1)
    r_ref = train(ref, tok, records(n=40), config=c, out_dir=tmp_path / "ref")  # 40 // 8 = 5 steps/epoch: crosses an epoch

    def stop_at_5(step, rec):
        if step == 5:
            raise Interrupted("simulated interruption")

    m1 = fused(ckpt, "ffba-ab", seed=1)
    with pytest.raises(Interrupted):
        train(m1, tok, records(n=40), config=c, out_dir=tmp_path / "run", callback=stop_at_5)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4  # the interval in flight (step 5) is what was lost
    m2 = fused(ckpt, "ffba-ab", seed=99)  # a different fresh init: everything must come from the checkpoint
    torch.manual_seed(12345)  # and a disturbed RNG
    r2 = train(m2, tok, records(n=40), config=c, out_dir=tmp_path / "run", resume=True)
    assert r2.steps == 7 and [h["step"] for h in r2.history] == list(range(1, 8))
    assert [h["loss"] for h in r2.history] == [h["loss"] for h in r_ref.history]
    for k, v in ref.adapter_state_dict().items():
        assert torch.equal(m2.adapter_state_dict()[k], v), k
    # the checkpoint also carries a loadable flora adapter
    again = FusedLlama.from_pretrained(str(ckpt), adapter=str(tmp_path / "run" / "checkpoint" / "adapter"))
    for k, v in m2.adapter_state_dict().items():
        assert torch.equal(again.adapter_state_dict()[k], v)


def test_resume_with_dropout_restores_rng(ckpt, tok, tmp_path):
    def make():
        torch.manual_seed(0)
        return FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("lora", 4, 8.0, dropout=0.3))

    c = cfg(max_steps=4, save_every=2)
    ref = make()
    train(ref, tok, records(n=32), config=c)

    def stop(step, rec):
        if step == 3:
            raise Interrupted()

    with pytest.raises(Interrupted):
        train(make(), tok, records(n=32), config=c, out_dir=tmp_path, callback=stop)
    m = make()
    train(m, tok, records(n=32), config=c, out_dir=tmp_path, resume=True)
    for k, v in ref.adapter_state_dict().items():
        assert torch.equal(m.adapter_state_dict()[k], v), k


def test_train_puts_the_loaded_model_in_train_mode_and_back(ckpt, tok):
    """from_pretrained returns eval mode (as transformers'): train() switches to train mode
    itself, so an adapter's dropout acts and the loss runs alone (no logits), as before; and
    gives the mode back, as evaluation does: the trained model left in train mode scored
    with dropout on (randomly perturbed logits) right after finetune()."""
    m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("lora", 4, 8.0, dropout=0.3))
    assert not m.training
    seen = []
    hook = m.register_forward_hook(lambda mod, args, out: seen.append((mod.training, out.logits is None)))
    train(m, tok, records(n=16), config=cfg(max_steps=2))
    assert seen and all(t and alone for t, alone in seen)
    assert not any(mod.training for mod in m.modules())
    hook.remove()
    train(m.train(), tok, records(n=16), config=cfg(max_steps=1))
    assert m.training


def test_resume_rejects_other_settings_and_missing_checkpoint(ckpt, tok, tmp_path):
    train(fused(ckpt), tok, records(n=32), config=cfg(max_steps=2), out_dir=tmp_path)
    with pytest.raises(ValueError, match="global_batch differs"):
        train(fused(ckpt), tok, records(n=32), config=cfg(max_steps=2, batch_size=8), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="trainable parameter names differs"):
        train(fused(ckpt, "lora"), tok, records(n=32), config=cfg(max_steps=2), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="group_by_length"):  # another data order
        train(fused(ckpt), tok, records(n=32), config=cfg(max_steps=2, group_by_length=True), out_dir=tmp_path,
              resume=True)
    with pytest.warns(UserWarning, match="no checkpoint"):
        r = train(fused(ckpt), tok, records(n=32), config=cfg(max_steps=1), out_dir=tmp_path / "empty", resume=True)
    assert r.steps == 1


def test_checkpoint_write_is_atomic(ckpt, tok, tmp_path, monkeypatch):
    import flora.train_state as ts

    m = fused(ckpt)
    train(m, tok, records(n=32), config=cfg(max_steps=2), out_dir=tmp_path)
    good = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir() if p.is_file()}
    real = ts._save_tensors
    calls = []

    def failing(tensors, path):
        calls.append(path.name)
        if path.name == "optimizer.safetensors":  # die half-way through the next save
            raise KeyboardInterrupt
        real(tensors, path)

    monkeypatch.setattr(ts, "_save_tensors", failing)
    with pytest.raises(KeyboardInterrupt):
        train(m, tok, records(n=32), config=cfg(max_steps=2), out_dir=tmp_path)
    assert calls
    now = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir() if p.is_file()}
    assert now == good  # the previous checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temp dir left behind


def test_bad_inputs(ckpt, tok):
    base = FusedLlama.from_pretrained(str(ckpt))
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(base, tok, records(n=8), config=cfg())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(fused(ckpt), tok, records(n=6), config=cfg(batch_size=4, grad_accum=2))
    with pytest.raises(ValueError, match="batch_size"):
        train(fused(ckpt), tok, records(n=8), config=cfg(batch_size=0))
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train(fused(ckpt), tok, records(n=8), config=cfg(), resume=True)


def test_grad_checkpointing_same_update(ckpt, tok):
    a, b = fused(ckpt, "zflora"), fused(ckpt, "zflora")
    train(a, tok, records(n=16), config=cfg(max_steps=2))
    train(b, tok, records(n=16), config=cfg(max_steps=2, grad_checkpointing=True))
    assert b.gradient_checkpointing
    for k, v in a.adapter_state_dict().items():
        torch.testing.assert_close(b.adapter_state_dict()[k], v, rtol=1e-5, atol=1e-7)


def test_exact_match_equals_greedy_generation(ckpt, tok):
    model = fused(ckpt, "lora")
    train(model, tok, records(n=64), config=cfg(max_steps=15, lr=3e-2))
    ev = records(n=12, split="eval")
    stats = eval_stats(model, TokenizedDataset(ev, tok, 32), tok)
    hits = 0
    model.eval()
    for r in ev:  # independent: greedy decoding, one example at a time
        ids = torch.tensor([tok(r["prompt"])["input_ids"]])
        out = model.generate(ids, max_new_tokens=12, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        want = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        hits += out[:len(want)] == want
    assert stats["exact_match"] == hits / len(ev)
    assert stats["n"] == 12


def test_transformers_trainer_drives_fused_llama(ckpt, tok, tmp_path):
    from transformers import Trainer, TrainingArguments

    from flora.data import collate, pad_id_of

    model = fused(ckpt)
    before = adapter(model)
    base = {k: v.clone() for k, v in model.base_state_dict().items()}
    ds = TokenizedDataset(records(n=32), tok, 32)
    ev = TokenizedDataset(records(n=16, split="eval"), tok, 32)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    loss0 = eval_stats(model, ev, tok)["loss"]
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=lambda items: collate(items, pad_id_of(tok)))
    out = trainer.train()
    assert out.global_step == 8
    assert eval_stats(model, ev, tok)["loss"] < loss0
    assert all(not torch.equal(before[k], v) for k, v in model.adapter_state_dict().items())
    assert all(torch.equal(v, base[k]) for k, v in model.base_state_dict().items())


def _run_ddp(nproc, ckpt, out, grad_accum, fsdp=False):
    out.mkdir(parents=True, exist_ok=True)
    # gloo on the CPU even where GPUs exist: the runs are compared with a CPU one-process run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLORA_DIST_BACKEND": "gloo", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "_ddp_train_worker.py"), str(ckpt), str(out), str(grad_accum), "1" if fsdp else "0"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, \
        f"torchrun exited {p.returncode}\nstdout: {p.stdout[-1500:]}\nstderr: {p.stderr[-6000:]}"
    from safetensors.torch import load_file

    return json.loads((out / "losses.json").read_text()), load_file(str(out / "adapter.st"))


@pytest.fixture(scope="module")
def one_process(ckpt, tmp_path_factory):
    return _run_ddp(1, ckpt, tmp_path_factory.mktemp("one"), grad_accum=2)


def test_ddp_two_processes_match_one_with_double_accumulation(ckpt, tmp_path, one_process):
    l1, a1 = one_process
    l2, a2 = _run_ddp(2, ckpt, tmp_path / "two", grad_accum=1)
    assert len(l1) == len(l2) == 4
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert l1[-1] < l1[0]
    for k, v in a1.items():
        torch.testing.assert_close(a2[k], v, rtol=1e-4, atol=1e-6)


def test_dist_backend_one_gpu_per_local_rank(monkeypatch):
    from flora.train import dist_backend

    monkeypatch.delenv("FLORA_DIST_BACKEND", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist_backend() == "gloo"  # 2 processes, 1 GPU: not NCCL on a missing cuda:1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist_backend() == "nccl"
    monkeypatch.setenv("FLORA_DIST_BACKEND", "nccl")
    assert dist_backend() == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="one GPU per local process"):  # NCCL without GPUs: a clear error
        dist_backend()
    monkeypatch.delenv("FLORA_DIST_BACKEND")
    assert dist_backend() == "gloo"
    monkeypatch.setenv("FLORA_DIST_BACKEND", "mpi")
    with pytest.raises(ValueError, match="FLORA_DIST_BACKEND"):
        dist_backend()


@pytest.mark.parametrize("local_rank,local_world,gpus,forced,want", [
    (1, 2, 1, None, ("gloo", "cpu")),      # torchrun x2 on one GPU: gloo on the CPU, not cuda:1
    (0, 2, 1, None, ("gloo", "cpu")),
    (1, 2, 2, None, ("nccl", "cuda:1")),   # one GPU per local rank
    (3, 4, 8, None, ("nccl", "cuda:3")),
    (0, 2, 0, None, ("gloo", "cpu")),      # no GPU
    (0, 1, 0, None, ("gloo", "cpu")),
    (1, 2, 2, "gloo", ("gloo", "cpu")),    # forced gloo stays on the CPU
    (1, 2, 2, "nccl", ("nccl", "cuda:1")),
])
def test_dist_plan(local_rank, local_world, gpus, forced, want):
    from flora.train import dist_plan

    backend, device = dist_plan(local_rank, local_world, gpus, forced)
    assert (backend, str(device)) == want


@pytest.mark.parametrize("gpus,forced,words", [
    (1, "nccl", "one GPU per local process"),  # NCCL cannot put two ranks on one GPU
    (0, "nccl", "one GPU per local process"),
    (2, "mpi", "FLORA_DIST_BACKEND"),
])
def test_dist_plan_rejects_impossible_choices(gpus, forced, words):
    from flora.train import dist_plan

    with pytest.raises(ValueError, match=words):
        dist_plan(1, 2, gpus, forced)


def test_dist_device_follows_the_plan(monkeypatch):
    from flora.train import dist_device

    monkeypatch.delenv("FLORA_DIST_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", LOCAL_RANK="1").items():
        monkeypatch.setenv(k, v)
    assert dist_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist_device() == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "1")  # not distributed: the caller's choice
    assert dist_device("cpu") == torch.device("cpu")


def test_fsdp_smoke_two_processes(ckpt, tmp_path, one_process):
    # FSDP2 shards the adapter and its AdamW state; same global batch -> same curve as 1 process
    l1, a1 = one_process
    lf, af = _run_ddp(2, ckpt, tmp_path / "fsdp", grad_accum=1, fsdp=True)
    torch.testing.assert_close(lf, l1, rtol=1e-5, atol=1e-6)
    for k, v in a1.items():
        torch.testing.assert_close(af[k], v, rtol=1e-4, atol=1e-6)


def test_cli_train_and_resume(ckpt, tmp_path, capsys):
    from flora.cli import main
    from flora.synthetic import write_jsonl

    data = write_jsonl(records(n=32), tmp_path / "train.jsonl")
    ev = write_jsonl(records(n=8, split="eval"), tmp_path / "eval.jsonl")
    out = tmp_path / "out"
    argv = ["train", "--model", str(ckpt), "--data", str(data), "--eval", str(ev), "--variant", "zflora-mha",
            "--rank", "4", "--alpha", "8", "--out", str(out), "--max-steps", "4", "--batch-size", "4",
            "--seq-len", "32", "--save-every", "2", "--lr", "1e-2", "--no-progress"]
    assert main(argv) == 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "adapter.safetensors").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 4 and log["final_eval"]["n"] == 8
    m = FusedLlama.from_pretrained(str(ckpt), adapter=str(out / "adapter"))
    assert m.adapter_config.variant == "zflora-mha"
    # resuming a finished run trains no further and keeps the same adapter
    saved = adapter(m)
    assert main(argv + ["--resume"]) == 0
    m2 = FusedLlama.from_pretrained(str(ckpt), adapter=str(out / "adapter"))
    assert all(torch.equal(saved[k], v) for k, v in m2.adapter_state_dict().items())
    # bad input: a clear error, exit status 2 (a fresh --out: `out` holds a run, refused before the model loads)
    fresh = argv.index("--out") + 1
    capsys.readouterr()
    assert main(argv[:2] + [str(tmp_path / "none")] + argv[3:fresh] + [str(tmp_path / "out2")] + argv[fresh + 1:]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()  # the failed run leaves no empty --out behind
    assert main(["train", "--model", str(ckpt), "--data", str(data), "--variant", "nope", "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err  # an argument error is named before --out's state


def test_cli_train_under_torchrun_leaves_without_finalization(monkeypatch):
    """After a process group the run started is destroyed, `flora train` exits
    with os._exit(its status): gloo's worker threads outlive the group and one
    freeing the last collective's tensors during Python's finalization aborts
    the rank (tests/_ddp_train_worker.py). Without a group: a plain return."""
    import torch.distributed as dist

    from flora import cli

    monkeypatch.setattr(cli, "_run", lambda *a, **k: 3)
    assert cli._train(None) == 3
    state = {"up": True}
    monkeypatch.setattr(dist, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(dist, "destroy_process_group", lambda: state.update(up=False))

    def fake_exit(rc):
        raise SystemExit(("os._exit", rc))

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as e:
        cli._train(None)
    assert e.value.code == ("os._exit", 3) and not state["up"]
    # an exception ends the group and propagates (its traceback reaches torchrun)
    state["up"] = True
    monkeypatch.setattr(cli, "_run", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli._train(None)
    assert not state["up"]


def test_bench_length_grouping_counts_the_padding(ckpt, tmp_path):
    from _bench_scripts import load_bench_script

    lg = load_bench_script("length_grouping")
    lg.main(["--model", str(ckpt), "--n", "24", "--median", "6", "--seq-len", "32", "--batch", "4",
             "--steps", "3", "--rounds", "1", "--json", str(tmp_path / "g.json")])
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert rows["grouped"]["padded_share"] < rows["plain"]["padded_share"]
    assert rows["packed"]["padded_share"] < rows["grouped"]["padded_share"]
    # the count, by hand: the plain order's first 3 batches of 4
    from flora.data import load_tokenizer
    from flora.train import TrainConfig, epoch_order

    ds = TokenizedDataset(lg.make_records(24, 6, 0), load_tokenizer(ckpt), 32)
    L = [len(it["input_ids"]) for it in ds]
    order = epoch_order(24, TrainConfig().seed, 0)
    batches = [[L[i] for i in order[s * 4:(s + 1) * 4]] for s in range(3)]
    pad = sum(max(b) * 4 - sum(b) for b in batches)
    assert rows["plain"]["padded_share"] == pytest.approx(pad / sum(max(b) * 4 for b in batches))


def test_early_stop_and_best_adapter(ckpt, tok, tmp_path, monkeypatch):
    """early_stop: training ends after that many evaluations without a lower eval loss
    (a resume of the stopped run trains no further); save_best keeps the adapter of the
    lowest eval loss, whose eval loss, recomputed from the saved files, is that one."""
    from flora.train import _stop_early

    assert not _stop_early([{"loss": 3.0}, {"loss": 2.0}, {"loss": 2.5}], 2)
    assert _stop_early([{"loss": 3.0}, {"loss": 2.0}, {"loss": 2.5}, {"loss": 2.0}], 2)  # equal is no better
    assert not _stop_early([{"loss": 3.0}, {"loss": 4.0}], 0)
    snaps = {}

    def snap(step, rec):
        snaps[step] = {k: v.clone() for k, v in m.adapter_state_dict().items()}

    c = cfg(lr=0.3, max_steps=12, lr_schedule="constant", eval_every=1, early_stop=2, save_best=True)
    m = fused(ckpt)
    evals = records(n=8, split="eval")
    import flora.train as flora_train

    calls = []
    real_eval = flora_train.eval_stats
    monkeypatch.setattr(flora_train, "eval_stats", lambda *a, **k: calls.append(1) or real_eval(*a, **k))
    r = train(m, tok, records(n=32), evals, config=c, out_dir=tmp_path, callback=snap)
    assert len(calls) == len(r.eval_history) == r.steps  # one per step; the stopping one not run again
    assert r.final_eval == {k: v for k, v in r.eval_history[-1].items() if k != "step"}
    losses = [e["loss"] for e in r.eval_history]
    b = min(range(len(losses)), key=losses.__getitem__)
    assert r.stopped_early and r.steps < 12 and r.steps == r.eval_history[-1]["step"]
    assert len(losses) - 1 - b == 2 and r.best_eval == r.eval_history[b]
    best = FusedLlama.from_pretrained(str(ckpt), adapter=str(tmp_path / "best-adapter"))
    for k, v in snaps[r.eval_history[b]["step"]].items():
        assert torch.equal(best.adapter_state_dict()[k], v), k
    again = eval_stats(best, TokenizedDataset(evals, tok, 32), pad_id=tok.pad_token_id)
    assert again["loss"] == pytest.approx(r.best_eval["loss"], rel=1e-6)
    r2 = train(fused(ckpt, seed=5), tok, records(n=32), evals, config=c, out_dir=tmp_path, resume=True)
    assert r2.steps == r.steps and r2.stopped_early and r2.history == r.history
    with pytest.raises(ValueError, match="save_best needs eval data"):
        train(fused(ckpt), tok, records(n=32), config=cfg(save_best=True), out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="early_stop needs eval data and eval_every"):
        train(fused(ckpt), tok, records(n=32), evals, config=cfg(early_stop=2))


@pytest.mark.parametrize("extra, msg", [(["--save-best"], "--save-best needs --eval"),
                                        (["--early-stop", "2"], "--early-stop needs --eval"),
                                        (["--early-stop", "2", "--eval", "E"], "--early-stop needs --eval-every")])
def test_cli_best_and_early_stop_need_evaluations(ckpt, tmp_path, capsys, extra, msg):
    from flora.cli import main
    from flora.synthetic import write_jsonl

    data = write_jsonl(records(n=8), tmp_path / "train.jsonl")
    extra = [str(data) if a == "E" else a for a in extra]
    assert main(["train", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--no-progress"] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flora train: error: {msg} (") and "\n" not in err
    assert not (tmp_path / "o").exists()
