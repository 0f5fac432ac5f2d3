"""`flora serve --allow-adapter-updates`: adapters loaded and unloaded while serving
(POST /v1/load_lora_adapter, /v1/unload_lora_adapter, vLLM's), against servers that
served the same adapters from their start."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from _train_helpers import served_checkpoint

from flora import FusedLlama, adapter_io
from flora.bench.latency import randomize_adapter
from flora.config import AdapterConfig
from flora.data import load_tokenizer
from flora.serve import Engine, NotServed, serve

PROMPTS = ["between a and f ->", "copy : a b c ="]
LONG = "copy : " + "a b c d e f " * 6 + "="  # several 16-token blocks of the prefix cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, {name: adapter dir}): "a" and "b" of one structure (ffba rank 4), "wide"
    of another (ffba rank 8), "peft" a PEFT LoRA dir."""
    d = tmp_path_factory.mktemp("serve-adapters")
    ckpt, a = served_checkpoint(d)
    dirs = {"a": a}
    for name, cfg, seed in (("b", AdapterConfig("ffba", 4, 8), 1), ("wide", AdapterConfig("ffba", 8, 16), 2),
                            ("lora", AdapterConfig("pf-lora", 4, 8), 3)):
        m = FusedLlama.from_pretrained(str(ckpt), adapter=cfg)
        randomize_adapter(m, seed=seed)
        m.save_adapter(d / name)
        dirs[name] = d / name
        if name == "lora":
            m.export_peft(d / "peft")
            dirs["peft"] = d / "peft"
    return ckpt, dirs


@contextlib.contextmanager
def _server(ckpt, adapters: dict, updates=True, **kw):
    """A server of the base and ``adapters`` (name -> dir, loaded at its start): (url, engine)."""
    api_key = kw.pop("api_key", None)
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    for name, path in adapters.items():
        model.load_adapter(str(path), name=name, activate=False)
    eng = Engine(model, load_tokenizer(ckpt), {"base": None, **{n: n for n in adapters}}, max_batch=4, **kw)
    srv = serve(eng, port=0, allow_adapter_updates=updates, api_key=api_key)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", eng
    finally:
        srv.shutdown()
        srv.server_close()
        eng.close()


def _post(url, body, headers=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _load(url, name, path):
    return _post(url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


def _unload(url, name):
    return _post(url + "/v1/unload_lora_adapter", {"lora_name": name})


def _models(url):
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        return [m["id"] for m in json.loads(r.read())["data"]]


def _complete(url, model, prompt, n=8):
    """Greedy completion with logprobs: (text, tokens, their logprobs, alternatives, cached prompt tokens)."""
    status, body = _post(url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n,
                                                    "temperature": 0, "logprobs": 2})
    assert status == 200, body
    out = json.loads(body)
    c, lp = out["choices"][0], out["choices"][0]["logprobs"]
    return (c["text"], lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
            out["usage"]["prompt_tokens_details"]["cached_tokens"])


def _answers(url, models):
    return {(m, p): _complete(url, m, p)[:4] for m in models for p in PROMPTS}


def _error(body) -> str:
    return json.loads(body)["error"]["message"]


def _reads(monkeypatch) -> list:
    """The thread of each adapter-directory read from now on (adapter_io.read_adapter_dir's calls)."""
    threads, read = [], adapter_io.read_adapter_dir

    def counted(*args, **kw):
        threads.append(threading.current_thread())
        return read(*args, **kw)
    monkeypatch.setattr(adapter_io, "read_adapter_dir", counted)
    return threads


def _truncated(src, dst):
    """A copy of adapter dir ``src`` whose tensor file lost its end."""
    shutil.copytree(src, dst)
    f = dst / adapter_io.WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-100])
    return dst


