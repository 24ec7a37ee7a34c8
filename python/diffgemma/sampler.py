"""The entropy-bound sampler's rules, as short pure functions on numpy arrays (../shared/spec/model.md §7).

The per-position statistics (argmax, entropy, multinomial sample) are computed on the device by the graph;
these functions take the O(canvas) results and decide acceptance, re-noising and stopping on the host.
SamplerSettings holds their six settings: reference defaults, validation and the GGUF keys, in one place.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import Error, GGUFError


class _FromFile:
    """The default of stability/confidence: take the file's value (None switches the adaptive stop off)."""

    def __repr__(self) -> str:
        return "FROM_FILE"


FROM_FILE: Any = _FromFile()


def _setting(default: Any, gguf: str, hf: str, help: str, *, off: bool = False) -> Any:
    """A SamplerSettings field: its reference default, the GGUF key storing it, the Hugging Face generation
    config key it comes from (a dot for a nested object), the help the CLI shows, and whether None is
    allowed (it switches the adaptive stop off)."""
    return dataclasses.field(default=default, metadata={"gguf": gguf, "hf": hf, "help": help, "off": off})


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The entropy-bound sampler's settings (spec §7.1). The defaults are the reference (transformers) ones,
    which the released checkpoint also uses; a file's diffusion.eb_* keys give its own (Model.sampler_defaults).
    Each field's metadata maps it to its GGUF key and Hugging Face name: the CLI flags, the server's request
    fields and the converter are derived from these fields."""

    steps: int = _setting(48, "diffusion.eb_max_steps", "max_denoising_steps", "denoising steps per canvas")
    t_min: float = _setting(0.4, "diffusion.eb_t_min", "t_min",
                            "temperature at the last step of the linear schedule")
    t_max: float = _setting(0.8, "diffusion.eb_t_max", "t_max",
                            "temperature at the first step of the linear schedule")
    entropy_bound: float = _setting(0.1, "diffusion.eb_entropy_bound", "sampler_config.entropy_bound",
                                    "each step keeps sampled tokens, lowest entropy first, while the entropy summed "
                                    "before them is at most this bound; the rest are re-noised")
    stability: int | None = _setting(1, "diffusion.eb_stability_threshold", "stability_threshold",
                                     "stop a canvas early once its argmax is unchanged for this many steps and "
                                     "confident", off=True)
    confidence: float | None = _setting(0.005, "diffusion.eb_confidence_threshold", "confidence_threshold",
                                        "...and its mean entropy is below this", off=True)

    def __post_init__(self) -> None:
        problems = {f.name: setting_problem(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)}
        if not problems["t_min"] and not problems["t_max"] and (self.t_min < 0 or self.t_max <= self.t_min):
            problems["t_min"] = f"need 0 <= t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}"
        if any(problems.values()):
            raise Error("; ".join(p for p in problems.values() if p))

    def replace(self, **changes: Any) -> SamplerSettings:
        """A copy with some fields changed, validated like a new one."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise Error(f"unknown sampler setting(s) {', '.join(unknown)}; the settings are {', '.join(names)}")
        return dataclasses.replace(self, **changes)

    def override(self, **given: Any) -> SamplerSettings:
        """These settings under generate()'s keywords: None keeps a value, except for stability/confidence,
        which FROM_FILE keeps and None switches off."""
        keep = {f.name: FROM_FILE if f.metadata["off"] else None for f in dataclasses.fields(self)}
        return self.replace(**{k: v for k, v in given.items() if k not in keep or v is not keep[k]})


    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> SamplerSettings:
        """A file's settings: its diffusion.eb_* keys, the reference default for each absent one."""
        problems = metadata_problems(md)
        if problems:
            raise GGUFError("; ".join(problems))
        return cls(**_from_metadata(md)[0])

    def to_metadata(self) -> dict[str, Any]:
        """The GGUF keys storing these settings (a file cannot store None: the adaptive stop is always on)."""
        md = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                raise Error(f"a GGUF file cannot store {f.name}=None (the adaptive stop switched off)")
            md[f.metadata["gguf"]] = v
        return md


def setting_problem(name: str, v: Any) -> str | None:
    """Why `v` cannot be the sampler setting `name` on its own (None if it can); the t_min < t_max rule
    needs both and is SamplerSettings' own."""
    if name == "steps":
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
            return f"steps must be a positive int, got {v!r}"
    elif name in ("t_min", "t_max", "entropy_bound"):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return f"{name} must be a finite number, got {v!r}"
        if name == "entropy_bound" and v <= 0:
            return f"entropy_bound must be > 0, got {v}"
    elif name == "stability":
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            return f"stability must be an int >= 0 or None, got {v!r}"
    elif name == "confidence":
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                              or v <= 0):
            return f"confidence must be a number > 0 or None, got {v!r}"
    return None


def metadata_problems(md: Mapping[str, Any]) -> list[str]:
    """What is wrong with a file's diffusion.eb_* keys (the loader lists these with the other problems)."""
    vals, problems = _from_metadata(md)
    if not problems:
        try:
            SamplerSettings(**vals)
        except Error as e:
            problems.append(f"sampler settings (diffusion.eb_*): {e}")
    return problems


