"""Where a denoising step's time goes: per ggml op, and forward pass vs on-device sampling vs host rules.

Every node is observed through Model.observe (the scheduler's eval callback, which synchronises after each node,
so the total is a little higher than an unobserved step); the split is what matters.

    python bench/profile_step.py [FILE] [--config mid|proportional] [--steps 10] [--prompt-tokens 128]
(default FILE: a config of bench/step_latency.py, Q8_0). Matrix products are also split by weight,
named nodes by name without the layer (graph.py names them as llama.cpp does: products after their weight,
"attn_q", others "ffn_moe_probs", "attn_out", ...), element-wise ops by shape.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import tempfile
import time

import numpy as np

import diffgemma as dg
from diffgemma import binding as B
from diffgemma import sampler, testing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--config", default="mid")
    a = ap.parse_args()
    path = a.file
    if path is None:
        from step_latency import COMMON, CONFIGS

        hp = testing.tiny_hparams(**COMMON, **CONFIGS[a.config][0])
        path = testing.write_model(pathlib.Path(tempfile.mkdtemp()) / f"{a.config}-q8_0.gguf", hp, wtype="q8_0")
    m = dg.load(path, threads=a.threads)
    hp = m.hparams
    L = hp.canvas_length
    rng = np.random.default_rng(0)
    m.prefill(rng.integers(5, hp.n_vocab, a.prompt_tokens))
    canvas = rng.integers(0, hp.n_vocab, L)
    u = np.full(L, 0.5, np.float32)
    m.denoise_step(canvas, 0.8, False, u)

    # unobserved: device step vs host rules, as generation runs them
    dev = host = 0.0
    for _ in range(a.steps):
        t0 = time.perf_counter()
        argmax, entropy, sampled = m.denoise_step(canvas, 0.7, True, u)
        t1 = time.perf_counter()
        acc = sampler.accept(entropy, 0.1)
        canvas = sampler.renoise(acc, sampled, rng.integers(0, hp.n_vocab, L))
        sampler.should_stop([argmax], argmax, entropy, 1, 0.005)
        dev += t1 - t0
        host += time.perf_counter() - t1

    per_op: dict[str, float] = collections.defaultdict(float)
    phase = {"forward": 0.0, "sampling": 0.0}
    state = {"last": 0.0, "after_logits": False}

    def on_node(t, ask):
        if ask:
            return True
        now = time.perf_counter()
        dt = now - state["last"]
        state["last"] = now
        op = B.cstr(B.lib.ggml_op_desc(t))
        per_op[op] += dt
        name = B.ffi.string(t.name).decode()
        if name and " (" not in name and not name.startswith("node_"):  # ours, not ggml's "x (view)" / "node_7"
            per_op[f"  {op} {re.sub(r'-[0-9]+$', '', name)}"] += dt
        elif op in ("MUL", "ADD", "SUB", "DIV"):
            per_op[f"  {op} {'x'.join(str(t.ne[i]) for i in range(3))}"] += dt
        phase["sampling" if state["after_logits"] else "forward"] += dt
        if name == "logits":
            state["after_logits"] = True
        return True

    with m.observe(on_node):
        m.denoise_step(canvas, 0.7, True, u)
        per_op.clear()
        phase.update(forward=0.0, sampling=0.0)
        for _ in range(a.steps):
            state.update(last=time.perf_counter(), after_logits=False)
            m.denoise_step(canvas, 0.7, True, u)
    n = a.steps
    total = sum(per_op.values())
    print(f"{pathlib.Path(path).name}: canvas {L}, vocab {hp.n_vocab}, prompt {a.prompt_tokens}, {m.threads} threads")
    print(f"unobserved step: device {1e3 * dev / n:.2f} ms + host rules {1e3 * host / n:.3f} ms")
    print(f"observed split: forward {1e3 * phase['forward'] / n:.2f} ms ({100 * phase['forward'] / total:.0f}%), "
          f"sampling on device {1e3 * phase['sampling'] / n:.2f} ms ({100 * phase['sampling'] / total:.0f}%)")
    print(f"bytes per step: {12 * L + 8} up (ids, positions, uniforms, temperature, gate), {12 * L} down "
          f"(argmax, entropy, sample); the [{hp.n_vocab} x {L}] logits ({4 * hp.n_vocab * L:,} bytes) stay on the "
          "device")
    for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:24]:
        print(f"  {k:34s} {1e3 * v / n:8.2f} ms  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