@pytest.mark.parametrize("mixed", [False, True])
def test_a_loaded_adapter_serves_as_one_loaded_at_start(setup, mixed):
    ckpt, dirs = setup
    with _server(ckpt, {"a": dirs["a"], "b": dirs["b"]}, mixed=mixed) as (url, _):
        want = _answers(url, ["a", "b", "base"])
    with _server(ckpt, {"a": dirs["a"]}, mixed=mixed) as (url, eng):
        before = _answers(url, ["a"])
        status, body = _load(url, "b", dirs["b"])
        assert (status, body) == (200, "Success: LoRA adapter 'b' added successfully.")
        assert _models(url) == ["base", "a", "b"] and eng.model.adapter_names == ["a", "b"]
        assert eng.model.stacked == (["a", "b"] if mixed else None)
        assert _answers(url, ["a", "b", "base"]) == want
        if not mixed:  # (--mixed: "a" alone was stacked narrower, its sums in another order)
            assert before == {k: v for k, v in want.items() if k[0] == "a"}


@pytest.mark.parametrize("mixed", [False, True])
def test_an_adapter_loaded_into_a_server_of_the_base_alone(setup, mixed):
    """The model's first adapter structure (a PEFT LoRA dir), then another of it."""
    ckpt, dirs = setup
    with _server(ckpt, {"peft": dirs["peft"], "lora": dirs["lora"]}, mixed=mixed) as (url, _):
        want = _answers(url, ["peft", "lora", "base"])
    with _server(ckpt, {}, mixed=mixed) as (url, eng):
        assert _answers(url, ["base"])  # the base model, no adapter structure yet
        assert _load(url, "peft", dirs["peft"])[0] == 200
        assert _load(url, "lora", dirs["lora"])[0] == 200
        assert eng.mixed == mixed
        assert _answers(url, ["peft", "lora", "base"]) == want
        status, body = _load(url, "a", dirs["a"])  # ffba: not the loaded adapters' structure (a PEFT LoRA: pf-lora)
        assert status == 400
        assert "does not have the structure of this model's adapters (pf-lora, rank 4)" in _error(body)


@pytest.mark.parametrize("mixed", [False, True])
def test_unload_then_404(setup, mixed):
    ckpt, dirs = setup
    with _server(ckpt, {"b": dirs["b"]}, mixed=mixed) as (url, _):
        want = _answers(url, ["b", "base"])
    with _server(ckpt, {"a": dirs["a"], "b": dirs["b"]}, mixed=mixed) as (url, eng):
        for m in ("a", "b"):
            _complete(url, m, LONG)
        assert {k[0] for k in eng.prefix._blocks} == {"a", "b"}  # the prefix cache holds blocks of both
        assert _unload(url, "a") == (200, "Success: LoRA adapter 'a' removed successfully.")
        assert _models(url) == ["base", "b"] and eng.model.adapter_names == ["b"]
        assert eng.model.stacked == (["b"] if mixed else None)
        assert {k[0] for k in eng.prefix._blocks} == {"b"}
        status, body = _post(url + "/v1/completions", {"model": "a", "prompt": "a", "max_tokens": 2})
        assert status == 404 and _error(body) == "model 'a' is not served; the models are: base, b"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/v1/models/a", timeout=30)
        assert e.value.code == 404
        assert _answers(url, ["b", "base"]) == want
        status, body = _unload(url, "a")
        assert status == 404 and _error(body) == "no adapter named 'a' is served; the adapters are: b"
        status, body = _unload(url, "base")
        assert status == 400 and "'base' is the base model; only adapters can be unloaded" in _error(body)
        assert _unload(url, "b")[0] == 200  # the last one: the base alone
        assert _models(url) == ["base"] and not eng.mixed
        assert _answers(url, ["base"])
        assert _load(url, "a", dirs["a"])[0] == 200  # and back
        assert eng.mixed == mixed


