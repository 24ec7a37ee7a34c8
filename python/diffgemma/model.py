"""The user's model: a loaded engine with the user-level calls (generate, stream, generate_batch,
stream_batch, infill, chat) as thin methods over generation.py and chat.py; `load` and `resolve`."""

from __future__ import annotations

import os
import pathlib
from typing import Any

from . import hub
from .chat import chat as _chat
from .engine import N_BATCH, Engine
from .errors import Error
from .generation import FROM_FILE, BatchStream, Generation, Stream
from .generation import generate as _generate
from .generation import generate_batch as _generate_batch
from .generation import infill as _infill
from .generation import stream as _stream
from .generation import stream_batch as _stream_batch
from .sampler import SamplerSettings


class Model(Engine):
    """A DiffusionGemma model loaded from a `diffusion-gemma` GGUF file (see `diffgemma.load`)."""

    def generate(self, prompt: Any, *, max_new_tokens: int = 256, steps: int | None = None, seed: int | None = None,
                 t_min: float | None = None, t_max: float | None = None, entropy_bound: float | None = None,
                 stability: Any = FROM_FILE, confidence: Any = FROM_FILE, chat: bool | None = None,
                 on_step: Any = None, on_prefill: Any = None, image_budget: int = 280,
                 template: Any = None, sampler: SamplerSettings | None = None,
                 temperature: float | None = None, logprobs: bool | int | None = None,
                 json_schema: Any = None) -> Generation:
        """Generate text after `prompt` by block diffusion.

        prompt: a str, a list of chat messages [{"role", "content"}] or a list of token ids; a message's content
        may be a list of parts {"type": "text", "text"} / {"type": "image", "image": path | bytes | PIL image |
        uint8 array} (needs mmproj=; image_budget: soft tokens per image, 70..1120). chat=None applies
        the file's chat template to str/messages when the file has one. Sampler settings left as None take the
        file's diffusion.eb_* values (else the reference defaults); stability/confidence=None disable the
        adaptive stop. max_new_tokens: most new tokens (canvases are denoised whole, the last one is cut there).
        on_step(event) is called after every denoising step, on_prefill(done, total) after every chunk of n_batch
        tokens encoded (the prompt, then each finished canvas). Returns a Generation (.text, .tokens, .canvases,
        .timings, .seed, .finish_reason: "eos", "length" (max_new_tokens), "context" (n_ctx full first) or, with a
        template, "stop"); see stream for the same generation as events.

        template: fixed text with holes to fill (docs/templates.md): text with {{hole N ...}} tags or a list of
        str and dg.Hole parts. It is laid over as many canvases as it needs (max_new_tokens is then ignored, as
        are EOS tokens); .text is the filled template, .holes each hole's text. The prompt may be "" or None.

        sampler: a dg.SamplerSettings to start from instead of m.sampler_defaults; the six sampler keywords,
        where given, override it. temperature: scales the temperature schedule (t_min and t_max; None or 1 keep
        it); 0 is greedy: accepted positions take their argmax token, and with no seed the noise is drawn from
        seed 0, so the text is the same every run.

        logprobs: True, or k (0..20) for the k most likely alternatives too: .logprobs holds a dg.TokenLogprob
        (.token, .logprob, .top) per token, its log-probability under softmax(logits / T) of the step that
        committed it (its canvas's last, whose argmax it is); gathered on the device, off unless asked. Not with
        a template.

        json_schema: a JSON Schema (dict, JSON text or pydantic model class) the answer follows
        (docs/structured.md): laid out like a template; .text always parses and validates, .json is the value."""
        self._check_open()
        return _generate(self, prompt, max_new_tokens=max_new_tokens, steps=steps, seed=seed, t_min=t_min,
                         t_max=t_max, entropy_bound=entropy_bound, stability=stability, confidence=confidence,
                         chat=chat, on_step=on_step, on_prefill=on_prefill, image_budget=image_budget,
                         template=template, sampler=sampler, temperature=temperature, logprobs=logprobs,
                         json_schema=json_schema)

    def stream(self, prompt: Any, *, max_new_tokens: int = 256, steps: int | None = None, seed: int | None = None,
               t_min: float | None = None, t_max: float | None = None, entropy_bound: float | None = None,
               stability: Any = FROM_FILE, confidence: Any = FROM_FILE, chat: bool | None = None,
               on_prefill: Any = None, image_budget: int = 280, template: Any = None,
               sampler: SamplerSettings | None = None, temperature: float | None = None,
               logprobs: bool | int | None = None, json_schema: Any = None) -> Stream:
        """Generation as a stream of events (arguments as for generate, which consumes this stream).

        Iterate it: a dg.StepEvent after every denoising step (.canvas_index, .step, .steps, .temperature,
        .accepted, .mean_entropy, .argmax, .text, .fixed), then a dg.CanvasEvent when the canvas commits
        (.tokens, .text_delta, .steps, .stopped_early, .eos, .timings so far, .finish_reason on the last one,
        .logprobs when asked for); the text deltas concatenate to
        the final text (with a template it comes whole with the last canvas). When the iteration ends,
        `.generation` holds the Generation, the same tokens as generate() for the same seed. Bad arguments
        raise here, before any work. Breaking out of the loop (or .close(), or `with m.stream(...) as s`)
        stops between steps; the model holds no half-done state and the next call works. The model is busy
        (other threads wait) until the stream ends or is dropped; a new generation on this thread ends a
        paused stream."""
        self._check_open()
        return _stream(self, prompt, max_new_tokens=max_new_tokens, steps=steps, seed=seed, t_min=t_min,
                       t_max=t_max, entropy_bound=entropy_bound, stability=stability, confidence=confidence,
                       chat=chat, on_prefill=on_prefill, image_budget=image_budget, template=template,
                       sampler=sampler, temperature=temperature, logprobs=logprobs, json_schema=json_schema)

    def generate_batch(self, prompts: list[Any], *, max_batch: int | None = None, **settings: Any
                       ) -> list[Generation]:
        """Generate after each of `prompts` with their canvases denoised together: one decoder pass per step
        over every running request's canvas (the projections, experts and LM head see all their rows at once).

        settings: the keywords of generate but on_step (max_new_tokens, steps, seed, t_min, t_max,
        entropy_bound, stability, confidence, chat, image_budget, template, sampler, temperature, logprobs,
        json_schema), each one value for all or a list with one per prompt; on_prefill(done, total) is shared.
        max_batch: most requests denoised together (None: all); the rest wait and join between steps as others
        finish. Each request is answered as it would be alone: the same tokens as generate() with its seed.
        Returns the Generations in prompt order."""
        self._check_open()
        return _generate_batch(self, prompts, max_batch=max_batch, **settings)

    def stream_batch(self, prompts: list[Any], *, max_batch: int | None = None, **settings: Any) -> BatchStream:
        """generate_batch as a stream: (request index, StepEvent | CanvasEvent) pairs as the requests produce
        them; `.generations` once the loop ends, `.cancel(i)` ends one request, breaking out ends all."""
        self._check_open()
        return _stream_batch(self, prompts, max_batch=max_batch, **settings)

    def infill(self, prefix: str, suffix: str, n_tokens: int, **kw: Any) -> str:
        """The text between `prefix` (the raw prompt) and `suffix`, in a hole of n_tokens. Keywords: allowed=,
        empty= as for dg.Hole, and the sampler settings of generate."""
        self._check_open()
        return _infill(self, prefix, suffix, n_tokens, **kw)

    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict] | None = None, tool_choice: Any = "auto",
             template_kwargs: dict[str, Any] | None = None, **generate_kw: Any) -> Any:
        """One assistant turn with tool calling and thinking: renders `messages` (OpenAI shapes: assistant
        `tool_calls`, `tool` results) and `tools` (OpenAI function schemas; tool_choice 'auto', 'none',
        'required' or {"type": "function", "function": {"name": ...}}) through the file's chat template (else
        the built-in Gemma 4 format), generates (keywords as for generate) and returns a ChatReply (.content,
        .reasoning, .tool_calls, .finish_reason, .generation; .to_message() for the next turn).
        template_kwargs reach the template, e.g. {"enable_thinking": True}."""
        self._check_open()
        return _chat(self, messages, tools=tools, tool_choice=tool_choice, template_kwargs=template_kwargs,
                     **generate_kw)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None = None, **load_kw: Any) -> Model:
        """Load a GGUF of the Hugging Face repository `repo_id` ("OWNER/NAME"), downloaded into huggingface_hub's
        cache unless it is there (HF_HUB_OFFLINE=1: the cache only). filename: a quant tag ("Q8_0"; default
        Q4_K_M, else Q8_0, else the first .gguf, as llama.cpp's -hf) or a file path in the repository. The
        repository's mmproj comes along when it has one, unless mmproj= is given (False: none). The other
        keywords are dg.load's."""
        path, mmproj = hub.resolve_hf(repo_id, filename=filename, mmproj=load_kw.pop("mmproj", None))
        return cls(path, mmproj=mmproj, **load_kw)


