"""The `flora` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _info(args) -> int:
    from .info import format_info, info

    print(json.dumps(info(), indent=2) if args.json else format_info())
    return 0


def _run(name: str, fn, args, errors=(ValueError,), interrupted=None) -> int:
    """Run a subcommand; bad input (``errors``) -> one line on stderr, exit 2;
    Ctrl-C -> one line (``interrupted(args)``'s, or "interrupted"), exit 130.
    Files are safe either way: every save is atomic."""
    try:
        fn(args)
    except errors as e:
        print(f"flora {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # the user's own Ctrl-C needs no traceback; 130 = 128 + SIGINT, as a shell reports it.
        # Under torchrun every rank gets the SIGINT: rank 0 speaks for them.
        from .train import launch_rank

        if launch_rank() == 0:
            msg = "interrupted"
            if interrupted is not None:
                try:
                    msg = interrupted(args)
                except Exception:  # never a traceback from the message itself
                    pass
            print(f"flora {name}: {msg}", file=sys.stderr)
        return 130
    return 0


def _train_interrupted(args) -> str:
    from .train_state import find_checkpoint

    path = find_checkpoint(args.out)
    if path is None:
        return "interrupted before the first checkpoint"
    try:
        with open(path / "state.json", encoding="utf-8") as f:
            step = f" (step {json.load(f)['step']})"
    except (OSError, ValueError, KeyError, TypeError):  # damaged: name the checkpoint without its step
        step = ""
    return f"interrupted; the last checkpoint is {path}{step}: rerun with --resume to continue"


def _bench_latency(args) -> int:
    import shlex

    from .bench.latency import run_args

    command = "flora " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return _run("bench latency", lambda a: run_args(a, command=command), args)


def _demo(args) -> int:
    from .demo import run_demo

    return _run("demo", run_demo, args)


def _train(args) -> int:
    import torch.distributed as dist

    from .finetune import run_args

    def end_group() -> bool:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            return True
        return False

    try:
        # FloatingPointError: a NaN / infinite training loss; OSError: unreadable or unwritable paths
        rc = _run("train", run_args, args, (ValueError, TypeError, OSError, FloatingPointError),
                  interrupted=_train_interrupted)
    except BaseException:
        end_group()
        raise
    if end_group():
        # Under torchrun: leave without Python's finalization. destroy_process_group()
        # does not stop gloo's worker threads (the FSDP / DDP state still holds the
        # group); one that frees the last collective's tensors during finalization
        # takes the GIL, is ended by pthread_exit through a noexcept destructor, and
        # the rank aborts (SIGABRT) after a run that saved everything.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _generate(args) -> int:
    from .inference import run_args

    # TypeError: a bad --dtype; OSError: a missing model, adapter or data file, an unwritable --out
    return _run("generate", run_args, args, (ValueError, TypeError, OSError))


def _export(args) -> int:
    from .export import run_args

    # TypeError: a bad --dtype; OSError: a missing model or adapter, an unwritable output
    return _run("export", run_args, args, (ValueError, TypeError, OSError))


def _chat(args) -> int:
    from .chat_cli import run_args

    return _run("chat", run_args, args, (ValueError, TypeError, OSError), interrupted=lambda a: "bye")


def _serve(args) -> int:
    from .serve import run_args

    # OSError: a missing model or adapter; Ctrl-C is how a server is stopped
    return _run("serve", run_args, args, (ValueError, TypeError, OSError), interrupted=lambda a: "stopped")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flora", description="Fused low-rank adapters for Llama")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="show what this build runs on which device")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_info)
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from .bench.latency import add_arguments as _latency_args

    s = _latency_args(b.add_parser("latency", help="TTFT/TPOT of flora adapters vs transformers + PEFT"))
    s.set_defaults(func=_bench_latency)
    from .demo import add_arguments as _demo_args

    s = _demo_args(sub.add_parser(
        "demo", help="fine-tune a fused adapter on SmolLM2-135M, generate with it on and off, compare latency"))
    s.set_defaults(func=_demo)
    from .finetune import add_arguments as _train_args

    s = _train_args(sub.add_parser("train", help="fine-tune an adapter on a JSONL dataset"))
    s.set_defaults(func=_train)
    from .inference import add_arguments as _generate_args

    s = _generate_args(sub.add_parser("generate", help="generate with a model and an adapter (on and off)"))
    s.set_defaults(func=_generate)
    from .export import add_arguments as _export_args

    s = _export_args(sub.add_parser(
        "export", help="write a lora adapter merged into an HF checkpoint (--merged) or as a PEFT adapter (--peft)"))
    s.set_defaults(func=_export)
    from .chat_cli import add_arguments as _chat_args

    s = _chat_args(sub.add_parser("chat", help="a conversation with the model (and an adapter) in the terminal"))
    s.set_defaults(func=_chat)
    from .serve import add_arguments as _serve_args

    s = _serve_args(sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server for the model and its adapters (/v1/chat/completions)"))
    s.set_defaults(func=_serve)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # the CLI's warnings as one line of its own, not a source location and line
    return f"flora: warning: {message}\n"


def main(argv=None) -> int:
    import warnings

    args = None
    shown = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)  # imports torch: seconds, long enough for a Ctrl-C
        return args.func(args)
    except KeyboardInterrupt:
        # outside _run (an import, parsing): nothing was written yet
        name = " ".join(filter(None, (getattr(args, "command", None), getattr(args, "bench", None))))
        from .train import launch_rank

        if launch_rank() == 0:
            print(f"flora{' ' + name if name else ''}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader stopped reading (`flora info | head`): its choice, not an error; later
        # writes (the interpreter's own flush at exit) go nowhere instead of failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
