"""Block-diffusion generation: canvases denoised by the entropy-bound sampler, then committed (spec §7)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
import weakref
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from . import sampler, structured
from .batching import Batch, Denoise, Done, Prefill, Request, solo
from .chat import build_prompt
from .errors import Error
from .sampler import FROM_FILE, GREEDY_SEED, SamplerSettings, is_greedy, scaled
from .template import Hole, lay_out

if TYPE_CHECKING:
    from .engine import Engine


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """What a stream yields (and `on_step` receives) after every denoising step."""

    canvas_index: int
    step: int  # 1-based step within this canvas
    steps: int  # the step budget N
    temperature: float
    accepted: int  # positions that kept their sampled token
    mean_entropy: float
    argmax: np.ndarray  # the current argmax canvas (token ids)
    fixed: np.ndarray | None = None  # with a template: which positions hold its fixed tokens
    detokenize: Callable[[np.ndarray], str] | None = dataclasses.field(default=None, repr=False, compare=False)

    @functools.cached_property
    def text(self) -> str:
        """The argmax canvas as text (control tokens dropped); detokenized only when read, off the step loop."""
        return self.detokenize(self.argmax) if self.detokenize is not None else ""


@dataclasses.dataclass(frozen=True)
class CanvasInfo:
    steps: int  # denoising steps used
    stopped_early: bool  # stable and confident before the step budget ran out
    eos: bool  # an end-of-sequence token ended generation in this canvas


@dataclasses.dataclass(frozen=True)
class Timings:
    prefill_ms: float  # encoding the prompt and the committed canvases
    step_ms: float  # mean wall time of one denoising step (forward + sampling + host rules)
    tokens_per_s: float  # new tokens / total generation time
    forward_ms: float  # mean device time of one step (forward pass and on-device sampling statistics)
    host_ms: float  # mean host time per step (acceptance, re-noising, stopping, callbacks)
    renoised: int = 0  # json_schema: hole positions re-noised because a value broke its rule at commit
    repaired: int = 0  # json_schema: values replaced by their nearest valid one when the steps ran out


UNLIMITED = -1  # max_new_tokens=-1 (llama.cpp's -n -1): until EOS or a full context
MAX_TOP_LOGPROBS = 20  # most alternatives per token logprobs= may ask for (OpenAI's top_logprobs limit)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A committed token's log-probability at the step that committed it: the last denoising step of its canvas,
    whose argmax it is, under that step's softmax(logits / T)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, log p) of the most likely tokens there, most likely first (logprobs=k)


# Why a generation ended (Generation.finish_reason): an EOS token, max_new_tokens reached, the context (n_ctx)
# full before that, or a template filled (the template decides where the text ends).
FINISH_REASONS = ("eos", "length", "context", "stop")


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]  # new tokens: at most max_new_tokens, cut after the first EOS (which is kept)
    canvases: list[CanvasInfo]
    timings: Timings
    seed: int
    prompt_tokens: int
    holes: list[str] = dataclasses.field(default_factory=list)  # with a template: each hole's text
    finish_reason: str = "length"  # one of FINISH_REASONS
    logprobs: list[TokenLogprob] | None = None  # one per token of .tokens when asked for (logprobs=)
    json: Any = None  # with json_schema: the parsed value of .text (it validates against the schema)

    @property
    def steps(self) -> int:
        return sum(c.steps for c in self.canvases)


@dataclasses.dataclass(frozen=True)
class CanvasEvent:
    """What a stream yields when a canvas commits, after that canvas's StepEvents."""

    canvas_index: int
    tokens: np.ndarray  # the canvas's new tokens (cut after an EOS, which is kept; a template's fixed ones too)
    text_delta: str  # the text this canvas adds: the deltas concatenate to Generation.text
    steps: int  # denoising steps used
    stopped_early: bool  # stable and confident before the step budget ran out
    eos: bool  # an end-of-sequence token ended generation in this canvas
    timings: Timings  # of the generation so far
    finish_reason: str | None = None  # on the generation's last canvas: why it ended (FINISH_REASONS)
    logprobs: list[TokenLogprob] | None = None  # one per token of .tokens when asked for (logprobs=)