def _from_metadata(md: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    vals: dict[str, Any] = {}
    problems: list[str] = []
    for f in dataclasses.fields(SamplerSettings):
        key = f.metadata["gguf"]
        if key not in md:
            continue
        v = md[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            problems.append(f"{key} has a non-numeric value {v!r}")
        elif isinstance(f.default, int):
            vals[f.name] = int(v)
        else:  # float32 keys come back as e.g. 0.4000000059604645: keep the value the writer meant
            vals[f.name] = float(f"{float(v):.7g}")
    return vals, problems


GREEDY_SEED = 0  # the noise draws of a greedy generation (temperature 0) given no seed: the same text every run
# A positive temperature's range: the step's 1/T must stay a finite float32 and T itself finite.
TEMPERATURES = (1e-3, 100.0)


def temperature_problem(temperature: Any) -> str | None:
    """Why `temperature` cannot scale the schedule (None if it can): 0 (greedy), a number in TEMPERATURES or
    None."""
    lo, hi = TEMPERATURES
    if temperature is None or (not isinstance(temperature, bool) and isinstance(temperature, int | float)
                               and (temperature == 0 or lo <= temperature <= hi)):
        return None
    return f"temperature must be 0 (greedy) or a number in {lo:g}..{hi:g}, got {temperature!r}"


def scaled(settings: SamplerSettings, temperature: float | None) -> SamplerSettings:
    """The settings under a user's `temperature` (OpenAI's and llama.cpp's knob): None or 1 keeps the schedule,
    t > 0 multiplies t_min and t_max by t, 0 keeps the schedule (the entropies that rank positions for
    acceptance need one) and makes the generation greedy (see pick)."""
    if why := temperature_problem(temperature):
        raise Error(why)
    if not temperature or temperature == 1:
        return settings
    return settings.replace(t_min=settings.t_min * temperature, t_max=settings.t_max * temperature)


def is_greedy(temperature: float | None) -> bool:
    """Temperature 0: accepted positions take their argmax token instead of a sample."""
    return temperature is not None and temperature == 0


def pick(sampled: np.ndarray, argmax: np.ndarray, greedy: bool) -> np.ndarray:
    """The tokens accepted positions take: the multinomial samples, or the argmax when greedy."""
    return argmax if greedy else sampled


def temperature(n: int, steps: int, t_min: float, t_max: float) -> float:
    """Temperature of the step with n steps remaining (n = steps .. 1): t_max first, never reaching t_min."""
    return temperature_at(n / steps, t_min, t_max)


def temperature_at(level: float, t_min: float, t_max: float) -> float:
    """The linear schedule at noise level `level` in [0, 1]: noisier canvases are denoised hotter."""
    return t_min + (t_max - t_min) * level


def accept(entropy: np.ndarray, bound: float) -> np.ndarray:
    """Positions to accept: sorted by ascending entropy, position (k) is accepted iff the sum of the entropies
    strictly before it is <= bound (an exclusive prefix sum). The lowest-entropy position is always accepted.
    Ties keep position order (stable sort)."""
    order = np.argsort(entropy, kind="stable")
    h = entropy[order].astype(np.float32)
    before = np.cumsum(h, dtype=np.float32) - h  # float32 like the reference, compared with a float32 bound
    acc = np.zeros(len(entropy), dtype=bool)
    acc[order] = before <= np.float32(bound)
    return acc


def renoise(accepted: np.ndarray, sampled: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Next canvas: accepted positions take their sampled token, every other position fresh uniform noise."""
    return np.where(accepted, sampled, noise)


def clamp(canvas: np.ndarray, fixed: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """A template's fixed positions hold their tokens, whatever was sampled or drawn there."""
    return np.where(fixed, tokens, canvas)


def is_stable(history: list[np.ndarray], argmax: np.ndarray, stability: int) -> bool:
    """The argmax canvas equals each of the last `stability` argmax canvases at every position (0: always)."""
    if stability == 0:
        return True
    if len(history) < stability:
        return False
    return all(np.array_equal(h, argmax) for h in history[-stability:])


def should_stop(history: list[np.ndarray], argmax: np.ndarray, entropy: np.ndarray, stability: int | None,
                confidence: float | None) -> bool:
    """Stable and confident: unchanged argmax canvas and mean entropy (over all positions) below confidence.
    With either threshold None there is no adaptive stop."""
    if stability is None or confidence is None:
        return False
    mean = np.mean(entropy, dtype=np.float32)
    return bool(is_stable(history, argmax, stability) and mean < np.float32(confidence))


def trim_eos(canvas: np.ndarray, eos_ids: set[int] | frozenset[int]) -> tuple[np.ndarray, bool]:
    """Cut a committed canvas after its first EOS (kept); returns (tokens, whether an EOS was found)."""
    for i, t in enumerate(canvas.tolist()):
        if t in eos_ids:
            return canvas[: i + 1], True
    return canvas, False
