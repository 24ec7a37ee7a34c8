"""Reference helpers for golden tests (no tests in this module).

* `make_hf_model` builds a tiny random transformers `DiffusionGemmaForBlockDiffusion` (see
  shared/spec/tiny-reference.md), gives every norm weight, router scale and both per-layer scalars
  non-trivial values, and saves it as a complete Hugging Face checkpoint directory: weights, config,
  generation_config.json, a gemma-style byte-fallback BPE tokenizer.json, tokenizer_config.json and a chat
  template.
* `hf_logits` computes the reference denoiser logits of one canvas after a committed prefix (a prompt plus
  any finished canvases), calling the model's encoder and decoder the way `generate` does.
* `hf_generate` runs transformers' block-diffusion `generate` under a fixed torch seed.

Everything runs on CPU in a fraction of a second for the default sizes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers as bpe_trainers
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaTextConfig,
    DynamicCache,
)
from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

# ---- tokenizer ------------------------------------------------------------------------------------

# id: token. Special (control) tokens first, as in Gemma; then one non-special added token, then the 256
# byte-fallback tokens, then the learned BPE vocabulary.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID, TURN_OPEN_ID, TURN_CLOSE_ID = range(len(SPECIAL_TOKENS))
USER_TOKEN = "<unused0>"  # an added, non-special ("user-defined") token
USER_TOKEN_ID = len(SPECIAL_TOKENS)
BYTE_TOKEN_BASE = USER_TOKEN_ID + 1  # <0x00> .. <0xFF> follow
EOS_IDS = [EOS_ID, TURN_CLOSE_ID]  # generation_config eos_token_id (Gemma 4 stops on <eos> and <turn|>)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

# Sampler settings written to generation_config.json: all different from the library defaults so that a
# converter that ignores the file is caught.
GENERATION_SETTINGS: dict[str, Any] = {
    "max_denoising_steps": 12,
    "t_min": 0.3,
    "t_max": 0.9,
    "entropy_bound": 0.2,
    "stability_threshold": 2,
    "confidence_threshold": 0.01,
}

# A few KB of plain English (written for these tests) to learn the BPE merges from.
CORPUS = """\
The morning was cold and bright, and the river ran fast under the old stone bridge. A baker on the corner
opened his shop before the sun was up, and the smell of fresh bread drifted along the narrow street. Children
walked to school in small groups, talking about the game they had played the evening before, while their
parents hurried toward the station to catch the early train into the city.
In the middle of the town there is a garden with tall trees, a pond, and a bench where an old man sits every
day to feed the birds. He says that the birds know him, and that they wait for him when the weather is bad.
Nobody can tell whether this is true, but the birds do seem to gather near the bench a little before noon.
A model that writes text does not think the way a person does. It reads a prompt, turns each piece of the
text into a number, and then predicts which numbers should come next. A diffusion model starts from noise
and refines a whole block of text at once, step by step, until the block is clear enough to keep. Then it
moves on to the next block, using everything it has written so far as the context for what comes after.
Good software is tested often. Each function should do one thing, and do it well; each error should say
what went wrong and how to fix it. When a test fails, read the message first, then the code, and only then
change something. Small changes are easier to check than large ones, and a clear name is worth more than a
clever trick. Write the test before the fix, so that the same bug cannot come back without anyone noticing.
The library has many shelves of books about history, science, music and art. Some of the books are very
old, with thin pages and faded covers, and some were printed only last year. Students come in the afternoon
to read and to write their reports, and the room is quiet except for the sound of turning pages and the
soft hum of the lights above the long wooden tables.
Numbers such as 1, 2, 3, 10, 42 and 2024 appear in text all the time, and so do symbols like +, -, = and %.
Questions end with a question mark? Lists may use commas, semicolons; and colons: all of them matter.
When the rain stopped, the streets were shining and the air smelled of wet leaves. People opened their
windows and came out to walk along the river again, and the baker sold the last of his bread before dark.
"""


def make_tokenizer(vocab: int = 512) -> Tokenizer:
    """A gemma-style BPE of exactly `vocab` entries: spaces become "▁", no word splitting, byte fallback,
    `<bos>` prepended by the post-processor."""
    n_fixed = BYTE_TOKEN_BASE + 256
    if vocab <= n_fixed + 64:
        raise ValueError(f"vocab must exceed {n_fixed + 64} (special + byte tokens + an alphabet)")
    # Learn merges on whole words (Metaspace split); the final tokenizer applies them without splitting.
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = bpe_trainers.BpeTrainer(vocab_size=vocab - n_fixed, show_progress=False, special_tokens=[])
    learner.train_from_iterator(CORPUS.splitlines(), trainer)
    learned = json.loads(learner.to_str())["model"]
    table: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    table[USER_TOKEN] = USER_TOKEN_ID
    for b in range(256):
        table[f"<0x{b:02X}>"] = BYTE_TOKEN_BASE + b
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if tok in table:
            raise ValueError(f"learned token {tok!r} collides with a fixed token")
        table[tok] = len(table)
    filler = 1
    while len(table) < vocab:  # a corpus too small for the requested size: pad with unused slots
        table.setdefault(f"<unused{filler}>", len(table))
        filler += 1
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in learned["merges"]]
    bpe = models.BPE(vocab=table, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(USER_TOKEN, special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == vocab, tok.get_vocab_size(with_added_tokens=True)
    return tok


def write_tokenizer_files(dirpath: str | os.PathLike[str], vocab: int) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja for `make_tokenizer(vocab)`."""
    d = Path(dirpath)
    make_tokenizer(vocab).save(str(d / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,  # also in chat_template.jinja (the transformers 5 place); same text
    }
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


# ---- model ----------------------------------------------------------------------------------------

DEFAULT_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")


# (boi, image placeholder, eoi) ids of the tiny models: inside the tiny vocabulary
IMAGE_TOKEN_IDS = (61, 60, 62)


def tiny_config(
    *,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    global_kv_heads: int = 1,
    head_dim: int = 16,
    global_head_dim: int = 32,
    n_experts: int = 4,
    top_k: int = 2,
    window: int = 8,
    canvas: int = 16,
    vocab: int = 512,
    layer_types: Sequence[str] = DEFAULT_LAYER_TYPES,
    intermediate: int = 96,
    moe_intermediate: int = 32,
    vision: dict[str, Any] | None = None,
    image_token_ids: tuple[int, int, int] = IMAGE_TOKEN_IDS,
) -> DiffusionGemmaConfig:
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        moe_intermediate_size=moe_intermediate,
        num_experts=n_experts,
        top_k_experts=top_k,
        num_hidden_layers=len(layer_types),
        layer_types=list(layer_types),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=global_kv_heads,
        sliding_window=window,
        max_position_embeddings=1024,
        use_bidirectional_attention="vision",
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        },
    )
    # A vision tower is always built; keep it tiny (text-only tests never run it).
    vision = {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
              **(vision or {})}
    boi, image, eoi = image_token_ids
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas, boi_token_id=boi,
                                image_token_id=image, eoi_token_id=eoi)


