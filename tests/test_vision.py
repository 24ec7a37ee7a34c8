"""The Gemma-4 vision tower on ggml against transformers (tiny random towers), preprocessing against the HF
processor (PIL backend), and the mmproj file's validation."""

import io

import hf_reference as ref
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

import diffgemma as dg
from diffgemma import gguf_file, images, mmproj, vision_convert

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "head_dim": 16, "patch_size": 4, "position_embedding_size": 32}
TOWERS = {
    # name: vision config overrides (clamps and standardize on and off, both pooling kernels)
    "clip-std-k2": {"pooling_kernel_size": 2, "use_clipped_linears": True, "standardize": True},
    "plain-k3": {"pooling_kernel_size": 3},
    "clip-k3": {"pooling_kernel_size": 3, "use_clipped_linears": True, "num_attention_heads": 4,
                "num_key_value_heads": 4, "head_dim": 8},
}


def _grid(k, cols, rows, seed=0):
    pix = np.random.default_rng(seed).random((rows * cols, 48), dtype=np.float32)
    pos = np.stack(np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy"), -1).reshape(-1, 2)
    return pix, pos


def _hf_features(hf, pix, pos):
    with torch.no_grad():
        out = hf.model.encoder.get_image_features(torch.from_numpy(pix)[None], torch.from_numpy(pos)[None])
    return out.pooler_output.numpy()


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = ref.make_hf_model(d / "hf", seed=3, vision={**TOWER, **TOWERS[request.param]})
    mm = d / "mmproj.gguf"
    text = dg.convert(d / "hf", d / "text.gguf", outtype="f32", progress=False, mmproj=mm)
    m = dg.load(text, mmproj=mm)
    hf.hf_dir = d / "hf"
    yield hf, m, request.param
    m.close()


@pytest.mark.parametrize("shape", [(3, 2), (2, 5)])  # (cols, rows) in pooled cells: non-square too
def test_embeddings_match_get_image_features(tower, shape):
    hf, m, _ = tower
    k = m.vision.hparams.pool
    cols, rows = shape[0] * k, shape[1] * k
    pix, pos = _grid(k, cols, rows, seed=cols * rows)
    want = _hf_features(hf, pix, pos)
    got = m.vision.encode(pix, cols, rows)
    assert got.shape == want.shape == (shape[0] * shape[1], m.hparams.n_embd)
    assert np.abs(got - want).max() < 1e-4


def test_switches_matter(tower):
    """The clamps and the standardize buffers change the result (so the test above checks them)."""
    hf, m, name = tower
    k = m.vision.hparams.pool
    pix, pos = _grid(k, 3 * k, 2 * k)
    base = _hf_features(hf, pix, pos)
    vt = hf.model.encoder.vision_tower
    saved = {n: b.clone() for n, b in vt.named_buffers()}
    try:
        with torch.no_grad():
            for n, b in vt.named_buffers():
                if n.endswith(("_min", "_max")):
                    b.fill_(float("inf") if n.endswith("_max") else -float("inf"))
                elif n.endswith("std_bias"):
                    b.zero_()
        changed = np.abs(_hf_features(hf, pix, pos) - base).max()
    finally:
        with torch.no_grad():
            for n, b in vt.named_buffers():
                b.copy_(saved[n])
    assert m.vision.hparams.clipped == ("clip" in name)
    assert m.vision.hparams.standardize == ("std" in name)
    if "clip" in name or "std" in name:
        assert changed > 1e-2


def test_image_embeddings_from_a_picture(tower):
    """The whole path: a PIL image preprocessed by us and by the HF processor (patch 4, this tower's pooling)."""
    hf, m, _ = tower
    k = m.vision.hparams.pool
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    proc = Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=k, max_soft_tokens=70)
    batch = proc(images=[img], return_tensors="np")
    n = int((batch["image_position_ids"][0][:, 0] >= 0).sum())
    want = _hf_features(hf, batch["pixel_values"][0][:n], batch["image_position_ids"][0][:n])
    got = m.image_embeddings(img, image_budget=70)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


def test_mmproj_layout_and_info(tower, tmp_path):
    _, m, name = tower
    gf = gguf_file.read(m.vision.path)
    md = gf.metadata
    assert md["general.architecture"] == "clip" and md["clip.vision.projector_type"] == "gemma4v"
    assert md["clip.vision.projection_dim"] == m.hparams.n_embd and md["clip.use_gelu"] is True
    hp = m.vision.hparams
    assert gf.tensors["v.patch_embd.weight"].shape == (4, 4, 3, 32)
    assert gf.tensors["v.position_embd.weight"].shape == (32, 32, 2)
    assert ("v.blk.1.ffn_down.output_max" in gf.tensors) == hp.clipped
    info = mmproj.describe(gf, hp)
    assert info["layers"] == 2 and info["text_width"] == m.hparams.n_embd


def test_mmproj_f16_close(tower, tmp_path):
    hf, m, _ = tower
    path = vision_convert.convert(hf.hf_dir, tmp_path / "mm-f16.gguf", outtype="f16")
    gf = gguf_file.read(path)
    assert gf.tensors["v.blk.0.attn_q.weight"].type_name == "f16"
    assert gf.tensors["v.position_embd.weight"].type_name == "f32"  # as llama.cpp's converter stores it
    with dg.load(m.path, mmproj=path) as m16:
        k = m16.vision.hparams.pool
        pix, pos = _grid(k, 2 * k, 2 * k)
        err = np.abs(m16.vision.encode(pix, 2 * k, 2 * k) - _hf_features(hf, pix, pos)).max()
    assert err < 0.05


