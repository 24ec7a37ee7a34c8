"""Typed weight records (weights.py) and the graph's node names."""

import dataclasses
import types

import numpy as np
import pytest

import diffgemma as dg
from diffgemma import binding as B
from diffgemma import gguf_file, layout, testing, weights
from diffgemma.gguf_file import Writer
from diffgemma.weights import ModelWeights


def _stand_ins(hp, fused=True):
    """Every layout name mapped to a distinct stand-in object (the builder never looks inside a tensor)."""
    return {s.name: object() for s in layout.tensor_specs(hp, fused_gate_up=fused)}


def test_records_follow_the_layout():
    hp = testing.tiny_hparams()
    tensors = _stand_ins(hp)
    w = ModelWeights.build(hp, tensors, lambda name: 2.0 if name.startswith("blk.1.") else 1.0)
    assert len(w.layers) == hp.n_layer and w.token_embd is tensors["token_embd.weight"]
    for il, L in enumerate(w.layers):
        assert (L.attn_v is None) == (not hp.is_swa(il))  # a global layer has no V projection
        assert L.attn_q is tensors[f"blk.{il}.attn_q.weight"]
        assert L.ffn_gate_inp_scale is tensors[f"blk.{il}.ffn_gate_inp.scale"]
        assert L.ffn_gate_up_exps is not None and L.ffn_gate_exps is None and L.ffn_up_exps is None
        assert L.layer_output_scale == L.enc_layer_output_scale == (2.0 if il == 1 else 1.0)  # read on the host
    split = ModelWeights.build(hp, _stand_ins(hp, fused=False), lambda name: 1.0).layers[0]
    assert split.ffn_gate_up_exps is None and split.ffn_gate_exps is not None and split.ffn_up_exps is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.layers[0].attn_q = None


def test_missing_and_misspelled_tensors_all_listed():
    hp = testing.tiny_hparams()
    tensors = _stand_ins(hp)
    del tensors["blk.2.ffn_down_exps.weight"]
    tensors["blk.1.attn_qq.weight"] = tensors.pop("blk.1.attn_q.weight")
    with pytest.raises(dg.GGUFError) as e:
        ModelWeights.build(hp, tensors, lambda name: 1.0)
    msg = str(e.value)
    assert "3 problem(s)" in msg and "unexpected tensor blk.1.attn_qq.weight" in msg
    assert "missing tensor blk.1.attn_q.weight" in msg and "missing tensor blk.2.ffn_down_exps.weight" in msg


def test_layout_name_without_a_field_fails_at_load(monkeypatch, tiny_f32):
    """A tensor name the records do not know (a typo in the layout table) is an Error at load, listing both
    sides, not a failure while a graph is built."""
    def misspelled(hp, fused_gate_up=True):
        return [dataclasses.replace(s, name=s.name.replace("attn_k_norm", "attn_knorm"))
                for s in layout.tensor_specs(hp, fused_gate_up)]

    # the records' view of the layout has the typo; the file and its validation are as published
    monkeypatch.setattr(weights, "layout", types.SimpleNamespace(**{**vars(layout), "tensor_specs": misspelled}))
    hp = testing.tiny_hparams()
    with pytest.raises(dg.GGUFError) as e:
        ModelWeights.build(hp, _stand_ins(hp), lambda name: 1.0)
    msg = str(e.value)
    assert "blk.0.attn_knorm.weight: no field 'attn_knorm' in LayerWeights" in msg
    assert "LayerWeights.attn_k_norm: the layout names no tensor for it" in msg
    with pytest.raises(dg.GGUFError, match="no field 'attn_knorm'"):
        dg.load(tiny_f32)


def test_misspelled_tensor_in_a_file_fails_at_load(tmp_path, tiny_f32):
    gf = gguf_file.read(tiny_f32)
    w = Writer(tmp_path / "typo.gguf", copy_kv_from=tiny_f32)
    rename = {"blk.3.ffn_gate_inp.weight": "blk.3.ffn_gate_imp.weight"}
    for t in gf.tensors.values():
        w.add_tensor(rename.get(t.name, t.name), t.shape, t.type)
    back = {v: k for k, v in rename.items()}
    w.write(lambda n: np.zeros(gf.tensors[back.get(n, n)].nbytes, np.uint8))
    with pytest.raises(dg.GGUFError) as e:
        dg.load(tmp_path / "typo.gguf")
    assert "missing tensor blk.3.ffn_gate_inp.weight" in str(e.value)
    assert "unexpected tensor blk.3.ffn_gate_imp.weight" in str(e.value)