def load(path: str | os.PathLike, *, n_gpu_layers: int = -1, threads: int | None = None,
         flash_attn: str | bool = "auto", verbose: bool = False, n_ctx: int | None = None,
         mmproj: str | os.PathLike | bool | None = None, n_batch: int = N_BATCH, kv_type: str = "f16",
         repack: bool = True, device: Any = None, tensor_split: Any = None, rpc: Any = None) -> Model:
    """Open a `diffusion-gemma` GGUF file. `path` may also be "tiny" for the embedded default model.

    device: a device name ("Vulkan0", "CUDA0", "RPC0"), a list of them, or "cpu"; default: every GPU (see
    dg.list_devices()). n_gpu_layers: -1 = every layer (and the output layer) on those devices, 0 = CPU only, k =
    the last k layers (the output layer counts as one). tensor_split: one weight per device for the layer split
    (default: in proportion to free memory). rpc: "host:port" of ggml RPC servers (a list, or comma-separated),
    whose devices join the others (docs/devices.md). threads: CPU threads (default one per physical core; ggml's
    threads wait passively, docs/performance.md). n_ctx: most committed + canvas tokens (default: the file's context
    length, or less where its prompt-KV store would not fit next to the weights in the memory free now; the store
    grows as the context fills). mmproj: a `gemma4v` mmproj GGUF with the vision tower, for images in prompts.
    n_batch: prompt tokens encoded per graph (bounds the compute buffers). kv_type: the prompt-KV store's type,
    "f16" (default) or "f32". repack: copy the CPU matrices whose product runs faster from another layout into it
    at load instead of mapping them: Q4_0, IQ4_NL, MXFP4 into ggml's repacked layouts, dense Q4_1/Q5_1 as F32
    (without GPU layers) (faster products; more load time, and memory for the F32 copies; False: map every
    weight; cpu_layout.py).
    path "hf://OWNER/NAME[:QUANT]" or "hf://OWNER/NAME/FILE.gguf": a Hugging Face model, downloaded into
    huggingface_hub's cache (docs/api.md, Hugging Face); a repository brings its mmproj unless mmproj= is given
    (False: none).
    """
    if hub.is_hf(path):
        path, mmproj = hub.resolve_hf(path, mmproj=mmproj)
    return Model(resolve(path), n_gpu_layers=n_gpu_layers, threads=threads, flash_attn=flash_attn,
                 verbose=verbose, n_ctx=n_ctx, mmproj=None if mmproj is False else mmproj, n_batch=n_batch,
                 kv_type=kv_type, repack=repack, device=device, tensor_split=tensor_split, rpc=rpc)


# "tiny": the small DiffusionGemma trained on Shakespeare by tools/make_default_model.py (docs/quality.md).
EMBEDDED = {"tiny": pathlib.Path(__file__).parent / "data" / "shakespeare.gguf"}


def resolve(path: str | os.PathLike) -> pathlib.Path:
    """A file path, the name of a model embedded in the package ("tiny"), or a Hugging Face model "hf://..."
    (its file in huggingface_hub's cache, downloaded if need be)."""
    if hub.is_hf(path):
        return hub.resolve_hf(path, mmproj=False)[0]
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise Error(f"model must be a GGUF file path or {', '.join(repr(k) for k in EMBEDDED)}, got {path!r}")
    if isinstance(path, str) and path in EMBEDDED and not pathlib.Path(path).exists():
        return EMBEDDED[path]
    return pathlib.Path(path)
