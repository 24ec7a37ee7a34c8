"""Load the embedded tiny model, tokenize a prompt and run one denoising forward pass."""

import numpy as np

import diffgemma as dg

m = dg.load("tiny")
print(m)
prompt = m.tokenize("The quick brown fox")
canvas = np.random.default_rng(0).integers(0, m.hparams.n_vocab, m.hparams.canvas_length)
logits = m.logits(prompt, canvas)
print(f"prompt {len(prompt)} tokens -> logits {logits.shape}, argmax canvas: {m.detokenize(logits.argmax(1))!r}")
