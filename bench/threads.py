"""Denoising-step time against the CPU thread count and OpenMP's wait policy, on the machine as it is and next to
a competing CPU load.

ggml's CPU backend (as llama-cpp-python builds it) runs a graph's nodes on an OpenMP team whose threads meet at a
barrier after every node. libgomp's default makes a waiting thread spin 300,000 times before it sleeps: when
another process holds a core one of the team needs, the others spin through their time slices waiting for it, and
a step can take 10-100x longer. diffgemma loads ggml with OMP_WAIT_POLICY=PASSIVE (binding.py) instead.

This runs a model (default: the embedded "tiny") at each thread count under each policy: "passive" (diffgemma's) and
"spin" (libgomp's default, GOMP_SPINCOUNT=300000), with nothing added ("as is") and with one busy-loop process
per usable core ("busy"). One child process per policy and repeat (the policy is read when ggml loads); repeats
alternate the policies, the loads and the thread counts, so a slow spell of a shared machine hits every cell alike.
Each step is timed alone; the table gives the median and 90th percentile over all repeats, and the mean (what a
long generation pays).

    PYTHONPATH=python python bench/threads.py [--model tiny|mid|proportional|FILE] [--threads 1,2,4]
        [--steps 15] [--repeats 4] [--prompt-tokens N] [--json out.json]

The thread counts default to 1, 2, the default (diffgemma.binding.default_threads()) and every usable core.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

POLICIES = {"passive": {}, "spin": {"GOMP_SPINCOUNT": "300000"}}  # extra environment of the child
BUSY_LOOP = "while True: pass"


def busy_load(n: int) -> list[subprocess.Popen]:
    """n processes that each keep one core busy (until stopped)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    time.sleep(0.5)  # let them start spinning
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def step_times(m, prompt: np.ndarray, steps: int, seed: int) -> list[float]:
    """Milliseconds of each of `steps` denoising steps (device pass, self-conditioning on) after `prompt`."""
    hp = m.hparams
    rng = np.random.default_rng(seed)
    canvas = rng.integers(0, hp.n_vocab, hp.canvas_length)
    u = np.full(hp.canvas_length, 0.5, np.float32)
    m.reset()
    m.prefill(prompt)
    m.denoise_step(canvas, 0.8, False, u)  # warm-up: graph built and allocated
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        m.denoise_step(canvas, 0.7, True, u)
        out.append(1e3 * (time.perf_counter() - t))
    return out


def one_repeat(model: str, counts: list[int], steps: int, prompt_tokens: int, r: int) -> dict[str, list[float]]:
    """The child: every (load, threads) cell once, in an order rotated by r; step times by 'load/threads'."""
    import diffgemma as dg

    models = {t: dg.load(model, threads=t) for t in counts}
    hp = models[counts[0]].hparams
    prompt = np.random.default_rng(0).integers(5, hp.n_vocab, prompt_tokens).astype(np.int32)
    times: dict[str, list[float]] = {}
    for load in ("as is", "busy") if r % 2 == 0 else ("busy", "as is"):
        procs = busy_load(len(os.sched_getaffinity(0))) if load == "busy" else []
        try:
            for t in counts[r % len(counts):] + counts[:r % len(counts)]:
                times[f"{load}/{t}"] = step_times(models[t], prompt, steps, seed=r)
        finally:
            stop(procs)
    times["loadavg"] = [os.getloadavg()[0]]
    return times


CONFIG_PROMPT = {"mid": 128, "proportional": 256}  # as bench/step_latency.py runs them


def synthetic(name: str) -> pathlib.Path:
    """bench/step_latency.py's config `name` as a Q8_0 file with random weights (in a temporary directory)."""
    from step_latency import COMMON, CONFIGS  # this script's directory is on sys.path

    from diffgemma import testing

    path = pathlib.Path(tempfile.mkdtemp(prefix="dg-threads-")) / f"{name}.gguf"
    return testing.write_model(path, testing.tiny_hparams(**COMMON, **CONFIGS[name][0]), wtype="q8_0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help='a GGUF file, "tiny" (the embedded model, default), or "mid" / '
                    '"proportional": bench/step_latency.py\'s synthetic configs, written as Q8_0')
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1,2,default,cores)")
    ap.add_argument("--steps", type=int, default=15, help="steps timed per cell and repeat (default 15)")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved repeats (default 4)")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="committed prompt tokens (default 64; mid 128, proportional 256)")
    ap.add_argument("--json", default=None, help="write every step time here")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one repeat, as JSON on stdout
    a = ap.parse_args()
    from diffgemma import binding  # after the child's environment is set: the policy is read when ggml loads

    cores = len(os.sched_getaffinity(0))
    counts = sorted({int(x) for x in a.threads.split(",")} if a.threads else {1, 2, binding.default_threads(), cores})
    if a.child is not None:
        print(json.dumps(one_repeat(a.model, counts, a.steps, a.prompt_tokens, a.child)))
        return
    a.prompt_tokens = a.prompt_tokens or CONFIG_PROMPT.get(a.model, 64)
    label, written = a.model, synthetic(a.model) if a.model in CONFIG_PROMPT else None
    if written is not None:
        a.model = str(written)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(a.repeats):
        for policy in list(POLICIES)[r % 2:] + list(POLICIES)[:r % 2]:
            argv = [sys.executable, __file__, "--child", str(r), "--model", a.model, "--threads",
                    ",".join(map(str, counts)), "--steps", str(a.steps), "--prompt-tokens", str(a.prompt_tokens)]
            out = subprocess.run(argv, env={**env, **POLICIES[policy]}, check=True, capture_output=True,
                                 text=True).stdout
            for cell, xs in json.loads(out).items():
                times.setdefault((policy, cell), []).extend(xs)
    loads = [x for (_, cell), xs in times.items() if cell == "loadavg" for x in xs]
    physical = binding.physical_cores(os.sched_getaffinity(0))
    print(f"{label}, {a.prompt_tokens} prompt tokens; {cores} usable cores ({physical} physical), default "
          f"threads {binding.default_threads()}; {a.repeats} interleaved "
          f"repeats x {a.steps} steps per cell; busy = {cores} busy-loop processes; 1-minute load average "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print(f"{'policy':8s} {'load':6s} {'threads':>7s} {'median ms':>10s} {'p90 ms':>8s} {'mean ms':>8s}")
    for load in ("as is", "busy"):
        for policy in POLICIES:
            for t in counts:
                xs = sorted(times[(policy, f"{load}/{t}")])
                print(f"{policy:8s} {load:6s} {t:7d} {statistics.median(xs):10.2f} {xs[int(0.9 * (len(xs) - 1))]:8.2f} "
                      f"{statistics.fmean(xs):8.2f}")
    if written is not None:
        written.unlink()
        written.parent.rmdir()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{p}/{c}": v for (p, c), v in times.items()}, f)


if __name__ == "__main__":
    main()
