"""Run by tests/test_train.py under `python -m torch.distributed.run`: trains a
FusedLlama adapter and (rank 0) writes the loss curve and final adapter."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import records  # noqa: E402

from flora import AdapterConfig, FusedLlama  # noqa: E402
from flora.data import load_tokenizer  # noqa: E402
from flora.train import TrainConfig, init_distributed, train  # noqa: E402


def main(ckpt, out, grad_accum, fsdp="0"):
    torch.set_num_threads(1)
    tok = load_tokenizer(ckpt)
    torch.manual_seed(0)  # same fresh adapter init on every rank
    # zflora: every block and the head have adapter tensors (the head an FSDP unit of its own)
    model = FusedLlama.from_pretrained(ckpt, adapter=AdapterConfig("zflora", 4, 8.0))
    cfg = TrainConfig(lr=1e-2, max_steps=4, batch_size=4, grad_accum=int(grad_accum), seq_len=32, progress=False,
                      max_grad_norm=None, fsdp=fsdp == "1")
    res = train(model, tok, records(n=64), config=cfg)
    rank, world, _ = init_distributed()
    if fsdp == "1":  # sharded DTensors -> full tensors (a collective: every rank calls it)
        sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.adapter_state_dict().items()}
    else:
        sd = model.adapter_state_dict()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(Path(out) / "adapter.st"))
        Path(out, "losses.json").write_text(json.dumps([h["loss"] for h in res.history]))
    if world > 1:
        # Every rank leaves together: a rank tearing gloo down while its peer
        # still talks to it can abort the peer.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Leave without Python's finalization. destroy_process_group() does not stop
    # gloo's worker threads (FSDP's / DDP's state still holds the group), and a
    # worker frees the final barrier's work -- and through it the last
    # collective's tensors -- only after this thread has woken. If that lands
    # in finalization, the worker's take of the GIL ends it with pthread_exit,
    # unwinding a noexcept destructor: std::terminate, SIGABRT after a passing
    # run. (An exception in main() still exits normally, with its traceback.)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