def test_bad_loads_are_refused_and_the_server_goes_on(setup, tmp_path):
    ckpt, dirs = setup
    (tmp_path / "empty").mkdir()
    with _server(ckpt, {"a": dirs["a"]}) as (url, eng):
        want = _answers(url, ["a", "base"])
        for body, status, msg in [
            ({"lora_name": "x", "lora_path": str(tmp_path / "nope")}, 400, f"{tmp_path / 'nope'} is not a directory"),
            ({"lora_name": "x", "lora_path": str(tmp_path / "empty")}, 400, "not a flora or PEFT adapter directory"),
            ({"lora_name": "x", "lora_path": str(_truncated(dirs["b"], tmp_path / "cut"))}, 400, "truncated"),
            ({"lora_name": "x", "lora_path": str(dirs["wide"])}, 400,
             "(ffba, rank 8) does not have the structure of this model's adapters (ffba, rank 4)"),
            ({"lora_name": "a", "lora_path": str(dirs["b"])}, 400,
             "the name 'a' is taken by an adapter loaded already (unload it first)"),
            ({"lora_name": "base", "lora_path": str(dirs["b"])}, 400, "the name 'base' is taken by the base model"),
            ({"lora_name": "x"}, 400, "'lora_name' and 'lora_path' must be given"),
            ({"lora_name": "", "lora_path": str(dirs["b"])}, 400, "'lora_name' and 'lora_path' must be given"),
            ({"lora_name": "x", "lora_path": str(dirs["b"]), "load_inplace": True}, 400,
             "not supported: load_inplace (unload the adapter, then load it)"),
            ([1], 400, "the request body must be a JSON object"),
        ]:
            got, raw = _post(url + "/v1/load_lora_adapter", body)
            assert got == status and msg in _error(raw), (body, raw)
            assert json.loads(raw)["error"]["code"] == status
        got, raw = _post(url + "/v1/unload_lora_adapter", {"lora_name": "a", "lora_int_id": 3})
        assert got == 400 and "not supported: lora_int_id" in _error(raw)
        assert _models(url) == ["base", "a"] and eng.model.adapter_names == ["a"]
        assert _answers(url, ["a", "base"]) == want


@pytest.mark.parametrize("mixed", [False, True])
def test_a_name_loaded_again_never_reuses_the_old_weights_prefix_cache(setup, mixed):
    """Unload "a" and load other weights under its name: the prompt the old "a"
    computed is computed again (not copied from the prefix cache), as a fresh
    server of the new weights computes it."""
    ckpt, dirs = setup
    with _server(ckpt, {"a": dirs["b"]}, mixed=mixed) as (url, _):
        want = _complete(url, "a", LONG)
    with _server(ckpt, {"a": dirs["a"]}, mixed=mixed) as (url, eng):
        old = _complete(url, "a", LONG)
        assert _complete(url, "a", LONG)[4] > 0  # the cache holds it
        assert _unload(url, "a")[0] == 200
        assert _load(url, "a", dirs["b"])[0] == 200
        got = _complete(url, "a", LONG)
        assert got == want and got[4] == 0 and got[:4] != old[:4]
        assert _complete(url, "a", LONG)[4] > 0  # kept again, with the new weights


