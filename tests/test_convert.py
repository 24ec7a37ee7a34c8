"""diffgemma.converter: Hugging Face DiffusionGemma checkpoint → `diffusion-gemma` GGUF (tiny random models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import hf_reference as ref
import numpy as np
import pytest
import torch

from diffgemma import converter as conv
from diffgemma import gguf_file, layout
from diffgemma.errors import Error, GGUFError
from diffgemma.sampler import SamplerSettings

Q = gguf.GGMLQuantizationType
T = gguf.TokenType

# The tiny model of hf_reference with its defaults, written out by hand (independently of the converter).
EXPECTED_HP = layout.HParams(
    n_layer=4, n_embd=64, n_vocab=512, n_head=4, n_head_kv=(2, 1, 2, 1), head_dim=32, head_dim_swa=16,
    n_ff=96, n_ff_exp=32, n_expert=4, n_expert_used=2, sliding_window=8,
    swa_layers=(True, False, True, False),
    rope_base=1e6, rope_base_swa=1e4, rope_dim=32, rope_dim_swa=16, rms_eps=1e-6, softcap=30.0,
    canvas_length=16, context_length=1024,
)
# hf_reference's generation_config.json settings (all different from the reference defaults).
EXPECTED_SAMPLER = SamplerSettings(steps=12, t_min=0.3, t_max=0.9, entropy_bound=0.2, stability=2, confidence=0.01)

# GGUF name → HF checkpoint name, written out independently of the converter's own table.
_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "layer_output_scale.weight": "layer_scalar",
}
_GLOBAL = {
    "token_embd.weight": "model.decoder.embed_tokens.weight",
    "output_norm.weight": "model.decoder.norm.weight",
    "self_cond_pre_norm.weight": "model.decoder.self_conditioning.pre_norm.weight",
    "self_cond_gate.weight": "model.decoder.self_conditioning.gate_proj.weight",
    "self_cond_up.weight": "model.decoder.self_conditioning.up_proj.weight",
    "self_cond_down.weight": "model.decoder.self_conditioning.down_proj.weight",
}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    if gguf_name == "rope_freqs.weight":
        return None
    _, il, suffix = gguf_name.split(".", 2)
    if suffix == "enc_layer_output_scale.weight":
        return f"model.encoder.language_model.layers.{il}.layer_scalar"
    return f"model.decoder.layers.{il}.{_PER_LAYER[suffix]}"


def fields(reader: Any) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(reader: Any) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def np_data(t: Any) -> np.ndarray:
    """A tensor's data as float32 in numpy order (dequantized when needed)."""
    shape = tuple(int(x) for x in reversed(t.shape))
    if t.tensor_type == Q.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    if t.tensor_type == Q.F16:
        return np.asarray(t.data).view(np.float16).astype(np.float32).reshape(shape)
    if t.tensor_type == Q.BF16:
        bits = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def no_outputs(d: Path) -> bool:
    return not [p for p in d.iterdir() if p.name.endswith(".gguf") or ".tmp-" in p.name]


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("conv")
    hf_dir = root / "tiny-dg"
    model = ref.make_hf_model(hf_dir, seed=0)
    return {"root": root, "dir": hf_dir, "model": model, "state": ref.hf_state(model), "outs": {}}


def converted(hf_tiny: dict[str, Any], outtype: str) -> Any:
    outs = hf_tiny["outs"]
    if outtype not in outs:
        out = hf_tiny["root"] / f"tiny-{outtype}.gguf"
        path = conv.convert(hf_tiny["dir"], out, outtype=outtype, progress=False)
        outs[outtype] = gguf.GGUFReader(path)
    return outs[outtype]


# ---- metadata ---------------------------------------------------------------------------------------


def test_hparams_from_config(hf_tiny: dict[str, Any]) -> None:
    config = json.loads((hf_tiny["dir"] / "config.json").read_text())
    gen = json.loads((hf_tiny["dir"] / "generation_config.json").read_text())
    assert "per_layer_config" in config["text_config"]  # what save_pretrained writes
    hp, prf = conv.hparams_from_hf(config)
    assert hp == EXPECTED_HP
    assert prf == 0.25
    assert conv.sampler_from_hf(gen) == EXPECTED_SAMPLER