def randomize_vision(model: DiffusionGemmaForBlockDiffusion, gen: torch.Generator) -> None:
    """Vision norms, position tables, standardize buffers, projections and ClippableLinear bounds <- values
    that make each of them matter (the library init leaves norms at 1, tables at 1 and bounds infinite)."""
    enc = model.model.encoder
    with torch.no_grad():
        for name, t in [*enc.vision_tower.named_parameters(), *enc.vision_tower.named_buffers(),
                        *enc.embed_vision.named_parameters()]:
            if "rotary_emb" in name:
                continue
            if name.endswith(("input_min", "output_min")):
                t.fill_(-2.0 if "input" in name else -2.5)
            elif name.endswith(("input_max", "output_max")):
                t.fill_(2.0 if "input" in name else 2.5)
            elif name.endswith("std_bias"):
                t.copy_(torch.randn(t.shape, generator=gen))
            elif t.ndim == 1:  # norm weights, std_scale
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("position_embedding_table"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            else:  # projections: unit-ish outputs, so that the bounds clamp some values
                t.copy_(torch.randn(t.shape, generator=gen) * 1.5 / t.shape[-1] ** 0.5)


def _randomize_scales(model: DiffusionGemmaForBlockDiffusion, gen: torch.Generator) -> None:
    """Norm weights, router scales and both sets of per-layer scalars ← uniform(0.5, 1.5)."""
    dec = model.model.decoder
    enc = model.model.encoder.language_model

    def fill(t: torch.Tensor) -> None:
        t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float32) + 0.5)

    with torch.no_grad():
        for name, p in dec.named_parameters():
            # every 1-D decoder parameter is a norm weight, router.scale or router.per_expert_scale
            if p.ndim == 1:
                fill(p)
            elif name.endswith("norm.weight"):
                raise AssertionError(f"unexpected norm weight shape {name} {tuple(p.shape)}")
        for layers in (dec.layers, enc.layers):
            for layer in layers:
                fill(layer.layer_scalar)
    # The encoder shares every weight with the decoder; only the layer_scalar buffers are its own.
    for de, en in zip(dec.layers, enc.layers, strict=True):
        assert en.input_layernorm.weight is de.input_layernorm.weight, "encoder/decoder weights are not tied"
        assert en.router.per_expert_scale is de.router.per_expert_scale
        assert not torch.equal(en.layer_scalar, de.layer_scalar)
    assert enc.norm.weight is dec.norm.weight and enc.embed_tokens.weight is dec.embed_tokens.weight


