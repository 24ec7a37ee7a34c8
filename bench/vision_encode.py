"""Image encode time of the vision tower at the 26B-A4B tower's shapes, ours vs transformers in the same run.

A synthetic gemma4v mmproj at the released widths (D 1152, 27 layers, FFN 4304, 16 heads of 72, text width
2816, patch 16, pooling 3, standardize) with random weights; one 280-token image (a 60 x 42 patch grid, the
default budget's 2520 patches). transformers' Gemma4VisionModel + embedder is the peer, built with the same
weights, on the same CPU threads.

    PYTHONPATH=python python bench/vision_encode.py --threads 2 [--wtype f32|f16] [--repeats 2] [--no-peer]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np

from diffgemma import binding as B
from diffgemma import devices, mmproj, vision, vision_convert

RELEASED = mmproj.VisionHParams(n_embd=1152, n_ff=4304, n_layer=27, n_head=16, head_dim=72, n_proj=2816,
                                patch_size=16, n_pos=10240, pool=3, standardize=True)
GRID = (60, 42)  # patch columns x rows: 20 x 14 = 280 soft tokens


def synthetic_weights(hp: mmproj.VisionHParams, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for s in mmproj.tensor_specs(hp):
        shape = tuple(reversed(s.shape))
        if s.role == mmproj.MATRIX:
            fan_in = s.shape[0] if s.name != "v.patch_embd.weight" else 3 * hp.patch_size ** 2
            w = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
        else:
            w = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        out[s.name] = w
    return out


def ours(path: pathlib.Path, patches: np.ndarray, threads: int, repeats: int) -> tuple[float, list[float], np.ndarray]:
    cpu = next(d for d in devices.local() if d.is_cpu)
    backend = B.lib.ggml_backend_dev_init(cpu.handle, B.ffi.NULL)
    B.set_n_threads(backend, threads)
    tower = vision.Tower(path, backends=[backend], gpu_dev=None)
    t0 = time.perf_counter()
    out = tower.encode(patches, *GRID)  # first call: builds and allocates the graph
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tower.encode(patches, *GRID)
        times.append(time.perf_counter() - t0)
    tower.close()
    B.lib.ggml_backend_free(backend)
    return first, times, out


def peer(hp: mmproj.VisionHParams, weights: dict[str, np.ndarray], patches: np.ndarray, threads: int,
         repeats: int) -> tuple[list[float], np.ndarray]:
    import torch
    from transformers import DiffusionGemmaConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaEncoderModel

    torch.set_num_threads(threads)
    vision = {"model_type": "gemma4_vision", "hidden_size": hp.n_embd, "intermediate_size": hp.n_ff,
              "num_hidden_layers": hp.n_layer, "num_attention_heads": hp.n_head, "num_key_value_heads": hp.n_head,
              "head_dim": hp.head_dim, "patch_size": hp.patch_size, "position_embedding_size": hp.n_pos,
              "pooling_kernel_size": hp.pool, "standardize": hp.standardize}
    text = {"hidden_size": hp.n_proj, "num_hidden_layers": 1, "vocab_size": 16, "intermediate_size": 8,
            "moe_intermediate_size": 8, "num_experts": 2, "top_k_experts": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "head_dim": 8, "global_head_dim": 8, "layer_types": ["full_attention"]}
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision)
    enc = DiffusionGemmaEncoderModel(cfg).eval()
    state = {}
    for gg, (rel, part) in vision_convert.hf_names(hp).items():
        if gg not in weights:
            continue
        w = weights[gg]
        if gg == "v.patch_embd.weight":  # OIHW back to (D, p*p*3)
            w = w.transpose(0, 2, 3, 1).reshape(hp.n_embd, -1)
        state[("vision_tower." if part == "tower" else "embed_vision.") + rel] = torch.from_numpy(
            np.ascontiguousarray(w))
    res = enc.load_state_dict(state, strict=False)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if k.startswith(("vision", "embed_vision"))]
    weights.clear()  # one copy in memory is enough
    cols, rows = GRID
    pos = np.stack(np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy"), -1).reshape(-1, 2)
    pv, pp = torch.from_numpy(patches)[None], torch.from_numpy(pos)[None]
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = enc.get_image_features(pv, pp).pooler_output
            if i:
                times.append(time.perf_counter() - t0)
    return times, out.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wtype", default="f32", choices=["f32", "f16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", tempfile.gettempdir()))
    args = ap.parse_args()
    hp = RELEASED
    weights = synthetic_weights(hp)
    n_params = sum(w.size for w in weights.values())
    patches = np.random.default_rng(1).random((GRID[0] * GRID[1], 3 * hp.patch_size ** 2), dtype=np.float32)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = mmproj.write(pathlib.Path(d) / "mmproj-26b-shapes.gguf", hp, weights, wtype=args.wtype)
        size = path.stat().st_size
        first, times, got = ours(path, patches, args.threads, args.repeats)
    print(f"tower: D {hp.n_embd}, {hp.n_layer} layers, FFN {hp.n_ff}, {hp.n_head}x{hp.head_dim} heads, "
          f"{n_params / 1e6:.0f} M parameters, {args.wtype} file {size / 2**20:.0f} MiB; image: {GRID[0]}x{GRID[1]} "
          f"patches -> {len(got)} tokens; CPU threads {args.threads}")
    print(f"diffgemma: first encode {first:.2f} s (graph build + run), then {[round(t, 2) for t in times]} s, "
          f"median {statistics.median(times):.2f} s")
    if not args.no_peer:
        ptimes, want = peer(hp, weights, patches, args.threads, args.repeats)
        print(f"transformers {__import__('transformers').__version__} (torch f32): {[round(t, 2) for t in ptimes]} s, "
              f"median {statistics.median(ptimes):.2f} s")
        print(f"ratio transformers / diffgemma: {statistics.median(ptimes) / statistics.median(times):.2f}x; "
              f"max |diff| of the embeddings {np.abs(got - want).max():.2e} (|max| {np.abs(want).max():.2f})")


if __name__ == "__main__":
    main()
