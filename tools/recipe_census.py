"""Census and size of every named quantize recipe on the released 26B-A4B layout (dry runs, no data written).

    PYTHONPATH=python python tools/recipe_census.py [--workdir /tmp/dg-census]

Writes a sparse BF16 file with the released model's tensors (the 262144-token vocabulary included, so sizes
are the real files' to the byte) and prints a markdown table of each recipe's per-type census and file size,
with an imatrix given (one entry is enough for llama.cpp's "has an imatrix" rules) and, for the file types
whose choices depend on it, without.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import warnings

import numpy as np

from diffgemma import imatrix_file as imx
from diffgemma import layout, testing
from diffgemma import quantizer as qz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where the sparse source goes (default: a temporary dir)")
    a = ap.parse_args()
    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="dg-census-"))
    work.mkdir(parents=True, exist_ok=True)
    hp = layout.full_26b_a4b()
    src = testing.write_model(work / "full-bf16.gguf", hp, wtype="bf16", sparse=True)
    imat = imx.ImatrixData({"blk.0.attn_q.weight": imx.Entry(np.ones((1, hp.n_embd)), np.ones(1, np.int64))})
    print("| recipe | census (tensors per type) | size | bits/weight |")
    print("|---|---|---:|---:|")
    later = []
    try:
        for name in qz.RECIPES:
            for with_imatrix in (True, False):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = qz.quantize(src, work / "never.gguf", recipe=name, dry_run=True,
                                    imatrix=imat if with_imatrix else None)
                row = f"| {name}{'' if with_imatrix else ' (no imatrix)'} | {r.census_str} | " \
                      f"{r.size_bytes:,} B ({r.size_bytes / 1e9:.2f} GB) | {r.bits_per_weight:.2f} |"
                if with_imatrix:
                    print(row)
                    first = r.census
                elif r.census != first:
                    later.append(row)
        print()
        print("Without an imatrix (only where llama.cpp's rules then choose differently):")
        print()
        print("| recipe | census | size | bits/weight |")
        print("|---|---|---:|---:|")
        print("\n".join(later))
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
