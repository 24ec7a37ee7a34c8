"""Images in prompts against transformers' generate path (tiny random model with a vision tower): the encoder's
prompt-KV and the first canvas logits with two images, lock-step generation, chat messages with image parts."""

import dataclasses
from unittest import mock

import hf_reference as ref
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

import diffgemma as dg
from diffgemma import binding as B

BOI, IMG, EOI = 61, 60, 62  # ref.IMAGE_TOKEN_IDS
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "head_dim": 16, "patch_size": 4, "position_embedding_size": 32, "pooling_kernel_size": 2,
          "use_clipped_linears": True, "standardize": True}
GRIDS = [(8, 6), (6, 4)]  # patch grids (cols, rows) of the two images: 12 soft tokens (> the window of 8), 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("mm")
    hf = ref.make_hf_model(d / "hf", seed=7, vision=VISION)
    text = dg.convert(d / "hf", d / "text.gguf", outtype="f32", progress=False, mmproj=d / "mmproj.gguf")
    m = dg.load(text, mmproj=d / "mmproj.gguf", kv_type="f32")
    yield hf, m
    m.close()


def _text(n, seed):
    ids = np.random.default_rng(seed).integers(7, 512, n)
    return [int(t) for t in ids if t not in (BOI, IMG, EOI)]


def _images(seed=0):
    """Two patch grids with HF's padded pixel_values / image_position_ids and our per-image patches."""
    rng = np.random.default_rng(seed)
    M = max(c * r for c, r in GRIDS)
    pv, pos, ours = np.zeros((2, M, 48), np.float32), np.full((2, M, 2), -1, np.int64), []
    for i, (c, r) in enumerate(GRIDS):
        px = rng.random((c * r, 48), dtype=np.float32)
        pv[i, : c * r] = px
        pos[i, : c * r] = np.stack(np.meshgrid(np.arange(c), np.arange(r), indexing="xy"), -1).reshape(-1, 2)
        ours.append((px, c, r))
    return pv, pos, ours


def _prompt(ours, m):
    """[bos] text <|image> 12 x <|image|> <image|> text <|image> 6 x ... <image|> text, and our image spans."""
    ids, spans = [2] + _text(5, 1), []
    for i, (px, c, r) in enumerate(ours):
        ids.append(BOI)
        emb = m.vision.encode(px, c, r)
        spans.append((len(ids), emb))
        ids += [IMG] * len(emb) + [EOI] + _text(3 + i, 2 + i)
    return ids, spans


def _hf_prefill(hf, ids, pv, pos):
    """The encoder call of transformers' generate (mask mapping with mm_token_type_ids), as its first step."""
    n = len(ids)
    input_ids = torch.tensor([ids])
    positions = torch.arange(n).unsqueeze(0)
    cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
    mm = (input_ids == IMG).long()
    with torch.no_grad():
        mask = hf.model.encoder.create_masks_for_generate(
            config=hf.config, inputs_embeds=torch.empty((1, n, 0)), attention_mask=torch.ones((1, n), dtype=torch.bool),
            cache=cache, position_ids=positions, mm_token_type_ids=mm)
        out = hf.model.encoder(input_ids=input_ids, attention_mask=mask, cache=cache, position_ids=positions,
                               pixel_values=torch.from_numpy(pv), image_position_ids=torch.from_numpy(pos))
    return out.cache


def _store(m, il, positions):
    """Our prompt-KV of layer il at these committed positions: (k, v) as [n_kv_heads, len(positions), d]
    (sliding layers keep a ring: position p sits in slot p mod ring)."""
    store, out = m.prompt_kv, []
    slots = positions % store.ring if m.hparams.is_swa(il) else positions
    for t in (store.k[il], store.v[il]):
        d, h, cap = t.ne[0], t.ne[1], t.ne[2]
        a = np.empty((cap, h, d), np.float32)
        B.lib.ggml_backend_tensor_get(t, B.ffi.from_buffer(a), 0, a.nbytes)
        out.append(a[slots].transpose(1, 0, 2))
    return out


def test_prompt_kv_and_first_canvas_with_two_images(pair):
    hf, m = pair
    pv, pos, ours = _images()
    ids, spans = _prompt(ours, m)
    canvas = _text(40, 9)[:16]
    cache = _hf_prefill(hf, ids, pv, pos)
    got = m.logits(ids, canvas, images=spans)
    hp = m.hparams
    for il in range(hp.n_layer):
        hk, hv = (x[0].numpy() for x in (cache.layers[il].keys, cache.layers[il].values))
        keep = hk.shape[1]  # transformers' sliding layers keep only the last W-1
        k, v = _store(m, il, np.arange(len(ids) - keep, len(ids)))
        assert np.abs(k - hk).max() < 1e-3 and np.abs(v - hv).max() < 1e-3
    with torch.no_grad():
        n = len(ids)
        out = hf(cache=cache, decoder_input_ids=torch.tensor([canvas]),
                 decoder_position_ids=torch.arange(n, n + len(canvas)).unsqueeze(0))
    want = out.logits[0].numpy()
    assert np.abs(got - want).max() < 1e-3
    # The image block matters: a causal prefill (transformers' direct encoder call) gives other logits, and so
    # does a different second image (prompt-KV reuse must not keep the old one).
    other = [spans[0], (spans[1][0], spans[1][1][::-1].copy())]
    assert np.abs(m.logits(ids, canvas, images=other) - got).max() > 1e-2
    assert np.abs(m.logits(ids, canvas, images=spans) - got).max() < 1e-5
    tower = m.vision.hparams
    try:
        m.vision.hparams = dataclasses.replace(tower, bidirectional=False)
        m.reset()
        causal = m.logits(ids, canvas, images=spans)
    finally:
        m.vision.hparams = tower
        m.reset()
    assert np.abs(causal - got).max() > 1e-2


