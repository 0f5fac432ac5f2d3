"""Child process of test_kill_resume.py. Runs `flora train ARGS...` or two
adapter saves; at the point FLORA_TEST_PAUSE names it writes the file
FLORA_TEST_MARKER and waits for the parent's SIGKILL.

  python _kill_worker.py train ARGS...        (pause: step:N | checkpoint-rename)
  python _kill_worker.py save CKPT PATH REF   (pause: adapter-rename | adapter-write)
"""
import os
import sys
import time
from pathlib import Path


def pause(*_):
    Path(os.environ["FLORA_TEST_MARKER"]).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def install(point):
    if point.startswith("step:"):  # between two optimizer steps
        import flora.finetune
        import flora.train

        n, real = int(point[5:]), flora.train.train

        def train(*a, **kw):
            return real(*a, callback=lambda step, rec: pause() if step == n else None, **kw)

        flora.finetune.train = train
    elif point.endswith("-rename"):  # right after the live directory was moved aside
        tag = ".checkpoint-old" if point == "checkpoint-rename" else ".old-"
        real = os.rename

        def rename(src, dst):
            real(src, dst)
            if tag in os.path.basename(os.fspath(dst)):
                pause()

        os.rename = rename
    elif point == "adapter-write":  # half-way through writing the new files
        import flora.fileio

        flora.fileio._fsync_file = pause
    else:
        raise SystemExit(f"unknown pause point {point!r}")


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    point = os.environ.get("FLORA_TEST_PAUSE")
    if mode == "train":
        from flora.cli import main as cli

        if point:
            install(point)
        return cli(["train", *args])
    import torch

    from flora import AdapterConfig, FusedLlama

    ckpt, path, ref = args
    torch.manual_seed(0)
    m = FusedLlama.from_pretrained(ckpt, adapter=AdapterConfig("lora", 4, 8.0))
    m.save_adapter(path)
    m.save_adapter(ref)  # what `path` must still hold after the kill
    m._load_adapter_tensors({k: v + 1 for k, v in m.adapter_state_dict().items()})
    if point:
        install(point)
    m.save_adapter(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
