"""The model on every non-CPU ggml device of this build (Vulkan, CUDA, ...) and on ggml RPC servers on localhost,
against the CPU in the same process. Skips cleanly in a CPU-only build; the CI device stage (.ci/devices.sh)
runs it on Vulkan (Mesa's lavapipe) and RPC, where nothing may skip.

What is asserted against the CPU, and why: devices tile products and quantize activations differently, so
logits are compared within a tolerance per weight type, and tokens only where the CPU's margin between its top
two logits is well above that tolerance (elsewhere a device may legitimately pick the other one). A generation
is many such choices in a row, so generation paths (stream, batch, template, image, chat with tools) are checked
for what they promise on the device itself: the stream equals generate, a batched request equals its solo run,
a template's holes hold their vocabulary, a reply parses.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import binding, devices, rpc, testing

LOCAL = [d.name for d in devices.local() if not d.is_cpu and d.type in ("gpu", "igpu")]
HAS_RPC = binding.lib.ggml_backend_reg_by_name(b"RPC") != binding.NULL
TARGETS = LOCAL + (["RPC"] if HAS_RPC else [])
pytestmark = pytest.mark.skipif(not TARGETS, reason="no non-CPU ggml device in this build (see docs/devices.md)")

WTYPES = ["f32", "q8_0", "q4_K", "iq4_nl", "iq2_s"]
# max |logit difference| to the CPU per weight type, on logits spanning about -3..6. Measured on lavapipe
# (Mesa 25): 0.007, 0.077, 0.10, 0.061, 0.14; the weight rounding itself moves logits by 0.09 (q8_0) to 2.4
# (iq2_s). Devices quantize activations their own way for quantized products (Vulkan: q8_1; the CPU: q8_0/q8_K).
TOL = {"f32": 0.02, "q8_0": 0.15, "q4_K": 0.2, "iq4_nl": 0.15, "iq2_s": 0.3}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`diffgemma rpc-server` serving this machine's CPU on a free localhost port, in a child process."""

    def __init__(self) -> None:
        self.endpoint = f"127.0.0.1:{_free_port()}"
        port = self.endpoint.rsplit(":", 1)[1]
        self.log = tempfile.TemporaryFile()  # not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen([sys.executable, "-m", "diffgemma", "rpc-server", "--port", port, "--device",
                                      "cpu", "-t", "1"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc.probe(self.endpoint, timeout=5)
                return
            except dg.Error:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    self.log.seek(0)
                    raise RuntimeError(f"rpc-server did not start: {self.log.read().decode()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def server():
    if not HAS_RPC:
        yield None
        return
    s = Server()
    yield s
    s.stop()


def _load(path, target, server, **kw):
    """The model with every layer on `target` (a local device name, or "RPC" for the localhost server)."""
    if target == "RPC":
        return dg.load(path, device="RPC0", rpc=server.endpoint, **kw)
    return dg.load(path, device=target, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A calm random model with rows of 256 (so K- and IQ-quants apply) in each weight type. Every token uses
    every expert: top-k routing is discontinuous, and on a random model a near-tie somewhere flips one token's
    expert under any rounding difference (seen on lavapipe: one row off by 4 at layer 3), which would hide what
    the comparison is for. The batched/solo and generation tests keep top-2 routing."""
    d = tmp_path_factory.mktemp("dev")
    hp = testing.tiny_hparams(n_embd=256, n_ff=256, n_ff_exp=256, n_expert=4, n_expert_used=4)
    f32 = testing.write_model(d / "f32.gguf", hp, weights=testing.random_weights(hp, 5, calm=True))
    out = {"f32": f32}
    for t in WTYPES[1:]:
        dg.quantize(f32, d / f"{t}.gguf", type=t, require_imatrix=False, progress=False)
        out[t] = d / f"{t}.gguf"
    return out


def _case(hp, seed=0):
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(10, hp.n_vocab, 20).tolist(), rng.integers(10, hp.n_vocab, hp.canvas_length).tolist()


def _compare(ref, got, tol):
    """Logits within tol, and the same argmax wherever the CPU's top-2 margin exceeds 4 * tol."""
    assert np.abs(ref - got).max() < tol, np.abs(ref - got).max()
    top2 = np.sort(ref, axis=1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 4 * tol
    assert (ref.argmax(1)[sure] == got.argmax(1)[sure]).all()
    return int(sure.sum())


@pytest.fixture(scope="module")
def cpu_logits(files):
    out = {}
    for t, p in files.items():
        with dg.load(p, device="cpu") as m:
            prompt, canvas = _case(m.hparams)
            a = m.logits(prompt, canvas)
            out[t] = (a, m.logits(prompt, canvas, self_cond=a / 0.8))
    return out


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("wtype", WTYPES)
def test_logits_match_the_cpu(files, cpu_logits, server, target, wtype):
    with _load(files[wtype], target, server) as m:
        assert m.devices == [m.placement.output.name, "CPU"] and not m.placement.output.is_cpu
        prompt, canvas = _case(m.hparams)
        b = m.logits(prompt, canvas)
        splits = binding.lib.ggml_backend_sched_get_n_splits(m.sched)
        b2 = m.logits(prompt, canvas, self_cond=cpu_logits[wtype][0] / 0.8)
    a, a2 = cpu_logits[wtype]
    _compare(a, b, TOL[wtype])
    _compare(a2, b2, TOL[wtype])
    assert splits == 1  # the whole decoder and sampling graph on the device: nothing falls back to the CPU


@pytest.mark.parametrize("target", TARGETS)
def test_self_conditioning_in_vocabulary_blocks(files, server, target, monkeypatch):
    """The self-conditioning product in vocabulary blocks (graph.sc_blocks; forced small here, as the released
    vocabulary gets 64): the block-major E^T and state, the batched product and the sum over blocks run on the
    device, from a state the host wrote and from the one a step leaves there."""
    from diffgemma import graph

    monkeypatch.setattr(graph, "SC_BLOCK", 16)
    got = {}
    for where in ("CPU", target):
        with dg.load(files["f32"], device="cpu") if where == "CPU" else _load(files["f32"], target, server) as m:
            assert m._embedding_t().ne[2] == graph.sc_blocks(m.hparams.n_vocab) > 1
            prompt, canvas = _case(m.hparams)
            with_sc = m.logits(prompt, canvas, self_cond=m.logits(prompt, canvas) / 0.8)
            u = np.full(len(canvas), 0.5, np.float32)
            m.denoise_step(np.asarray(canvas), 0.8, False, u)
            _, entropy, _ = m.denoise_step(np.asarray(canvas), 0.7, True, u)
            got[where] = (with_sc, entropy, binding.lib.ggml_backend_sched_get_n_splits(m.sched))
    _compare(got["CPU"][0], got[target][0], TOL["f32"])
    np.testing.assert_allclose(got[target][1], got["CPU"][1], atol=TOL["f32"])
    assert got[target][2] == 1  # nothing of it falls back to the CPU


@pytest.mark.parametrize("target", TARGETS)
def test_no_f32_copies_next_to_device_layers(files, server, target, tmp_path):
    """Alone on the CPU, dense Q5_1 matrices are copied as F32 (cpu_layout); with layers on a device they stay
    mapped: the scheduler uploads CPU layers' weights for large batches, and a copy is 5.3x the bytes."""
    path = tmp_path / "q5_1.gguf"
    dg.quantize(files["f32"], path, type="q5_1", progress=False)
    with dg.load(path, device="cpu") as m:
        assert "blk.0.ffn_down.weight" in m.repacked
    with _load(path, target, server, n_gpu_layers=3) as m:
        assert m.placement.layers[0].is_cpu and not [n for n in m.repacked if n.endswith("ffn_down.weight")]


@pytest.mark.parametrize("target", TARGETS)
def test_partial_offload(files, cpu_logits, server, target):
    with _load(files["q8_0"], target, server, n_gpu_layers=3) as m:
        assert m.placement.describe().startswith("layers 0-3 CPU, 4-5 ")
        assert m.devices[-1] == "CPU" and len(m.devices) == 2
        prompt, canvas = _case(m.hparams)
        b = m.logits(prompt, canvas)
    _compare(cpu_logits["q8_0"][0], b, TOL["q8_0"])


@pytest.fixture(scope="module")
def second(server):
    """The other device of a two-device split: a local GPU when there is one, else a second RPC server."""
    if LOCAL:
        yield LOCAL[0], None
        return
    s = Server()
    yield "RPC1", s
    s.stop()


@pytest.mark.skipif(not HAS_RPC, reason="a split needs the RPC backend (or two local GPUs)")
def test_layer_split_over_two_devices(files, cpu_logits, server, second):
    name, extra = second
    servers = [server.endpoint] + ([extra.endpoint] if extra else [])
    with dg.load(files["q8_0"], device=["RPC0", name], rpc=servers, tensor_split=[1, 1]) as m:
        assert m.devices == ["RPC0", name, "CPU"]
        layers = [d.name for d in m.placement.layers]
        assert layers[0] == "RPC0" and layers[-1] == name  # sampling on the last device
        prompt, canvas = _case(m.hparams)
        b = m.logits(prompt, canvas)
        g = m.generate("hello", max_new_tokens=16, steps=3, seed=4)
    _compare(cpu_logits["q8_0"][0], b, TOL["q8_0"])
    assert len(g.tokens) == 16


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory, random_tiny):
    d = tmp_path_factory.mktemp("devvis")
    return random_tiny, testing.write_random_mmproj(d / "mmproj.gguf", n_proj=64)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("target", TARGETS)
def test_generation_paths_on_the_device(vision_files, server, target):
    text, mmproj = vision_files
    fast = dict(max_new_tokens=32, steps=4, seed=3)
    with _load(text, target, server, mmproj=mmproj) as m:
        g = m.generate("To be, or not", **fast)
        with m.stream("To be, or not", **fast) as s:
            events = list(s)
        assert s.generation.tokens == g.tokens and isinstance(events[-1], dg.CanvasEvent)
        prompts = ["To be, or not", "The quick brown fox", "Numbers like 0 1 2"]
        batch = m.generate_batch(prompts, max_new_tokens=16, steps=3, seed=[1, 2, 3])
        solo = [m.generate(p, max_new_tokens=16, steps=3, seed=s) for p, s in zip(prompts, [1, 2, 3], strict=True)]
        for a, b in zip(batch, solo, strict=True):
            assert len(a.tokens) == len(b.tokens) == 16
            assert np.mean(np.array(a.tokens) == np.array(b.tokens)) > 0.8  # the batched pass may tile differently
        t = m.generate("", template="Year: {{hole 4 digits}}.", steps=3, seed=1)
        assert t.text.startswith("Year: ") and t.holes[0].isdigit() and t.text.endswith(".")
        picture = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
        gi = m.generate([{"role": "user", "content": [{"type": "image", "image": picture},
                                                      {"type": "text", "text": "What is this?"}]}],
                        image_budget=70, max_new_tokens=16, steps=3, seed=2)
        assert len(gi.tokens) == 16
        r = m.chat([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, steps=2, stability=None,
                   max_new_tokens=16, seed=1)
        assert r.finish_reason in ("stop", "length", "tool_calls")


def _with_watchdog(fn, seconds):
    """Run fn in a thread; fail (rather than hang the suite) if it does not end in time."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: a hang"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.mark.skipif(not HAS_RPC, reason="needs the RPC backend")
def test_a_killed_rpc_server_mid_request_is_an_error_not_a_hang_or_a_crash(random_tiny):
    s = Server()
    try:
        m = dg.load(random_tiny, device="RPC0", rpc=s.endpoint)
        seen = []

        def generate():
            with m.stream("To be, or not", max_new_tokens=64, steps=6, seed=1, stability=None) as st:
                for ev in st:
                    seen.append(ev)
                    if len(seen) == 2:
                        s.stop()  # SIGKILL between two steps of the first canvas

        with pytest.raises(dg.Error, match=f"RPC server at {s.endpoint} was lost"):
            _with_watchdog(generate, 120)
        assert len(seen) == 2
        with pytest.raises(dg.Error, match="was lost"):
            _with_watchdog(lambda: m.generate("again", max_new_tokens=16, steps=2), 60)
        _with_watchdog(m.close, 60)  # frees its remote buffers through the relay's stand-in replies
        with pytest.raises(dg.Error, match=f"cannot reach the RPC server at {s.endpoint}"):
            _with_watchdog(lambda: dg.load(random_tiny, rpc=s.endpoint), 60)
    finally:
        s.stop()


@pytest.mark.skipif(not HAS_RPC, reason="needs the RPC backend")
def test_unknown_devices_and_unreachable_servers_are_errors(random_tiny):
    with pytest.raises(dg.Error, match="no device 'RPC0'"):
        dg.load(random_tiny, device="RPC0")
    port = _free_port()
    with pytest.raises(dg.Error, match=f"cannot reach the RPC server at 127.0.0.1:{port}"):
        dg.load(random_tiny, rpc=f"127.0.0.1:{port}")


def test_the_device_list_has_memory():
    listed = dg.list_devices()
    assert [d.name for d in listed] == dg.backends()
    for d in listed:
        if not d.is_cpu and d.name in LOCAL:
            assert d.memory_total > 0 and 0 <= d.memory_free <= d.memory_total

