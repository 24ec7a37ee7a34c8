"""Check that an mmproj written by llama.cpp's own converter (convert_hf_to_gguf.py --mmproj) for a Gemma-4
vision tower loads in diffgemma and gives transformers' embeddings, and that ours holds the same tensors.

Builds a tiny DiffusionGemma with a vision tower (tests/hf_reference.py), copies its tower into a tiny
Gemma4ForConditionalGeneration (the architecture llama.cpp's converter knows), runs that converter from a
llama.cpp checkout, and compares:

    PYTHONPATH=python:tests python tools/check_llama_cpp_mmproj.py /path/to/llama.cpp [workdir]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import hf_reference as ref
import numpy as np
import torch
from transformers import Gemma4Config, Gemma4ForConditionalGeneration

import diffgemma as dg
from diffgemma import gguf_file

VISION = {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "patch_size": 16,
          "position_embedding_size": 64, "pooling_kernel_size": 3, "use_clipped_linears": True, "standardize": True}
TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512, "intermediate_size": 96,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
        "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 512}


def main() -> int:
    llama_cpp = Path(sys.argv[1])
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp())
    dgm = ref.make_hf_model(work / "dg", seed=3, vision=VISION)
    g4 = Gemma4ForConditionalGeneration(Gemma4Config(text_config=TEXT, vision_config=VISION, audio_config=None))
    tower = {k.replace("model.encoder.", "model."): v for k, v in dgm.state_dict().items()
             if k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))}
    res = g4.load_state_dict(tower, strict=False)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "vision" in k]
    g4.save_pretrained(work / "g4")
    (work / "g4" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma4ImageProcessor", "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}))
    ref.write_tokenizer_files(work / "g4", 512)
    lc_file = work / "lc-mmproj-f32.gguf"
    subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(work / "g4"), "--mmproj",
                    "--outtype", "f32", "--outfile", str(lc_file)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    text = dg.convert(work / "dg", work / "text.gguf", outtype="f32", progress=False, mmproj=work / "ours.gguf")
    a, b = gguf_file.read(lc_file), gguf_file.read(work / "ours.gguf")
    ra, rb = lc_file.read_bytes(), (work / "ours.gguf").read_bytes()
    same = set(a.tensors) == set(b.tensors) and all(
        a.tensors[n].shape == b.tensors[n].shape
        and ra[a.tensors[n].offset:a.tensors[n].offset + a.tensors[n].nbytes]
        == rb[b.tensors[n].offset:b.tensors[n].offset + b.tensors[n].nbytes] for n in a.tensors)
    print(f"same tensor names, shapes and bytes as llama.cpp's converter: {same}")
    print(f"keys only ours: {sorted(set(b.metadata) - set(a.metadata))}")
    cols, rows = 9, 6
    pix = np.random.default_rng(0).random((cols * rows, 768), dtype=np.float32)
    pos = np.stack(np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        want = dgm.model.encoder.get_image_features(torch.from_numpy(pix)[None],
                                                    torch.from_numpy(pos)[None]).pooler_output.numpy()
    with dg.load(text, mmproj=lc_file) as m:
        err = np.abs(m.vision.encode(pix, cols, rows) - want).max()
    print(f"llama.cpp-written mmproj in diffgemma vs transformers' get_image_features: max |diff| {err:.2e}")
    return 0 if same and err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