def eos_ids(model: Engine) -> frozenset[int]:
    """End-of-sequence ids: the file's generation-config list if stored, else every end-of-generation token
    libllama knows for the vocabulary."""
    stored = model.metadata.get("diffusion.eos_token_ids")
    if isinstance(stored, list) and stored:
        return frozenset(int(t) for t in stored)
    tok = model.tokenizer
    return frozenset(t for t in range(tok.n_vocab) if tok.is_eog(t))


RANDOM_SEED = -1  # llama.cpp's convention, also accepted on the command line and by the server


def resolve_seed(seed: Any, greedy: bool = False) -> int:
    """The seed to use: `seed` itself (an int >= 0), or a fresh random one for None or -1; a greedy generation
    (temperature 0) given None takes GREEDY_SEED, so that its text is the same every run."""
    if isinstance(seed, bool) or not (seed is None or isinstance(seed, int | np.integer)):
        raise Error(f"seed must be an int >= 0, or None/-1 for a random one; got {seed!r}")
    if seed is None and greedy:
        return GREEDY_SEED
    if seed is None or seed == RANDOM_SEED:  # a 32-bit seed, as llama.cpp draws: exact in any JSON client too
        return int(np.random.SeedSequence().entropy % (2**32))
    if not 0 <= seed < 2**64:
        raise Error(f"seed must be an int in 0..2**64-1, or None/-1 for a random one; got {seed}")
    return int(seed)


class _Closes:
    """`with` closes it: a stream used as a context manager ends its generation however the block is left."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Stream(_Closes):
    """The events of one generation (StepEvent after every denoising step, CanvasEvent when a canvas commits);
    `.generation` holds the final Generation once the iteration has ended. Breaking out of the loop (or
    close()) ends the generation between steps: nothing is left half-encoded and the model is free again."""

    def __init__(self, events: Generator[StepEvent | CanvasEvent, None, Generation], seed: int) -> None:
        self._events = events
        self.seed = seed  # the seed in use (a fresh one when None or -1 was asked for)
        self.generation: Generation | None = None  # set when the iteration ends

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StepEvent | CanvasEvent:
        try:
            return next(self._events)
        except StopIteration as done:
            self.generation = done.value
            raise

    def close(self) -> None:
        """Stop generating now (also what leaving a for loop early does, when the stream is dropped)."""
        self._events.close()


# The paused stream holding each model: a new generation on the model ends it first (its state would be stale).
_paused: weakref.WeakKeyDictionary[Any, weakref.ref] = weakref.WeakKeyDictionary()


def _top_k(logprobs: Any) -> int | None:
    """logprobs= as the number of alternatives per token: None for False/None, 0 for True, else k itself."""
    if logprobs is None or logprobs is False:
        return None
    if logprobs is True:
        return 0
    if not isinstance(logprobs, int | np.integer) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise Error(f"logprobs must be True/False or an int 0..{MAX_TOP_LOGPROBS} (the alternatives per token), "
                    f"got {logprobs!r}")
    return int(logprobs)


def _token_logprobs(canvas: np.ndarray, lp: Any) -> list[TokenLogprob]:
    """The committed canvas's tokens with their log-probabilities from the StepLogprobs of its last step."""
    out = []
    for j, t in enumerate(canvas.tolist()):
        top = [(int(i), float(v)) for i, v in zip(lp.top_ids[j], lp.top[j], strict=True)]
        # the token's own entry among the alternatives, where it is one: the same number in both places
        out.append(TokenLogprob(int(t), next((v for i, v in top if i == t), float(lp.argmax[j])), top))
    return out


