"""kill -9 during training and during saves (checkpoint and adapter), then
load / resume: nothing is lost and a resumed run equals an uninterrupted one
bit for bit on the CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_helpers import records, tiny_checkpoint
from flora import FusedLlama
from flora.synthetic import write_jsonl

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def child(tmp, args, pause=None):
    """Run _kill_worker.py; with ``pause`` SIGKILL it once it reaches that point."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    marker = Path(tmp) / f"paused-{time.monotonic_ns()}"
    if pause:
        env.update(FLORA_TEST_PAUSE=pause, FLORA_TEST_MARKER=str(marker))
    p = subprocess.Popen([sys.executable, str(HERE / "_kill_worker.py"), *map(str, args)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if pause is None:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        return
    deadline = time.monotonic() + 300
    while not marker.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"worker never reached {pause}: {p.communicate()[1][-2000:]}")
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    ckpt = tiny_checkpoint(tmp / "ckpt")
    data = write_jsonl(records(n=16), tmp / "train.jsonl")
    argv = ["--model", ckpt, "--data", data, "--variant", "lora", "--rank", "4", "--dropout", "0.1",
            "--max-steps", "6", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--save-every", "2",
            "--device", "cpu", "--no-progress"]
    child(tmp, ["train", *argv, "--out", tmp / "ref"])  # the uninterrupted run
    return tmp, ckpt, argv


def result(ckpt, out):
    log = json.loads((Path(out) / "train_log.json").read_text())
    sd = FusedLlama.from_pretrained(str(ckpt), adapter=str(Path(out) / "adapter")).adapter_state_dict()
    return [h["loss"] for h in log["history"]], sd


@pytest.mark.parametrize("pause", ["step:3", "checkpoint-rename"])
def test_killed_training_resumes_bit_identical(setup, pause):
    tmp, ckpt, argv = setup
    out = tmp / pause.replace(":", "")
    child(tmp, ["train", *argv, "--out", out], pause=pause)
    assert not (out / "adapter").exists()
    child(tmp, ["train", *argv, "--out", out, "--resume"])
    ref_loss, ref_sd = result(ckpt, tmp / "ref")
    loss, sd = result(ckpt, out)
    assert loss == ref_loss
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    assert sorted(os.listdir(out)) == ["adapter", "checkpoint", "train_log.json"]  # nothing left behind


def test_killed_packed_training_resumes_bit_identical(setup):
    """`flora train --pack`: the resumed run takes the same packed rows from the same
    position (the checkpoint counts steps over the rows)."""
    tmp, ckpt, argv = setup
    argv = argv + ["--pack", "--batch-size", "2"]  # the last --batch-size counts
    child(tmp, ["train", *argv, "--out", tmp / "pack-ref"])
    child(tmp, ["train", *argv, "--out", tmp / "pack"], pause="step:3")
    child(tmp, ["train", *argv, "--out", tmp / "pack", "--resume"])
    ref_loss, ref_sd = result(ckpt, tmp / "pack-ref")
    loss, sd = result(ckpt, tmp / "pack")
    assert loss == ref_loss and len(loss) == 6
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)


@pytest.mark.parametrize("pause", ["adapter-write", "adapter-rename"])
def test_killed_adapter_save_loses_nothing(setup, pause):
    tmp, ckpt, _ = setup
    d = tmp / pause
    d.mkdir()
    child(tmp, ["save", ckpt, d / "ad", d / "ref"], pause=pause)
    assert any(n.startswith(".ad.") for n in os.listdir(d))  # the killed save's leftovers
    got = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / "ad")).adapter_state_dict()
    want = FusedLlama.from_pretrained(str(ckpt), adapter=str(d / "ref")).adapter_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(os.listdir(d)) == ["ad", "ref"]  # recovered and cleaned up by the load