def make_hf_model(
    dirpath: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    generation: dict[str, Any] | None = None,
    **config_kw: Any,
) -> DiffusionGemmaForBlockDiffusion:
    """Build, randomise and save a tiny DiffusionGemma checkpoint in `dirpath`; return the model (eval mode,
    in `dtype`). `config_kw` are tiny_config's keywords (hidden, heads, ..., vocab); `max_shard_size` (e.g.
    "200KB") saves sharded weights; `generation` overrides GENERATION_SETTINGS."""
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**config_kw)
    vocab = config.text_config.vocab_size
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    _randomize_scales(model, torch.Generator().manual_seed(seed + 1))
    if config_kw.get("vision") is not None:
        randomize_vision(model, torch.Generator().manual_seed(seed + 2))
    model.to(getattr(torch, dtype))

    settings = {**GENERATION_SETTINGS, **(generation or {})}
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_denoising_steps=settings["max_denoising_steps"],
        sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": settings["entropy_bound"]},
        t_min=settings["t_min"],
        t_max=settings["t_max"],
        stability_threshold=settings["stability_threshold"],
        confidence_threshold=settings["confidence_threshold"],
        bos_token_id=BOS_ID,
        eos_token_id=list(EOS_IDS),
        pad_token_id=PAD_ID,
    )
    kw: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(d, **kw)
    write_tokenizer_files(d, vocab)
    return model


def hf_state(model: DiffusionGemmaForBlockDiffusion) -> dict[str, np.ndarray]:
    """The saved tensors of `model` (parameters and persistent buffers) as float32 numpy arrays."""
    return {k: v.detach().to(torch.float32).numpy().copy() for k, v in model.state_dict().items()}


# ---- reference forward passes ------------------------------------------------------------------------


def _ids(x: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.int64)).reshape(1, -1)


def hf_encode(
    model: DiffusionGemmaForBlockDiffusion, chunks: Sequence[Sequence[int]]
) -> tuple[DynamicCache, int]:
    """Run the encoder over consecutive chunks (the prompt, then each finished canvas) at their absolute
    positions, as `generate` does; return (the filled cache, the committed length)."""
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    pos = 0
    with torch.no_grad():
        for chunk in chunks:
            ids = _ids(chunk)
            n = ids.shape[1]
            if n == 0:
                continue
            positions = torch.arange(pos, pos + n, dtype=torch.long).unsqueeze(0)
            out = model.model.encoder(input_ids=ids, cache=cache, position_ids=positions)
            cache = out.cache
            pos += n
    return cache, pos


def hf_logits(
    model: DiffusionGemmaForBlockDiffusion,
    prompt_ids: Sequence[int] | np.ndarray,
    canvas_ids: Sequence[int] | np.ndarray,
    self_cond: np.ndarray | None = None,
    *,
    finished: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """Reference denoiser logits, float32 [len(canvas_ids), vocab] (soft-capped, no temperature).

    The committed prefix is `prompt_ids` followed by the `finished` canvases. Like `generate`, the prompt is
    encoded in one causal encoder call and each finished canvas in its own call at the positions it had
    while it was denoised; the canvas then sits at the positions right after the prefix. `self_cond` is the
    previous step's temperature-scaled logits (same shape as the result) or None for a first step.
    """
    cache, pos = hf_encode(model, [list(map(int, prompt_ids)), *[list(map(int, c)) for c in finished]])
    canvas = _ids(canvas_ids)
    positions = torch.arange(pos, pos + canvas.shape[1], dtype=torch.long).unsqueeze(0)
    sc = None
    if self_cond is not None:
        sc = torch.from_numpy(np.asarray(self_cond, dtype=np.float32)).unsqueeze(0).to(model.dtype)
    with torch.no_grad():
        out = model(cache=cache, decoder_input_ids=canvas, decoder_position_ids=positions,
                    self_conditioning_logits=sc)
    return out.logits[0].to(torch.float32).numpy()


def hf_generate(
    model: DiffusionGemmaForBlockDiffusion,
    prompt_ids: Sequence[int] | np.ndarray,
    *,
    seed: int,
    max_new_tokens: int,
    steps: int,
    eos: int | Sequence[int] | None,
    pad: int | None,
    **kw: Any,
) -> list[int]:
    """Tokens generated by transformers' block-diffusion `generate` after `prompt_ids` (whole canvases, pads
    after the first EOS included), with torch's global RNG seeded by `seed`. `kw` are further generation
    settings (t_min, t_max, stability_threshold, confidence_threshold, sampler_config, ...)."""
    prompt = _ids(prompt_ids)
    eos_arg = list(eos) if isinstance(eos, Sequence) else eos
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=max_new_tokens, max_denoising_steps=steps,
                             eos_token_id=eos_arg, pad_token_id=pad, **kw)
    return [int(t) for t in out.sequences[0, prompt.shape[1]:]]