def request(model: Engine, prompt: Any, *, max_new_tokens: int = 256, steps: int | None = None,
            seed: int | None = None, t_min: float | None = None, t_max: float | None = None,
            entropy_bound: float | None = None, stability: Any = FROM_FILE, confidence: Any = FROM_FILE,
            chat: bool | None = None, on_prefill: Callable[[int, int], Any] | None = None,
            image_budget: int = 280, template: Any = None, sampler: SamplerSettings | None = None,
            temperature: float | None = None, logprobs: bool | int | None = None,
            json_schema: Any = None) -> tuple[Request, int, list[int]]:
    """Check the arguments and lay out the prompt now; return (the request generator a driver runs (see
    batching), the seed in use, the prompt's token ids)."""
    hp = model.hparams
    if sampler is not None and not isinstance(sampler, SamplerSettings):
        raise Error(f"sampler must be a dg.SamplerSettings or None, got {sampler!r}")
    cfg = scaled((model.sampler_defaults if sampler is None else sampler).override(
        steps=steps, t_min=t_min, t_max=t_max, entropy_bound=entropy_bound, stability=stability,
        confidence=confidence), temperature)
    greedy = is_greedy(temperature)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not (
            max_new_tokens > 0 or max_new_tokens == UNLIMITED):
        raise Error(f"max_new_tokens must be a positive int, or -1 for no limit (until EOS or the context is "
                    f"full), got {max_new_tokens!r}")
    if on_prefill is not None and not callable(on_prefill):  # checked before any work, not at the first call
        raise Error(f"on_prefill must be callable or None, got {on_prefill!r}")
    top_k = _top_k(logprobs)
    if top_k is not None and template is not None:
        raise Error("logprobs are not available with a template (its fixed tokens are not sampled)")
    L = hp.canvas_length
    if json_schema is not None and template is not None:
        raise Error("give a template or a json_schema, not both")
    lay = structured.lay_out(model, json_schema) if json_schema is not None else \
        None if template is None else lay_out(model, template)
    # A template may stand alone: the canvas then follows just the BOS token.
    alone = lay is not None and (prompt is None or prompt == "")
    ids, images = (model.tokenize(""), []) if alone else build_prompt(model, prompt, chat, image_budget)
    if max_new_tokens == UNLIMITED:  # llama.cpp's -n -1: as many canvases as the context holds
        max_new_tokens = model.n_ctx
    n_canvas = -(-max_new_tokens // L) if lay is None else lay.n_canvas
    if len(ids) + L > model.n_ctx:
        raise Error(f"the prompt ({len(ids)} tokens) leaves no room for a canvas of {L} in n_ctx={model.n_ctx}")
    if lay is not None and len(ids) + n_canvas * L > model.n_ctx:
        raise Error(f"the prompt ({len(ids)} tokens) and the template ({n_canvas} canvases of {L}) exceed "
                    f"n_ctx={model.n_ctx}")
    n_canvas = min(n_canvas, (model.n_ctx - len(ids)) // L)
    seed = resolve_seed(seed, greedy)
    limit = None if lay is not None else max_new_tokens  # a template sets its own length
    req = _request(model, ids, images, lay, n_canvas, limit, cfg, seed, on_prefill, greedy=greedy, logprobs=top_k)
    return req, seed, ids


def stream(model: Engine, prompt: Any, **kw: Any) -> Stream:
    """Check the arguments and lay out the prompt now; return the Stream that generates (see Model.stream)."""
    req, seed, _ = request(model, prompt, **kw)
    me: list[weakref.ref] = []
    events = _alone(model, req, me)
    me.append(weakref.ref(events))
    return Stream(events, seed)


def _alone(model: Engine, req: Request, me: list[weakref.ref]) -> Generator[StepEvent | CanvasEvent, None, Generation]:
    """A request run by itself on the model's own sequence, the model held until it ends."""
    with model.exclusive():
        prev = _paused.get(model)
        if prev is not None and (g := prev()) is not None and not g.gi_running:
            g.close()  # a stream paused on this thread and not ended: its canvas state is about to go stale
        _paused[model] = me[0]
        try:
            return (yield from solo(model, req))
        finally:
            if _paused.get(model) is me[0]:
                del _paused[model]


def _text_delta(text: str, sent: int, last: bool) -> str:
    """The part of `text` after the `sent` characters already streamed; a trailing incomplete character
    (U+FFFD of a UTF-8 sequence cut at the canvas edge) waits for the next canvas."""
    delta = text[sent:]
    return delta if last else delta.rstrip("\ufffd")


def _template_text(lay: Any, done: list[int], c: int, last: bool, detokenize: Callable) -> str:
    """A template's text after canvas c committed: whole once filled (the last canvas); before that what its
    committed positions already fix (a json_schema's parts so far; a plain template's none)."""
    toks = np.asarray(done)
    return lay.fill(toks, detokenize)[0] if last else lay.partial(toks, (c + 1) * lay.canvas_length)


def _finish_reason(lay: Any, hit_eos: bool, n_new: int, limit: int | None) -> str:
    """Why a generation ended after its last canvas (FINISH_REASONS)."""
    if lay is not None:
        return "stop"
    if hit_eos:
        return "eos"
    return "length" if limit is not None and n_new >= limit else "context"


def _request(model: Engine, ids: list[int], images: list[Any], lay: Any, n_canvas: int, limit: int | None,
             cfg: SamplerSettings, seed: int, on_prefill: Any, *, greedy: bool = False,
             logprobs: int | None = None) -> Request:
    """One generation as a request: yields Prefill / Denoise asks (see batching) and the consumer's events,
    returns the Generation. It reads the model (sizes, tokenizer) but leaves its state to the driver.
    limit: most new tokens (canvases are denoised whole; the last one is cut), None with a template.
    greedy: accepted positions take their argmax token (temperature 0). logprobs: None, or each committed
    token's log-probability with the top k alternatives (TokenLogprob)."""
    L, V = model.hparams.canvas_length, model.hparams.n_vocab
    rng = np.random.Generator(np.random.PCG64(seed))
    stop_ids = eos_ids(model)

    committed = list(ids)
    new: list[int] = []
    lps: list[TokenLogprob] | None = None if logprobs is None else []
    infos: list[CanvasInfo] = []
    prefill = forward = host = 0.0
    n_steps = renoised = repaired = 0
    sent = 0  # characters of the text streamed so far
    finish = "stop"
    t_start = time.perf_counter()

    def timings() -> Timings:
        total = time.perf_counter() - t_start
        return Timings(prefill_ms=1e3 * prefill, step_ms=1e3 * (forward + host) / max(n_steps, 1),
                       tokens_per_s=len(new) / total if total > 0 else 0.0,
                       forward_ms=1e3 * forward / max(n_steps, 1), host_ms=1e3 * host / max(n_steps, 1),
                       renoised=renoised, repaired=repaired)

    for c in range(n_canvas):
        # With a template: its fixed tokens are clamped in the canvas fed to the model and in the argmax,
        # and only the free (hole) positions take part in acceptance, the entropy sum and the stop rule.
        fixed = None if lay is None else lay.fixed[lay.canvas(c)]
        last = c == n_canvas - 1
        if fixed is not None and fixed.all():  # nothing to denoise: commit the fixed tokens as they are
            argmax = lay.tokens[lay.canvas(c)]
            infos.append(CanvasInfo(steps=0, stopped_early=True, eos=False))
            committed.extend(int(t) for t in argmax)
            text = _template_text(lay, committed[len(ids):], c, last, model.detokenize)
            delta = _text_delta(text, sent, last)
            sent += len(delta)
            yield CanvasEvent(c, np.asarray(argmax), delta, 0, True, False, timings(), finish if last else None)
            continue
        t0 = time.perf_counter()
        yield Prefill(np.asarray(committed, dtype=np.int32), images, on_prefill)
        prefill += time.perf_counter() - t0
        free = slice(None) if fixed is None else ~fixed
        vocab = None if lay is None else lay.vocab(c)
        z = rng.integers(0, V, L)
        if fixed is not None:
            fixed_tokens = lay.tokens[lay.canvas(c)]
            z = sampler.clamp(z, fixed, fixed_tokens)
        history: list[np.ndarray] = []
        argmax = z
        stopped = False
        for step in range(1, cfg.steps + 1):
            n = cfg.steps - step + 1  # remaining steps, N .. 1
            temp = sampler.temperature(n, cfg.steps, cfg.t_min, cfg.t_max)
            u = rng.random(L, dtype=np.float32)
            t0 = time.perf_counter()
            argmax, entropy, sampled, *step_lp = yield Denoise(z, temp, step > 1, u, vocab, logprobs)
            t1 = time.perf_counter()
            noise = rng.integers(0, V, L)
            if fixed is None:
                acc = sampler.accept(entropy, cfg.entropy_bound)
                z = sampler.renoise(acc, sampler.pick(sampled, argmax, greedy), noise)
            else:
                argmax = sampler.clamp(argmax, fixed, fixed_tokens)
                acc = np.zeros(L, dtype=bool)
                acc[free] = sampler.accept(entropy[free], cfg.entropy_bound)
                picked = sampler.pick(sampled, argmax, greedy)
                z = sampler.clamp(sampler.renoise(acc, picked, noise), fixed, fixed_tokens)
            stopped = sampler.should_stop(history, argmax[free], entropy[free], cfg.stability, cfg.confidence)
            history.append(argmax[free])
            if lay is not None and (stopped or step == cfg.steps):
                # The canvas would commit: rules no per-position vocabulary expresses (json_schema) are checked
                # now; broken values are re-noised while steps remain, then replaced by valid ones.
                done = np.concatenate([np.asarray(committed[len(ids):], dtype=np.int64), argmax])
                if step < cfg.steps:
                    bad = lay.check(done, c)
                    if bad is not None:
                        z = np.where(bad, noise, z)
                        renoised += int(bad.sum())
                        stopped = False
                else:
                    argmax, n = lay.repair(done, c)
                    repaired += n
            # The consumer's time with the event counts as host time, as on_step's did.
            yield StepEvent(c, step, cfg.steps, temp, int(acc.sum()), float(entropy[free].mean()),
                            argmax, fixed, model.detokenize)
            forward += t1 - t0
            host += time.perf_counter() - t1
            n_steps += 1
            if stopped:
                break
        # With a template, the template decides where generation ends, not an EOS.
        canvas, hit_eos = sampler.trim_eos(np.asarray(argmax), stop_ids) if lay is None else (argmax, False)
        if limit is not None and len(new) + len(canvas) > limit:  # max_new_tokens ends inside this canvas
            canvas, hit_eos = canvas[: limit - len(new)], False
        info = CanvasInfo(steps=len(history), stopped_early=stopped and len(history) < cfg.steps, eos=hit_eos)
        infos.append(info)
        new.extend(int(t) for t in canvas)
        canvas_lps = None if lps is None else _token_logprobs(canvas, step_lp[0])
        if lps is not None:
            lps.extend(canvas_lps)
        committed.extend(int(t) for t in argmax)
        last = last or hit_eos
        if last:
            finish = _finish_reason(lay, hit_eos, len(new), limit)
        text = model.detokenize(new) if lay is None else \
            _template_text(lay, committed[len(ids):], c, last, model.detokenize)
        delta = _text_delta(text, sent, last)
        sent += len(delta)
        yield CanvasEvent(c, np.asarray(canvas), delta, info.steps, info.stopped_early, hit_eos, timings(),
                          finish if last else None, canvas_lps)
        if hit_eos:
            break
    holes: list[str] = []
    if lay is None:
        text = model.detokenize(new)
    else:
        text, holes, new = lay.fill(np.asarray(committed[len(ids):]), model.detokenize)
    value = lay.value(text) if isinstance(lay, structured.SchemaLayout) else None
    return Generation(text=text, tokens=new, canvases=infos, timings=timings(), seed=int(seed),
                      prompt_tokens=len(ids), holes=holes, finish_reason=finish, logprobs=lps, json=value)


def generate(model: Engine, prompt: Any, *, on_step: Callable[[StepEvent], Any] | None = None,
             **kw: Any) -> Generation:
    """Generate canvases after `prompt` (see Model.generate): the stream, consumed; on_step sees each StepEvent."""
    if on_step is not None and not callable(on_step):  # checked before any work, not at the first call
        raise Error(f"on_step must be callable or None, got {on_step!r}")
    with stream(model, prompt, **kw) as s:  # closed even when on_step raises: a kept traceback holds no model
        for ev in s:
            if on_step is not None and isinstance(ev, StepEvent):
                on_step(ev)
    assert s.generation is not None
    return s.generation


class BatchStream(_Closes):
    """The events of several generations run together (see Model.stream_batch): (request index, event) pairs,
    each request's in its own order; `.generations` holds the Generations (in prompt order) once the iteration
    has ended. Breaking out (or close()) ends them all between steps; cancel(i) ends one, leaving the others'
    tokens as they would have been."""

    def __init__(self, batch: Batch, seeds: list[int]) -> None:
        self._batch = batch
        self._events = iter(batch)
        self.seeds = seeds  # the seed of each request (fresh ones where None or -1 was asked for)
        self.generations: list[Generation | None] = [None] * len(seeds)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[int, StepEvent | CanvasEvent]:
        while True:
            i, ev = next(self._events)  # the batch closes itself when its iteration ends, however it ends
            if not isinstance(ev, Done):
                return i, ev
            if ev.error is not None:  # as a solo stream would: the error ends the whole stream
                self.close()
                raise ev.error
            self.generations[i] = ev.result

    def cancel(self, i: int) -> bool:
        """End request i (its index in the prompts) now; its Generation stays None. False when it had already
        ended."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.seeds):
            raise Error(f"cancel takes a request index in 0..{len(self.seeds) - 1}, got {i!r}")
        return self._batch.cancel(i)

    def close(self) -> None:
        """End every request now (also what leaving a for loop early does, when the stream is dropped)."""
        self._batch.close()


def _per_request(name: str, value: Any, n: int) -> list[Any]:
    """One value per request: a list (or tuple) is one per request (its length must be n), anything else is
    for all. A template given as parts (str and Hole, at least one Hole) is one template for all."""
    if name == "template" and isinstance(value, list | tuple) and any(isinstance(v, Hole) for v in value):
        return [value] * n
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise Error(f"{name}: a list gives one value per prompt, so it needs {n} values, got {len(value)}")
        return list(value)
    return [value] * n


BATCH_SETTINGS = frozenset(inspect.signature(request).parameters) - {"model", "prompt"}


def stream_batch(model: Engine, prompts: Any, *, max_batch: int | None = None, **kw: Any) -> BatchStream:
    """Check every request and lay out its prompt now; return the BatchStream (see Model.stream_batch)."""
    if not isinstance(prompts, list | tuple) or not prompts:
        raise Error(f"prompts must be a non-empty list of prompts, got {type(prompts).__name__}")
    n = len(prompts)
    if max_batch is None:
        max_batch = n
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise Error(f"max_batch must be an int >= 1 or None, got {max_batch!r}")
    if unknown := sorted(set(kw) - BATCH_SETTINGS):
        raise Error(f"generate_batch/stream_batch got unknown keywords {unknown} (on_step is not one: iterate "
                    f"stream_batch instead); they take {sorted(BATCH_SETTINGS)}")
    on_prefill = kw.pop("on_prefill", None)  # one callback for all (it is not told which request it reports)
    per = {name: _per_request(name, value, n) for name, value in kw.items()}
    batch = Batch(model, max_batch)
    seeds = []
    for i, prompt in enumerate(prompts):
        try:
            req, seed, ids = request(model, prompt, on_prefill=on_prefill, **{k: v[i] for k, v in per.items()})
        except Error as e:
            batch.close()
            raise Error(f"prompt {i}: {e}") from e
        batch.add(i, req, ids)
        seeds.append(seed)
    return BatchStream(batch, seeds)


def generate_batch(model: Engine, prompts: Any, **kw: Any) -> list[Generation]:
    """Generate after every prompt, canvases denoised together (see Model.generate_batch)."""
    with stream_batch(model, prompts, **kw) as s:
        for _ in s:
            pass
    assert all(g is not None for g in s.generations)
    return list(s.generations)


def infill(model: Engine, prefix: str, suffix: str, n_tokens: int, **kw: Any) -> str:
    """The text between `prefix` and `suffix` (see Model.infill): the prefix is the raw prompt (no chat
    template), the canvas holds a hole of n_tokens followed by the suffix."""
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise Error("infill needs str prefix and suffix")
    allowed, empty = kw.pop("allowed", None), kw.pop("empty", False)
    template = [Hole(n_tokens, allowed, empty, "the infill hole"), *([suffix] if suffix else [])]
    return generate(model, model.tokenize(prefix), template=template, **kw).holes[0]