def _replay(rng, V):
    def randint(low, high=None, size=None, **kw):
        if high is None:
            low, high = 0, low
        assert (low, high) == (0, V)
        return torch.from_numpy(rng.integers(0, V, int(np.prod(size)))).reshape(size)

    def multinomial(probs, num_samples, **kw):
        u = rng.random(probs.shape[0], dtype=np.float32)
        cdf = torch.cumsum(probs.double(), -1)
        idx = (cdf < torch.from_numpy(u).double()[:, None] * cdf[:, -1:]).sum(-1)
        return idx.clamp(max=probs.shape[-1] - 1)[:, None]

    return mock.patch.object(torch, "randint", randint), mock.patch.object(torch, "multinomial", multinomial)


def test_generate_lock_step_with_an_image(pair):
    """A chat message with an image part: our preprocessing + tower + prompt vs the HF processor's pixels and
    transformers' generate, fed the same draws."""
    hf, m = pair
    V = m.hparams.n_vocab
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (20, 28, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": img},
                                         {"type": "text", "text": " what is it?"}]}]
    proc = Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)(images=[img],
                                                                                            return_tensors="pt")
    settings = {"steps": 6, "t_min": 0.4, "t_max": 0.8, "entropy_bound": 0.1, "stability": 1, "confidence": 0.005}
    for seed, n_new in ((1, 32), (2, 16)):  # two canvases once: the second encodes a canvas after the image
        ours = m.generate(msgs, max_new_tokens=n_new, seed=seed, image_budget=70, **settings)
        prompt = m.committed[: ours.prompt_tokens]
        n_img = prompt.count(IMG)
        assert n_img == int((proc["image_position_ids"][0][:, 0] >= 0).sum()) // 4 and BOI in prompt
        ids = torch.tensor([prompt])
        rng = np.random.Generator(np.random.PCG64(seed))
        p1, p2 = _replay(rng, V)
        with p1, p2, torch.no_grad():
            torch.manual_seed(seed)
            out = hf.generate(ids, max_new_tokens=n_new, max_denoising_steps=6, eos_token_id=[1, 6], pad_token_id=0,
                              t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005,
                              pixel_values=proc["pixel_values"], image_position_ids=proc["image_position_ids"],
                              mm_token_type_ids=(ids == IMG).long())
        theirs = [int(t) for t in out.sequences[0, ids.shape[1]:]]
        assert theirs[: len(ours.tokens)] == ours.tokens, f"seed {seed}"


def test_prompt_errors(pair, tiny_f32):
    hf, m = pair
    with pytest.raises(dg.Error, match="cannot read the image"):
        m.generate([{"role": "user", "content": [{"type": "image", "image": b"\x89PNG broken"}]}], max_new_tokens=8)
    with pytest.raises(dg.Error, match="bad content part"):
        m.generate([{"role": "user", "content": [{"type": "video", "video": "x"}]}], max_new_tokens=8)
    with pytest.raises(dg.Error, match="overlap|outside"):
        m.logits([2] * 10, [3] * 16, images=[(8, np.zeros((4, m.hparams.n_embd), np.float32))])
    with dg.load(tiny_f32) as text_only:
        with pytest.raises(dg.Error, match="without a vision tower"):
            text_only.generate([{"role": "user", "content": [{"type": "image", "image": np.zeros((9, 9, 3),
                                                                                                  np.uint8)}]}])


def test_chunks_never_cut_an_image_and_reuse_compares_pictures():
    from diffgemma import multimodal as mm

    a, b = mm.span(5, np.ones((10, 4))), mm.span(30, np.zeros((700, 4)))
    assert mm.chunk_bounds(0, 800, 8, [a])[:3] == [(0, 5), (5, 15), (15, 23)]
    bounds = mm.chunk_bounds(0, 800, 512, [a, b])
    assert bounds == [(0, 30), (30, 730), (730, 800)]  # the 700-token image is one pass
    assert mm.chunk_bounds(100, 50, 16, []) == [(0, 16), (16, 32), (32, 48), (48, 50)]
    same, other = mm.span(5, np.ones((10, 4))), mm.span(5, np.full((10, 4), 2.0))
    assert mm.reusable(40, [a], [same]) == 40 and mm.reusable(40, [a], [other]) == 5
    assert mm.reusable(40, [], [same]) == 5 and mm.reusable(40, [a], []) == 5 and mm.reusable(3, [a], []) == 3