def _stream(url, model, prompt, n):
    """A streaming request's response, and a function that reads the rest: its text."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    r = urllib.request.urlopen(req, timeout=120)
    first = r.readline()  # its first chunk: the row generates
    assert first.startswith(b"data: {"), first

    def rest():
        text = json.loads(first[6:])["choices"][0]["text"]
        for line in r:
            if line.startswith(b"data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
        r.close()
        return text
    return rest


@pytest.mark.parametrize("mixed", [False, True])
def test_a_load_or_unload_while_a_stream_runs(setup, mixed, monkeypatch):
    """The stream goes on as if nothing happened. A load is made between two of its
    steps (--mixed: once its batch has drained, the adapters stacked again), its
    directory read before, in the HTTP thread (the stream never waits for the disk);
    an unload refuses new requests for its adapter at once, and answers once the
    adapter's stream has run to its end with it."""
    ckpt, dirs = setup
    want = {}
    for m, served in (("a", {"a": dirs["a"]}), ("b", {"a": dirs["a"], "b": dirs["b"]})):  # as each stream runs
        with _server(ckpt, served, mixed=mixed) as (url, _):
            want[m] = _complete(url, m, PROMPTS[0], 40)[0]
    with _server(ckpt, {"a": dirs["a"]}, mixed=mixed) as (url, eng):
        step = eng._step

        def slow():  # 40 steps take a second: the stream still runs when the update comes
            time.sleep(0.025)
            step()
        eng._step = slow
        rest = _stream(url, "a", PROMPTS[0], 40)
        reads = _reads(monkeypatch)
        assert _load(url, "b", dirs["b"])[0] == 200
        assert len(reads) == 1 and reads[0] is not eng._worker
        assert eng.busy == (not mixed)  # --mixed: made once the stream's batch had drained
        assert rest() == want["a"]
        rest = _stream(url, "b", PROMPTS[0], 40)
        unloaded = []
        t = threading.Thread(target=lambda: unloaded.append(_unload(url, "b")))
        t.start()
        time.sleep(0.3)
        assert unloaded == [] and _models(url) == ["base", "a"]  # closed, its stream running
        status, body = _post(url + "/v1/completions", {"model": "b", "prompt": "a", "max_tokens": 2})
        assert status == 404 and _error(body) == "model 'b' is not served; the models are: base, a"
        assert rest() == want["b"]
        t.join(60)
        assert unloaded == [(200, "Success: LoRA adapter 'b' removed successfully.")]
        assert eng.model.adapter_names == ["a"]


def test_a_request_parsed_before_an_unload_is_refused_at_submit(setup):
    ckpt, dirs = setup
    with _server(ckpt, {"a": dirs["a"]}) as (url, eng):
        reqs = eng.parse({"model": "a", "prompt": "a", "max_tokens": 2}, False)
        eng.unload_adapter("a")
        with pytest.raises(NotServed, match="Request.model 'a' is not served; the models are: base"):
            eng.submit(reqs)
        with pytest.raises(KeyError, match="no adapter named 'a' is served; the adapters are: none"):
            eng.unload_adapter("a")


def test_updates_are_off_unless_asked_and_need_the_api_key(setup):
    ckpt, dirs = setup
    with _server(ckpt, {}, updates=False) as (url, eng):
        for path in ("load_lora_adapter", "unload_lora_adapter"):
            status, body = _post(url + "/v1/" + path, {"lora_name": "a", "lora_path": str(dirs["a"])})
            assert status == 404 and "flora serve --allow-adapter-updates turns it on" in _error(body)
        assert _models(url) == ["base"] and eng.model.adapter_names == []
    with _server(ckpt, {}, api_key="s3cret") as (url, eng):
        body = {"lora_name": "a", "lora_path": str(dirs["a"])}
        assert _post(url + "/v1/load_lora_adapter", body)[0] == 401
        assert _post(url + "/v1/load_lora_adapter", body, {"Authorization": "Bearer s3cret"})[0] == 200
        assert eng.model.adapter_names == ["a"]


