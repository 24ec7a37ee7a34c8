"""diffgemma bench / validate and the synthetic full-layout writer (output structure only, no timing asserts)."""

import json
import subprocess
import sys

import numpy as np

import diffgemma as dg
from diffgemma import bench, gguf_file, layout, testing


def _mid_hparams():
    swa = tuple((i + 1) % 6 != 0 for i in range(6))
    return testing.tiny_hparams(n_layer=6, swa_layers=swa, n_embd=256, n_head=4, n_head_kv_swa=2, n_head_kv_global=1,
                                head_dim=64, head_dim_swa=32, n_ff=512, n_ff_exp=256, n_expert=8, n_expert_used=2,
                                n_vocab=2048, sliding_window=32, canvas_length=32, rope_dim=64, rope_dim_swa=32)


def _recipe_like_types(hp):
    """asym-2bitexp-like types written directly (IQ2_S / IQ4_NL experts, Q5_K attention, Q6_K embedding)."""
    def ty(s):
        if s.role not in (layout.MATRIX, layout.EMBED):
            return 0
        if "gate_up_exps" in s.name:
            return 22
        if "down_exps" in s.name:
            return 20
        if s.name == "token_embd.weight":
            return 14
        return 13 if s.shape[0] % 256 == 0 else 7
    return {s.name: ty(s) for s in layout.tensor_specs(hp)}


def test_synthetic_mid_size_file_and_bench(tmp_path):
    hp = _mid_hparams()
    p = testing.write_synthetic(tmp_path / "mid-asym.gguf", hp, _recipe_like_types(hp))
    gf = gguf_file.read(p)
    assert gguf_file.validate(gf) == hp
    census = dict(x.split(":") for x in gguf_file.census(t.type_name for t in gf.tensors.values()).split(", "))
    assert census["iq2_s"] == "6" and census["iq4_nl"] == "6" and census["q6_K"] == "1"
    r = dg_bench = bench.bench(p, prompt_tokens=40, steps=2)
    assert dg_bench.transformers is None and r.ratio is None
    for k in ("prefill_ms", "step_ms", "effective_tokens_per_s", "peak_host_mb"):
        assert r.ours[k] > 0
    assert "ms / denoising step" in r.table()
    with dg.load(p) as m:  # random but valid blocks: finite logits
        assert np.isfinite(m.logits([2, 5, 6], list(range(32)))).all()


def test_bench_compare_transformers_json(tiny_f32):
    out = subprocess.run([sys.executable, "-m", "diffgemma.cli", "bench", "-m", str(tiny_f32), "--steps", "2",
                          "--prompt-tokens", "12", "--compare", "transformers", "--json"],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert r["ours"]["step_ms"] > 0 and r["transformers"]["step_ms"] > 0 and r["ratio"] > 0


def test_transformers_twin_has_the_same_weights(tiny_f32):
    """The reference rebuilt from a GGUF gives our logits (this is what the speed comparison runs)."""
    import torch

    ref = bench.hf_model_from_gguf(tiny_f32)
    prompt, canvas = [2, 9, 10, 11, 12, 13, 14, 15, 16, 17], list(range(30, 46))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([canvas])).logits[0].numpy()
    with dg.load(tiny_f32, kv_type="f32") as m:  # exact against the reference
        got = m.logits(prompt, canvas)
    assert np.abs(got - want).max() < 1e-3


def test_validate_report(tmp_path, tiny_f32):
    other = testing.write_model(tmp_path / "other.gguf", testing.tiny_hparams(), seed=9)
    out = tmp_path / "report.md"
    r = subprocess.run([sys.executable, "-m", "diffgemma.cli", "validate", str(tiny_f32), "--against", str(other),
                        "-o", str(out), "-n", "16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = out.read_text()
    for k in bench.VALIDATION_PROMPTS:
        assert f"| {k} |" in md and f"## {k}" in md
    assert "tiny-f32.gguf" in md and "other.gguf" in md