# ---- preprocessing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(224, 224), (640, 480), (1920, 1080)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_preprocess_matches_hf_processor(size, mode):
    w, h = size
    arr = np.random.default_rng(w).integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    img = Image.fromarray(arr, mode)
    for budget in (70, 280) if w < 1000 else (280,):
        hf = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images=[img], return_tensors="np")
        ours = images.preprocess(img, budget)
        n = ours.rows * ours.cols
        assert ours.n_tokens == hf["num_soft_tokens_per_image"][0] if "num_soft_tokens_per_image" in hf else True
        assert ours.n_tokens == int((hf["image_position_ids"][0][:, 0] >= 0).sum()) // 9
        assert np.array_equal(hf["pixel_values"][0][:n], ours.pixels)
        pos = hf["image_position_ids"][0][:n]
        assert np.array_equal(pos[:, 0], np.tile(np.arange(ours.cols), ours.rows))
        assert np.array_equal(pos[:, 1], np.repeat(np.arange(ours.rows), ours.cols))
    want = {(224, 224): 256, (640, 480): 266, (1920, 1080): 264}[size]  # the spec's table at 280
    assert images.preprocess(img).n_tokens == want


def test_image_inputs_and_bad_images(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    ref_px = images.preprocess(Image.fromarray(arr), 70).pixels
    for src in (arr, buf.getvalue(), tmp_path / "a.png", str(tmp_path / "a.png")):
        assert np.array_equal(images.preprocess(src, 70).pixels, ref_px)
    bad = [b"not an image at all", buf.getvalue()[:40], np.zeros((0, 5, 3), np.uint8),
           np.zeros((4, 4, 3), np.float32), tmp_path / "missing.png", 3.5]
    for src in bad:
        with pytest.raises(dg.Error):
            images.preprocess(src)
    with pytest.raises(dg.Error, match="image_budget"):
        images.preprocess(arr, 300)


# ---- mmproj validation ---------------------------------------------------------------------------------

def _hp(**kw):
    base = dict(n_embd=32, n_ff=64, n_layer=2, n_head=2, head_dim=16, n_proj=64, patch_size=4, n_pos=32, pool=2,
                clipped=True, standardize=True)
    return mmproj.VisionHParams(**{**base, **kw})


def _weights(hp, seed=0):
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(tuple(reversed(s.shape))).astype(np.float32) for s in mmproj.tensor_specs(hp)}


def test_bad_mmproj_files(tmp_path, tiny_f32):
    hp = _hp()
    good = mmproj.write(tmp_path / "good.gguf", hp, _weights(hp))
    # a tower for another text width
    with pytest.raises(dg.GGUFError, match="projects to width 48"):
        dg.load(tiny_f32, mmproj=mmproj.write(tmp_path / "w.gguf", _hp(n_proj=48), _weights(_hp(n_proj=48))))
    # a text model given as mmproj, a truncated file, a missing and a mis-shaped tensor (all problems listed)
    with pytest.raises(dg.GGUFError, match="not an mmproj"):
        dg.load(tiny_f32, mmproj=tiny_f32)
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(dg.GGUFError):
        dg.load(tiny_f32, mmproj=tmp_path / "cut.gguf")
    w = gguf_file.Writer(tmp_path / "broken.gguf")
    w.set_all(mmproj.metadata(hp))
    specs = [s for s in mmproj.tensor_specs(hp) if s.name != "v.blk.1.ln2.weight"]
    for s in specs:
        shape = (16,) if s.name == "v.blk.0.ln1.weight" else s.shape
        w.add_tensor(s.name, shape, 0)
    w.write(lambda n: np.zeros(16 if n == "v.blk.0.ln1.weight" else int(np.prod(
        next(s.shape for s in specs if s.name == n))), np.float32))
    with pytest.raises(dg.GGUFError) as e:
        mmproj.validate(gguf_file.read(tmp_path / "broken.gguf"))
    assert "missing tensor v.blk.1.ln2.weight" in str(e.value) and "v.blk.0.ln1.weight: shape [16]" in str(e.value)
    with dg.load(tiny_f32) as m:
        with pytest.raises(dg.Error, match="without a vision tower"):
            m.image_embeddings(np.zeros((48, 48, 3), np.uint8))


def test_a_file_with_only_llama_cpp_keys_loads(tower, tmp_path):
    """llama.cpp's converter writes none of our keys (pooling, head_dim, token ids, use_gelu, the image block
    flag): the tower is inferred from the tensors and the defaults. tools/check_llama_cpp_mmproj.py runs the
    real converter; here its key set is rebuilt from one of our files, tensors byte for byte."""
    hf, m, name = tower
    src = gguf_file.read(m.vision.path)
    theirs = {k: v for k, v in src.metadata.items()
              if not k.startswith("diffgemma.") and k not in ("clip.use_gelu", mmproj.KEY_POOL)}
    theirs["general.size_label"] = "0.1M"
    w = gguf_file.Writer(tmp_path / "lc-style.gguf")
    w.set_all(theirs)
    raw = m.vision.path.read_bytes()
    for t in src.tensors.values():
        w.add_tensor(t.name, t.shape, t.type)
    w.write(lambda n: np.frombuffer(raw, np.uint8, src.tensors[n].nbytes, src.tensors[n].offset))
    with dg.load(m.path, mmproj=tmp_path / "lc-style.gguf") as lc:
        hp = lc.vision.hparams
        # without the key the pooling is llama.cpp's fixed 3x3, so only 3x3 towers are llama.cpp's to write
        assert (hp.pool, hp.head_dim, hp.image_id, hp.bidirectional) == (3, m.vision.hparams.head_dim, None, True)
        if m.vision.hparams.pool == 3:
            pix, pos = _grid(3, 6, 3)
            assert np.abs(lc.vision.encode(pix, 6, 3) - _hf_features(hf, pix, pos)).max() < 1e-4