def test_cli_allow_adapter_updates(setup):
    """`flora serve --allow-adapter-updates` (the engine in the main thread, HTTP in others)."""
    ckpt, dirs = setup
    with _server(ckpt, {"b": dirs["b"]}) as (url, _):
        want = _complete(url, "b", PROMPTS[0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-m", "flora", "serve", "--model", str(ckpt), "--port", "0",
                          "--device", "cpu", "--allow-adapter-updates"], stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stderr.readline()
        assert line.startswith("flora serve: http://"), line
        url = line.split()[2].removesuffix("/v1")
        assert _load(url, "b", dirs["b"]) == (200, "Success: LoRA adapter 'b' added successfully.")
        assert _models(url) == ["base", "b"]
        assert _complete(url, "b", PROMPTS[0]) == want
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
    finally:
        p.kill()


def test_a_change_on_a_stopped_engine_is_an_error_not_a_hang(setup):
    """An adapter change the worker can no longer make (its loop ended after close())
    raises at once; it blocked forever on the answer."""
    ckpt, dirs = setup
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    eng = Engine(model, load_tokenizer(ckpt), {"base": None}, max_batch=2).start()
    eng.close()
    eng._worker.join(timeout=30)
    assert not eng._worker.is_alive()
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="the engine has stopped"):
        eng.load_adapter("b", str(dirs["b"]))
    assert time.monotonic() - t < 10


def test_mixed_refuses_an_unstackable_first_adapter_and_stays_as_it_was(setup, tmp_path):
    """--mixed on a server of the base alone: an ffa adapter (it cannot be stacked) is
    refused before it gives the model its structure; it had, and only ffa adapters
    loaded after."""
    ckpt, dirs = setup
    m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("ffa", 4, 8))
    randomize_adapter(m, seed=4)
    m.save_adapter(tmp_path / "ffa")
    with _server(ckpt, {"peft": dirs["peft"]}, mixed=True) as (url, _):
        want = _answers(url, ["peft", "base"])
    with _server(ckpt, {}, mixed=True) as (url, eng):
        status, body = _load(url, "f", tmp_path / "ffa")
        assert status == 400 and "variant 'ffa' cannot be served side by side" in _error(body)
        assert eng.model.adapter_config is None and _models(url) == ["base"]
        assert _load(url, "peft", dirs["peft"])[0] == 200
        assert _answers(url, ["peft", "base"]) == want


@pytest.mark.parametrize("mixed", [False, True])
def test_a_load_reads_its_directory_once_outside_the_worker(setup, mixed, monkeypatch):
    """The model's first adapter (--mixed: checked for stacking first; that read the
    directory once more, in the worker), then another: one read each, in the
    caller's thread."""
    ckpt, dirs = setup
    with _server(ckpt, {}, mixed=mixed) as (url, eng):
        reads = _reads(monkeypatch)
        eng.load_adapter("peft", str(dirs["peft"]))
        assert _load(url, "lora", dirs["lora"])[0] == 200
        assert len(reads) == 2 and eng._worker not in reads
        assert eng.models == ["base", "peft", "lora"]


def test_a_directory_is_refused_before_the_worker_sees_it(setup, tmp_path):
    """What is wrong with the directory alone is raised by load_adapter in its caller's
    thread, nothing queued: an engine whose worker has ended (a queued change: "the
    engine has stopped") refuses each as a server's worker would."""
    ckpt, dirs = setup
    m = FusedLlama.from_pretrained(str(ckpt), adapter=AdapterConfig("ffa", 4, 8))
    m.save_adapter(tmp_path / "ffa")
    (tmp_path / "empty").mkdir()
    model = FusedLlama.from_pretrained(str(ckpt)).eval()
    eng = Engine(model, load_tokenizer(ckpt), {"base": None}, max_batch=2, mixed=True).start()
    eng.close()
    eng._worker.join(timeout=30)
    assert not eng._worker.is_alive()
    for path, msg in [(tmp_path / "nope", "is not a directory"),
                      (tmp_path / "empty", "not a flora or PEFT adapter directory"),
                      (_truncated(dirs["b"], tmp_path / "cut"), "truncated"),
                      (tmp_path / "ffa", "variant 'ffa' cannot be served side by side")]:
        with pytest.raises(ValueError, match=msg):
            eng.load_adapter("x", str(path))
    with pytest.raises(RuntimeError, match="the engine has stopped"):  # a good one: queued
        eng.load_adapter("x", str(dirs["b"]))
    assert model.adapter_config is None and eng.models == ["base"]