def test_hparams_of_released_style_config() -> None:
    """The released config.json carries global_head_dim / num_global_key_value_heads (no per_layer_config)
    and may omit layer_types; that must give the published 26B-A4B hyper-parameters."""
    config = {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": 256,
        "text_config": {
            "model_type": "diffusion_gemma_text", "hidden_size": 2816, "num_hidden_layers": 30,
            "num_attention_heads": 16, "num_key_value_heads": 8, "num_global_key_value_heads": 2,
            "head_dim": 256, "global_head_dim": 512, "intermediate_size": 2112, "moe_intermediate_size": 704,
            "num_experts": 128, "top_k_experts": 8, "vocab_size": 262144, "sliding_window": 1024,
            "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
            "use_bidirectional_attention": "vision",
        },
    }
    gen = {"max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
           "confidence_threshold": 0.005, "eos_token_id": [1, 106, 50], "pad_token_id": 0,
           "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1}}
    hp, prf = conv.hparams_from_hf(config)
    assert hp == layout.full_26b_a4b()
    assert prf == 0.25
    assert layout.rope_freq_factors(hp, prf) == [1.0] * 64 + [1e30] * 192
    s = conv.sampler_from_hf(gen)
    assert (s.steps, s.t_min, s.t_max, s.entropy_bound, s.stability, s.confidence) == (48, 0.4, 0.8, 0.1, 1, 0.005)
    # null / absent sampler settings fall back to the published defaults
    s2 = conv.sampler_from_hf({"max_denoising_steps": None, "sampler_config": None})
    assert (s2.steps, s2.t_min, s2.t_max, s2.entropy_bound, s2.stability, s2.confidence) == (
        48, 0.4, 0.8, 0.1, 1, 0.005)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"use_bidirectional_attention": "all"}, "bidirectional"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"hidden_activation": "silu"}, "hidden_activation"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}}, "rope_type"),
        ({"rope_parameters": {"full_attention": {"rope_type": "proportional", "factor": 8.0}}}, "factor"),
        ({"num_experts": None}, "num_experts"),
        ({"num_hidden_layers": "four"}, "num_hidden_layers"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ],
)
def test_hparams_rejects_unsupported_configs(
    hf_tiny: dict[str, Any], edit: dict[str, Any], message: str
) -> None:
    config = json.loads((hf_tiny["dir"] / "config.json").read_text())
    config["text_config"].update(edit)
    with pytest.raises(Error, match=message):
        conv.hparams_from_hf(config)


def test_metadata_keys(hf_tiny: dict[str, Any]) -> None:
    md = fields(converted(hf_tiny, "f32"))
    assert md["general.architecture"] == "diffusion-gemma"
    assert md["general.name"] == "tiny-dg"
    assert md["general.file_type"] == 0
    assert md["general.quantization_version"] == 2
    for key, want in {**layout.hparams_to_metadata(EXPECTED_HP), **EXPECTED_SAMPLER.to_metadata()}.items():
        assert key in md, key
        got = md[key]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6), key
        else:
            assert got == want, key
    hp, problems = layout.hparams_from_metadata(md)
    assert problems == []
    assert hp is not None
    for f in ("n_layer", "n_embd", "n_vocab", "n_head", "n_head_kv", "head_dim", "head_dim_swa", "n_ff",
              "n_ff_exp", "n_expert", "n_expert_used", "sliding_window", "swa_layers", "canvas_length"):
        assert getattr(hp, f) == getattr(EXPECTED_HP, f), f
    assert SamplerSettings.from_metadata(md) == EXPECTED_SAMPLER


