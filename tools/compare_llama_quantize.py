"""Our dry-run choices against a built llama-quantize's --dry-run, for every file type on four layouts.

    bash tools/build_llama_quantize.sh SDIST/vendor/llama.cpp /tmp/lq
    PYTHONPATH=python python tools/compare_llama_quantize.py /tmp/lq/llama-quantize [--workdir /tmp/dg-cmp]

llama-quantize refuses `diffusion-gemma`; it runs on a metadata-only copy renamed to `gemma4` (see
tests/llama_reference.py). Each file type runs without and with an imatrix file (one entry), and a few flag
combinations run on the mid and 26B-A4B layouts; prints the disagreements and a count.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import llama_reference as ref  # noqa: E402
import test_ftypes  # noqa: E402  (the four layouts)

from diffgemma import (  # noqa: E402
    ftypes,  # noqa: E402
    layout,
    testing,
)
from diffgemma import imatrix_file as imx  # noqa: E402
from diffgemma import quantizer as qz  # noqa: E402

_LINE = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =[^\n]*?(?:\((\w+)\))?\n")
FLAGS = [  # (llama-quantize flags, file type, dg.quantize keywords); IMATRIX is the layout's imatrix file
    (["--tensor-type", "ATTN_K=q8_0", "--tensor-type", "exps=iq4_nl"], "Q4_K_M",
     dict(overrides=[("attn_k", "q8_0"), ("exps", "iq4_nl")])),
    (["--token-embedding-type", "q4_0", "--output-tensor-type", "q8_0"], "Q3_K_M",
     dict(token_embedding_type="q4_0", output_tensor_type="q8_0")),
    (["--output-tensor-type", "q5_K"], "Q3_K_M", dict(output_tensor_type="q5_K")),
    (["--pure", "--tensor-type", "attn_k=q8_0"], "Q3_K_L", dict(pure=True, overrides=[("attn_k", "q8_0")])),
    (["--prune-layers", "1,3"], "Q4_K_M", dict(prune_layers=[1, 3])),
    (["--leave-output-tensor"], "Q4_K_M", dict(leave_output_tensor=True)),
    (["--imatrix", "IMATRIX", "--exclude-weights", "attn_q"], "Q4_0",
     dict(imatrix="IMATRIX", exclude_weights=["attn_q"])),
    (["--imatrix", "IMATRIX", "--include-weights", "attn_q"], "Q4_0",
     dict(imatrix="IMATRIX", include_weights=["attn_q"])),
]


def _theirs(binary: str, args: list[str]) -> dict[str, str]:
    res = subprocess.run([binary, "--dry-run", *args], capture_output=True, text=True)
    return {m.group(1): m.group(3) or m.group(2) for m in _LINE.finditer(res.stdout + res.stderr)}


def _ours(path: pathlib.Path, recipe: str, **kw) -> dict[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = qz.quantize(path, path.with_name("never.gguf"), recipe=recipe, dry_run=True, **kw)
    return {n: t for n, _, _, t in r.tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("binary")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="dg-cmp-"))
    work.mkdir(parents=True, exist_ok=True)
    layouts = dict(test_ftypes.LAYOUTS, **{"26b": layout.full_26b_a4b()})  # with the real vocabulary
    n = bad = 0
    for k, hp in layouts.items():
        src = testing.write_model(work / f"{k}.gguf", hp, wtype="f16", sparse=True)
        g4 = ref.gemma4_copy(src, work / f"{k}-gemma4.gguf")
        imf = str(imx.save(work / f"{k}.imatrix.gguf", {"blk.0.attn_q.weight": (np.ones((1, hp.n_embd)), np.ones(1))},
                           datasets=["one-entry"], chunk_count=1, chunk_size=512))
        runs = [([*(["--imatrix", imf] if im else []), str(g4), ft.name], ft.name, dict(imatrix=imf if im else None))
                for ft in ftypes.FILE_TYPES.values() for im in (False, True)]
        if k in ("mid", "26b"):
            runs += [([f.replace("IMATRIX", imf) for f in flags] + [str(g4), ft],
                      ft, {x: (imf if v == "IMATRIX" else v) for x, v in kw.items()}) for flags, ft, kw in FLAGS]
        for args, recipe, kw in runs:
            theirs, ours = _theirs(a.binary, args), _ours(src, recipe, **kw)
            n += 1
            if ours != theirs:
                bad += 1
                print(k, " ".join(args[:-2]), recipe, [(t, ours[t], theirs.get(t)) for t in ours
                                                          if ours[t] != theirs.get(t)][:4])
    print(f"{n - bad} of {n} dry runs agree tensor for tensor")


if __name__ == "__main__":
    main()