def test_product_names_round_trip():
    assert weights.product_name("blk.3.attn_q.weight") == "attn_q-3"
    assert weights.product_name("self_cond_gate.weight") == "self_cond_gate"
    for name in ("blk.3.attn_q.weight", "blk.12.ffn_gate_up_exps.weight", "blk.0.ffn_gate_inp.weight",
                 "blk.0.ffn_up_exps.weight", "self_cond_down.weight"):
        assert weights.weight_of_product(weights.product_name(name)) == name
    # norms (named after llama.cpp, like their weights), the LM head, views and other nodes are no products
    for node in ("attn_norm-3", "ffn_norm_1-0", "token_embd", "token_embd_t", "attn_q-3 (reshaped)", "l_out-2",
                 "logits", "self_cond_pre_norm", "attn_q"):
        assert weights.weight_of_product(node) is None


def test_graph_nodes_are_named(tiny_f32):
    """The computed graphs carry llama.cpp-style names: Model.observe's callback sees them, and node_names (a
    dry build) lists the same."""
    seen: set[str] = set()

    def on_node(t, ask):
        if ask:
            seen.add(B.ffi.string(t.name).decode())
        return True

    with dg.load(tiny_f32) as m:
        with m.observe(on_node):
            m.logits([2, 40, 41, 42], np.arange(100, 100 + m.hparams.canvas_length))
        hp, dry = m.hparams, set(m.node_names())
    last, swa = hp.n_layer - 1, hp.swa_layers.index(True)
    for name in ("inp_scaled", "inp_embd", "self_cond_gate", "self_cond_down", "result_norm", "token_embd", "logits",
                 "attn_norm-0", "attn_q-0", "Qcur_normed-0", "Kcur_pos-0", "Vcur_normed-0", "kqv_out-0",
                 "attn_output-0", "attn_out-0", "ffn_norm_1-0", "ffn_gate-0", "ffn_mlp-0", "ffn_gate_inp-0",
                 "ffn_moe_probs-0", "ffn_moe_topk-0", "ffn_gate_up_exps-0", "ffn_down_exps-0", "ffn_moe-0",
                 "ffn_post_norm-0", f"l_out-{last}", f"attn_v-{swa}"):
        assert name in seen and name in dry, name
    assert f"attn_v-{last}" not in seen  # a global layer: V is the K projection


def test_observe_raises_the_callbacks_error_and_restores(tiny_f32):
    calls = []

    def failing(t, ask):
        calls.append(ask)
        if not ask:
            raise KeyError("boom")
        return True

    with dg.load(tiny_f32) as m:
        canvas = np.arange(100, 100 + m.hparams.canvas_length)
        want = m.logits([2, 40, 41], canvas)
        with pytest.raises(KeyError, match="boom"):
            with m.observe(failing):
                m.logits([2, 40, 41], canvas)
        with m.observe(lambda t, ask: False):
            with pytest.raises(dg.Error, match="do not nest"):
                with m.observe(lambda t, ask: False):
                    pass
            np.testing.assert_array_equal(m.logits([2, 40, 41], canvas), want)  # observing changes nothing
        n = len(calls)
        np.testing.assert_array_equal(m.logits([2, 40, 41], canvas), want)
        assert len(calls) == n  # uninstalled at the end of the block


def test_prefill_encodes_only_what_is_new(tiny_f32):
    with dg.load(tiny_f32) as m:
        done = []
        m.prefill([2, 40, 41, 42], on_progress=lambda d, t: done.append((d, t)))
        m.prefill([2, 40, 41, 42, 43, 44], on_progress=lambda d, t: done.append((d, t)))
        assert m.committed == [2, 40, 41, 42, 43, 44] and done == [(4, 4), (2, 2)]
        m.prefill([2, 40, 50], on_progress=lambda d, t: done.append((d, t)))  # diverged: keeps [2, 40]
        assert m.committed == [2, 40, 50] and done[-1] == (1, 1)
        with pytest.raises(dg.Error, match="token ids"):
            m.prefill([2, -1])
        with m.exclusive() as held:
            assert held is m