def test_tokenizer_metadata(hf_tiny: dict[str, Any]) -> None:
    md = fields(converted(hf_tiny, "f32"))
    tok = ref.make_tokenizer(512)
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    assert md["tokenizer.ggml.model"] == "gemma4"
    tokens = md["tokenizer.ggml.tokens"]
    assert tokens == [by_id[i] for i in range(512)]
    types = md["tokenizer.ggml.token_type"]
    assert len(types) == len(md["tokenizer.ggml.scores"]) == 512
    for i in range(len(ref.SPECIAL_TOKENS)):
        assert types[i] == (T.UNKNOWN if i == ref.UNK_ID else T.CONTROL), i
    assert types[ref.USER_TOKEN_ID] == T.USER_DEFINED
    assert all(types[ref.BYTE_TOKEN_BASE + b] == T.BYTE for b in range(256))
    assert tokens[ref.BYTE_TOKEN_BASE + 0x41] == "<0x41>"
    assert set(types[ref.BYTE_TOKEN_BASE + 256:]) == {T.NORMAL}
    tj = json.loads((hf_tiny["dir"] / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert md["tokenizer.ggml.merges"] == merges and len(merges) > 100
    assert md["tokenizer.ggml.bos_token_id"] == ref.BOS_ID
    assert md["tokenizer.ggml.eos_token_id"] == ref.EOS_ID
    assert md["tokenizer.ggml.padding_token_id"] == ref.PAD_ID
    assert md["tokenizer.ggml.unknown_token_id"] == ref.UNK_ID
    assert md["tokenizer.ggml.mask_token_id"] == ref.MASK_ID
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["diffusion.eos_token_ids"] == ref.EOS_IDS
    assert md["tokenizer.chat_template"] == ref.CHAT_TEMPLATE
    enc = tok.encode("Hello world, the model writes text.")
    assert [tokens[i] for i in enc.ids] == enc.tokens


def test_read_tokenizer_pads_and_rejects(hf_tiny: dict[str, Any]) -> None:
    data = conv.read_tokenizer(hf_tiny["dir"], 520)
    assert len(data.tokens) == len(data.token_types) == len(data.scores) == 520
    assert data.tokens[ref.USER_TOKEN_ID] == "<unused0>"
    assert data.tokens[512:] == [f"<unused{i}>" for i in range(1, 9)]  # names never collide
    assert set(data.token_types[512:]) == {T.USER_DEFINED}
    with pytest.raises(Error, match="vocab_size is 500"):
        conv.read_tokenizer(hf_tiny["dir"], 500)


def test_chat_template_from_tokenizer_config(hf_tiny: dict[str, Any], tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(hf_tiny["dir"], d)
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert conv.read_tokenizer(d, 512).chat_template == "D"


# ---- tensors ----------------------------------------------------------------------------------------


def expected_type(spec: layout.TensorSpec, outtype: str) -> Any:
    if spec.role in (layout.VECTOR, layout.ROUTER):
        return Q.F32
    if outtype == "q8_0" and spec.shape[0] % 32:
        return Q.F16
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_tensor_layout_and_types(hf_tiny: dict[str, Any], outtype: str) -> None:
    reader = converted(hf_tiny, outtype)
    specs = layout.tensor_specs(EXPECTED_HP)
    assert [t.name for t in reader.tensors] == [s.name for s in specs]
    for t, s in zip(reader.tensors, specs, strict=True):
        assert tuple(int(x) for x in t.shape) == s.shape, s.name
        assert t.tensor_type == expected_type(s, outtype), s.name
    assert fields(reader)["general.file_type"] == conv.OUTTYPES[outtype][1]


def test_f32_values_exact(hf_tiny: dict[str, Any]) -> None:
    reader = converted(hf_tiny, "f32")
    state = hf_tiny["state"]
    for t in reader.tensors:
        name = hf_name(t.name)
        got = np_data(t)
        if name is None:  # rope_freqs: 4 of 16 pairs rotate (partial 0.25 of head dim 32)
            np.testing.assert_array_equal(got, np.array([1.0] * 4 + [1e30] * 12, dtype=np.float32))
            # agrees with transformers' proportional RoPE: frequency 0 exactly where the factor is 1e30
            inv = hf_tiny["model"].model.decoder.rotary_emb.full_attention_inv_freq.numpy()
            np.testing.assert_array_equal(inv == 0, got == 1e30)
            np.testing.assert_allclose(inv[:4], 1e6 ** (-np.arange(0, 8, 2) / 32), rtol=1e-6)
            continue
        np.testing.assert_array_equal(got, state[name], err_msg=t.name)
    # the two per-layer scalars are different tensors with their own values
    byname = tensors(reader)
    for il in range(EXPECTED_HP.n_layer):
        dec = np_data(byname[f"blk.{il}.layer_output_scale.weight"])
        enc = np_data(byname[f"blk.{il}.enc_layer_output_scale.weight"])
        assert dec.shape == enc.shape == (1,)
        assert dec[0] != enc[0]
        assert dec[0] == state[f"model.decoder.layers.{il}.layer_scalar"][0]
        assert enc[0] == state[f"model.encoder.language_model.layers.{il}.layer_scalar"][0]
        assert 0.5 <= dec[0] <= 1.5 and 0.5 <= enc[0] <= 1.5


def test_fused_experts_match_hf_forward(hf_tiny: dict[str, Any]) -> None:
    """Gate rows come first in ffn_gate_up_exps: an MoE computed from the GGUF tensors equals HF's."""
    reader = converted(hf_tiny, "f32")
    byname = tensors(reader)
    model = hf_tiny["model"]
    il, I = 1, EXPECTED_HP.n_ff_exp
    gate_up = np_data(byname[f"blk.{il}.ffn_gate_up_exps.weight"])  # [E, 2I, H]
    down = np_data(byname[f"blk.{il}.ffn_down_exps.weight"])  # [E, H, I]
    assert gate_up.shape == (4, 2 * I, 64) and down.shape == (4, 64, I)
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    top_i = np.array([[0, 2], [1, 3], [3, 0], [2, 1], [1, 0]])
    top_w = np.random.default_rng(1).random((5, 2)).astype(np.float32)

    def gelu_tanh(v: np.ndarray) -> np.ndarray:
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    want = np.zeros_like(x)
    for t in range(5):
        for k in range(2):
            e = top_i[t, k]
            g, u = gate_up[e, :I] @ x[t], gate_up[e, I:] @ x[t]
            want[t] += top_w[t, k] * (down[e] @ (gelu_tanh(g) * u))
    with torch.no_grad():
        got = model.model.decoder.layers[il].experts(torch.from_numpy(x), torch.from_numpy(top_i),
                                                      torch.from_numpy(top_w)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_reduced_precision_values(hf_tiny: dict[str, Any], outtype: str) -> None:
    reader = converted(hf_tiny, outtype)
    state = hf_tiny["state"]
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        src = state[name]
        raw = np.asarray(t.data)
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(np_data(t), src, err_msg=t.name)
        elif t.tensor_type == Q.F16:
            np.testing.assert_array_equal(raw.view(np.float16).reshape(src.shape), src.astype(np.float16))
        elif t.tensor_type == Q.BF16:
            want = torch.from_numpy(src).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            np.testing.assert_array_equal(raw.view(np.uint16).reshape(src.shape), want, err_msg=t.name)
        else:
            assert t.tensor_type == Q.Q8_0
            want_q = gguf.quants.quantize(src.reshape(-1, src.shape[-1]), Q.Q8_0)
            np.testing.assert_array_equal(raw.reshape(want_q.shape), want_q, err_msg=t.name)
            np.testing.assert_allclose(np_data(t), src, atol=float(np.abs(src).max()) / 100)


def test_q8_0_falls_back_to_f16_for_odd_rows(tmp_path: Path) -> None:
    d = tmp_path / "odd"
    ref.make_hf_model(d, intermediate=80)  # ffn_down / self_cond_down rows of 80: not a multiple of 32
    reader = gguf.GGUFReader(conv.convert(d, tmp_path / "odd.gguf", outtype="q8_0", progress=False))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["self_cond_down.weight"] == Q.F16 and types["blk.0.ffn_down.weight"] == Q.F16
    assert types["self_cond_gate.weight"] == Q.Q8_0 and types["blk.0.ffn_gate_up_exps.weight"] == Q.Q8_0
    assert types["blk.0.ffn_gate_inp.weight"] == Q.F32


def test_sharded_checkpoint_converts_identically(hf_tiny: dict[str, Any]) -> None:
    d = hf_tiny["root"] / "tiny-dg-sharded"
    ref.make_hf_model(d, seed=0, max_shard_size="200KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("model-*.safetensors"))) > 2
    a = converted(hf_tiny, "f32")
    b = gguf.GGUFReader(conv.convert(d, hf_tiny["root"] / "sharded.gguf", outtype="f32", progress=False))
    fa, fb = fields(a), fields(b)
    assert fb.pop("general.name") == "tiny-dg-sharded"
    fa.pop("general.name")
    assert fa == fb
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert np.asarray(ta.data).tobytes() == np.asarray(tb.data).tobytes(), ta.name


def test_bf16_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "bf"
    model = ref.make_hf_model(d, seed=1, dtype="bfloat16")
    sd = model.state_dict()
    assert sd["model.decoder.embed_tokens.weight"].dtype == torch.bfloat16
    out16 = gguf.GGUFReader(conv.convert(d, tmp_path / "bf16.gguf", outtype="bf16", progress=False))
    out32 = gguf.GGUFReader(conv.convert(d, tmp_path / "f32.gguf", progress=False, outtype="f32"))
    for t16, t32 in zip(out16.tensors, out32.tensors, strict=True):
        name = hf_name(t16.name)
        if name is None:
            continue
        want = sd[name].to(torch.float32).numpy()
        np.testing.assert_array_equal(np_data(t32), want, err_msg=t32.name)  # exact widening
        if t16.tensor_type == Q.BF16:  # bf16 → bf16: the stored bits are copied
            bits = sd[name].view(torch.int16).numpy().view(np.uint16)
            np.testing.assert_array_equal(np.asarray(t16.data).view(np.uint16).reshape(bits.shape), bits)
        else:
            assert t16.tensor_type == Q.F32
            np.testing.assert_array_equal(np_data(t16), want)


def test_bf16_codec() -> None:
    """The one bf16 codec (gguf_file): torch's rounding, ggml's quiet NaNs (bit for bit what gguf.quants writes,
    which the tiny-model and mmproj writers used before), and an exact decode."""
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.4e38, np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40],
                 dtype=np.float32)
    x = np.concatenate([x, np.random.default_rng(0).standard_normal(4096, dtype=np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = gguf_file.f32_to_bf16_bits(x)
    np.testing.assert_array_equal(got[~np.isnan(x)], want[~np.isnan(x)])
    np.testing.assert_array_equal(got, gguf.quants.quantize(x, Q.BF16).view(np.uint16))
    np.testing.assert_array_equal(gguf_file.encode(x, Q.BF16), got)
    back = gguf_file.bf16_bits_to_f32(got)
    assert back.dtype == np.float32 and np.isnan(back[np.isnan(x)]).all()
    np.testing.assert_array_equal(back[~np.isnan(x)], torch.from_numpy(want.view(np.int16)).view(torch.bfloat16)
                                  .float().numpy()[~np.isnan(x)])


def test_output_directory_and_progress(hf_tiny: dict[str, Any], tmp_path: Path) -> None:
    path = conv.convert(hf_tiny["dir"], tmp_path, outtype="f16", progress=True)
    assert path == tmp_path / "tiny-dg-f16.gguf" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-dg-f16.gguf"]


# ---- errors -----------------------------------------------------------------------------------------


def copy_model(hf_tiny: dict[str, Any], tmp_path: Path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(hf_tiny["dir"], d)
    return d


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(Error, match="not a directory"):
        conv.convert(tmp_path / "nope", tmp_path / "o.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Error, match="config.json"):
        conv.convert(tmp_path / "empty", tmp_path / "o.gguf")
    assert no_outputs(tmp_path)


def test_bad_outtype(hf_tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(Error, match="outtype"):
        conv.convert(hf_tiny["dir"], tmp_path / "o.gguf", outtype="q4_0")


def test_wrong_architecture(hf_tiny: dict[str, Any], tmp_path: Path) -> None:
    d = copy_model(hf_tiny, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["Gemma4ForConditionalGeneration"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Error, match="DiffusionGemmaForBlockDiffusion"):
        conv.convert(d, tmp_path / "o.gguf")
    assert no_outputs(tmp_path)


def test_missing_tokenizer(hf_tiny: dict[str, Any], tmp_path: Path) -> None:
    d = copy_model(hf_tiny, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(Error, match="tokenizer.json"):
        conv.convert(d, tmp_path / "o.gguf")
    assert no_outputs(tmp_path)


def test_missing_tensor(hf_tiny: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    d = copy_model(hf_tiny, tmp_path)
    weights = load_file(str(d / "model.safetensors"))
    del weights["model.encoder.language_model.layers.2.layer_scalar"]
    del weights["model.decoder.layers.1.router.per_expert_scale"]
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(GGUFError) as info:
        conv.convert(d, tmp_path / "o.gguf")
    msg = str(info.value)
    assert "2 tensor(s) missing" in msg
    assert "blk.2.enc_layer_output_scale.weight" in msg and "blk.1.ffn_down_exps.scale" in msg
    assert no_outputs(tmp_path)


def test_shape_mismatch(hf_tiny: dict[str, Any], tmp_path: Path) -> None:
    d = copy_model(hf_tiny, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    want = r"experts\.gate_up_proj: shape \[4, 64, 64\], expected \[4, 32, 64\]"
    with pytest.raises(GGUFError, match=want):
        conv.convert(d, tmp_path / "o.gguf")
    assert no_outputs(tmp_path)


def test_layer_types_disagreeing_with_weights(hf_tiny: dict[str, Any], tmp_path: Path) -> None:
    d = copy_model(hf_tiny, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["layer_types"] = ["sliding_attention"] * 3 + ["full_attention"]
    cfg["text_config"]["per_layer_config"] = {"3": {"head_dim": 32, "num_key_value_heads": 1}}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGUFError, match="blk.1.attn_v.weight"):
        conv.convert(d, tmp_path / "o.gguf")


def test_truncated_safetensors(hf_tiny: dict[str, Any], tmp_path: Path) -> None:
    d = copy_model(hf_tiny, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Error, match="truncated"):
        conv.convert(d, tmp_path / "o.gguf")
    assert no_outputs(tmp_path)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_conversion_leaves_nothing(
    hf_tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]
) -> None:
    real = conv._encode
    calls = {"n": 0}

    def flaky(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 30:
            raise exc(28, "No space left on device") if exc is OSError else exc()
        return real(*a, **kw)

    monkeypatch.setattr(conv, "_encode", flaky)
    out = tmp_path / "o.gguf"
    with pytest.raises(Error if exc is OSError else KeyboardInterrupt):
        conv.convert(hf_tiny["dir"], out, outtype="f16", progress=False)
    assert calls["n"] == 30
    assert list(tmp_path.iterdir()) == []


def test_existing_output_replaced_only_on_success(
    hf_tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o.gguf"
    out.write_bytes(b"old")

    def boom(*a: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt

    with pytest.raises(Error, match="already exists"):  # refused without overwrite=True
        conv.convert(hf_tiny["dir"], out, progress=False)
    monkeypatch.setattr(conv, "_encode", boom)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(hf_tiny["dir"], out, progress=False, overwrite=True)
    assert out.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


# ---- the reference helpers themselves -----------------------------------------------------------


def test_hf_logits_reproduces_generate(hf_tiny: dict[str, Any]) -> None:
    """hf_logits (prompt + finished canvases encoded chunk by chunk) gives exactly the logits `generate`
    computed at every denoising step of every canvas, self-conditioning included."""
    model = hf_tiny["model"]
    seen: list[dict[str, Any]] = []
    real_forward = model.forward

    def spy(*a: Any, **kw: Any) -> Any:
        out = real_forward(*a, **kw)
        sc = kw.get("self_conditioning_logits")
        seen.append({"canvas": kw["decoder_input_ids"][0].tolist(),
                     "pos": int(kw["decoder_position_ids"][0, 0]),
                     "sc": None if sc is None else sc[0].float().numpy().copy(),
                     "logits": out.logits[0].float().numpy().copy()})
        return out

    prompt = list(range(20, 33))  # 13 tokens: longer than the sliding window (8)
    model.forward = spy
    try:
        torch.manual_seed(5)
        with torch.no_grad():
            seq = model.generate(torch.tensor([prompt]), max_new_tokens=32, max_denoising_steps=3,
                                 eos_token_id=None, pad_token_id=None, stability_threshold=None).sequences[0]
    finally:
        del model.forward
    seq = seq.tolist()
    assert len(seen) == 6 and len(seq) == 13 + 32
    L = 16
    for i, call in enumerate(seen):
        c = i // 3
        assert call["pos"] == 13 + c * L
        assert (call["sc"] is None) == (i % 3 == 0)
        finished = [seq[13 + L * j:13 + L * (j + 1)] for j in range(c)]
        got = ref.hf_logits(model, prompt, call["canvas"], call["sc"], finished=finished)
        np.testing.assert_allclose(got, call["logits"], rtol=0, atol=1e-6)
    toks = ref.hf_generate(model, prompt, seed=5, max_new_tokens=32, steps=3, eos=None, pad=None,
                           stability_threshold=None)
    assert toks == seq[13:]
