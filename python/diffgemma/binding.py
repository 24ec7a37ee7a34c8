"""cffi (ABI mode) binding to the ggml and libllama shared libraries shipped by llama-cpp-python.

The only module that talks to cffi. Its declarations (binding_cdef.py) are written from the public headers of
ggml 0.25.3 as vendored by llama-cpp-python 0.3.36; at import we check that the struct layouts we declared match
the library.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import threading
from collections.abc import Iterator

import cffi
from gguf import GGMLQuantizationType as QT

from .binding_cdef import CDEF
from .errors import Error

EXPECTED_LLAMA_CPP_PYTHON = "0.3.36"

# ggml enum values used by the rest of the package (from ggml.h / ggml-backend.h; tensor and GGUF value types
# come from the gguf package's enums: GGMLQuantizationType, GGUFValueType).
GGML_ROPE_TYPE_NEOX = 2
GGML_PREC_F32 = 10
GGML_BACKEND_BUFFER_USAGE_WEIGHTS = 1
DEV_TYPE_CPU, DEV_TYPE_GPU, DEV_TYPE_IGPU, DEV_TYPE_ACCEL = 0, 1, 2, 3
GGML_TYPE_COUNT = 43
# The tensor types graphs and buffers are built with, as the plain ints ggml's C calls take.
F32, F16, BF16, I32 = int(QT.F32), int(QT.F16), int(QT.BF16), int(QT.I32)
# Types the pinned ggml's CPU tiled integer GEMM (ggml-cpu/tiled/) takes for mul_mat and mul_mat_id.
TILED_TYPES = frozenset(int(t) for t in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS, QT.IQ2_XXS,
                                         QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ1_S, QT.IQ1_M))
# Types the pinned ggml's x86 CPU backend multiplies only by dot products (no tinyBLAS, tiled or repacked GEMM):
# 2.3x slower than its F32 GEMM on the same values (docs/performance.md; cpu_layout.py copies them as F32).
DOT_ONLY_TYPES = frozenset(int(t) for t in (QT.Q4_1, QT.Q5_1))
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object): offs, size, next, type + padding

ffi = cffi.FFI()
ffi.cdef(CDEF)


def _lib_dir() -> pathlib.Path:
    override = os.environ.get("DIFFGEMMA_LIB_DIR")
    if override:
        return pathlib.Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise Error(
            f"llama-cpp-python is not installed: diffgemma needs llama-cpp-python=={EXPECTED_LLAMA_CPP_PYTHON} "
            "(pip install llama-cpp-python==" + EXPECTED_LLAMA_CPP_PYTHON + ")"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "lib"


def _open() -> object:
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # a failed ggml assert must not start gdb
    # The CPU's tiled K-quant/IQ product runs an expert only when it gets >= 8 rows, else vec_dot (other
    # rounding): a request's numbers would depend on what else is in its batch. Always tiled, they do not
    # (read once, at the first product; ~1 ms more for a 2..16-token encode, no change per step measured).
    os.environ.setdefault("GGML_CPU_TILED_MM_FORCE", "1")
    libdir = _lib_dir()
    path = libdir / "libllama.so"
    if not path.exists():
        raise Error(f"{path} not found: llama-cpp-python=={EXPECTED_LLAMA_CPP_PYTHON} built from source is required")
    try:
        with _openmp_waits_passively():
            # libllama links libggml, libggml-base and the compiled-in backends: dlsym searches all of them.
            return ffi.dlopen(str(path))
    except OSError as e:
        raise Error(f"cannot load {path}: {e}") from e


@contextlib.contextmanager
def _openmp_waits_passively() -> Iterator[None]:
    """While loading ggml, OMP_WAIT_POLICY=PASSIVE unless the user set a policy or a spin count: with libgomp's
    default (300,000 spins at every barrier before sleeping), the CPU threads of a step spin while another
    process holds one of their cores, and a step takes 10-100x longer (bench/threads.py, docs/performance.md).
    The OpenMP runtime reads it once, when it loads (no effect if one named libgomp.so.1 is already loaded,
    e.g. by torch imported first), so the variable is removed again and child processes do not inherit it."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        yield
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        del os.environ["OMP_WAIT_POLICY"]


def _check_layout(lib: object) -> None:
    """Fail loudly if the struct layouts declared above do not match the loaded library."""
    problems = []
    want = GGML_OBJECT_SIZE + ffi.sizeof("struct ggml_tensor")
    got = lib.ggml_tensor_overhead()
    if got != want:
        problems.append(f"ggml_tensor_overhead() is {got}, declared layout gives {want}")
    tr = lib.ggml_get_type_traits(8)  # Q8_0: 32 values in 34 bytes
    if tr.blck_size != 32 or tr.type_size != 34 or ffi.string(tr.type_name) != b"q8_0":
        problems.append("struct ggml_type_traits does not match (q8_0 block 32 / 34 bytes)")
    p = lib.llama_model_default_params()
    if p.vocab_only or p.check_tensors or not p.use_extra_bufts or p.main_gpu != 0:
        problems.append("struct llama_model_params defaults do not match the declared layout")
    if problems:
        try:
            have = importlib.metadata.version("llama_cpp_python")
        except importlib.metadata.PackageNotFoundError:
            have = "unknown"
        raise Error(
            "the installed ggml does not match the layout diffgemma was written for "
            f"(llama-cpp-python {have} installed, {EXPECTED_LLAMA_CPP_PYTHON} expected): " + "; ".join(problems)
        )


lib = _open()
_check_layout(lib)
NULL = ffi.NULL

_LOG_LOCK = threading.Lock()
_verbose = bool(os.environ.get("DIFFGEMMA_VERBOSE"))


_recent_errors: list[str] = []


@ffi.callback("void(int, const char *, void *)")
def _log_cb(level: int, text: object, _ud: object) -> None:
    # ggml/libllama chatter goes to stderr only when asked for; errors are kept to be put in our exceptions
    msg = ffi.string(text).decode("utf-8", "replace")
    with _LOG_LOCK:
        if level == 4:
            _recent_errors.append(msg.strip())
            del _recent_errors[:-8]
        if _verbose:
            os.write(2, msg.encode())


def take_errors() -> str:
    """The error lines ggml/libllama logged since the last call (to explain a failed call)."""
    with _LOG_LOCK:
        msg = "; ".join(e for e in _recent_errors if e)
        _recent_errors.clear()
    return msg


lib.ggml_log_set(_log_cb, NULL)
lib.llama_log_set(_log_cb, NULL)


def ggml_context(mem_size: int, no_alloc: bool = True) -> object:
    """A new ggml context (caller frees it with lib.ggml_free)."""
    params = ffi.new("struct ggml_init_params *", {"mem_size": mem_size, "mem_buffer": NULL, "no_alloc": no_alloc})
    return lib.ggml_init(params[0])  # params stays alive until the call returns: [0] alone would not own it


class DeviceTensors:
    """Tensors allocated together in one backend buffer (of buffer type `buft`), owned until free().

    specs: (name, ggml type, shape in ggml order) per tensor. clear: fill the buffer with zero bytes."""

    def __init__(self, buft: object, specs: list[tuple[str, int, tuple[int, ...]]], *, what: str,
                 clear: bool = False, weights: bool = False) -> None:
        self.ctx = ggml_context(lib.ggml_tensor_overhead() * (len(specs) + 1))
        self.tensors = []
        for name, ttype, ne in specs:
            t = getattr(lib, f"ggml_new_tensor_{len(ne)}d")(self.ctx, int(ttype), *ne)
            lib.ggml_set_name(t, name.encode())
            self.tensors.append(t)
        self.buf = lib.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx, buft)
        if self.buf == NULL:
            lib.ggml_free(self.ctx)
            self.ctx = None
            raise Error(f"cannot allocate {what} (out of memory?)")
        if weights:  # the scheduler then runs ops reading them on this buffer's device
            lib.ggml_backend_buffer_set_usage(self.buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
        if clear:
            lib.ggml_backend_buffer_clear(self.buf, 0)

    def free(self) -> None:
        if self.ctx is not None:
            lib.ggml_backend_buffer_free(self.buf)
            lib.ggml_free(self.ctx)
            self.ctx = None


def map_weights(ctx: object, infos: list, base: object, mapped_size: int, dev: object, *, oom: str,
                buft: object = None) -> tuple[dict[str, object], object]:
    """Tensors for a file's `infos` (name, type, shape, offset, nbytes) in `ctx`, with their data: uploaded to a
    buffer of device `dev`, or of type `buft` (e.g. the CPU's repack type, which rearranges them on upload), or,
    with both None, pointing into the CPU mapping at `base` (no copy). Returns the tensors by name and the
    weights buffer (the caller frees it)."""
    weights: dict[str, object] = {}
    for info in infos:
        t = lib.ggml_new_tensor_4d(ctx, info.type, *(list(info.shape) + [1] * (4 - len(info.shape))))
        lib.ggml_set_name(t, info.name.encode())
        weights[info.name] = t
    if dev is not None:
        buft = lib.ggml_backend_dev_buffer_type(dev)
    if buft is not None:
        buf = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
        if buf == NULL:
            raise Error(oom)
        for info in infos:
            lib.ggml_backend_tensor_set(weights[info.name], base + info.offset, 0, info.nbytes)
    else:
        buf = lib.ggml_backend_cpu_buffer_from_ptr(base, mapped_size)
        for info in infos:
            if lib.ggml_backend_tensor_alloc(buf, weights[info.name], base + info.offset) != 0:
                lib.ggml_backend_buffer_free(buf)
                raise Error(f"cannot place {info.name} in the mapped file")
    lib.ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
    return weights, buf


def extra_buffer_types(dev: object) -> list[object]:
    """The device's extra weight buffer types (on CPU: CPU_REPACK, AMX, ... as this ggml was built), in ggml's
    order of preference; [] where the device has none."""
    reg = lib.ggml_backend_dev_backend_reg(dev)
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if fn == NULL:
        return []
    arr = ffi.cast("ggml_backend_dev_get_extra_bufts_t", fn)(dev)
    out = []
    while arr != NULL and arr[len(out)] != NULL:
        out.append(arr[len(out)])
    return out


def in_extra_buffer(t: object) -> bool:
    """Whether tensor t lives in one of the CPU's extra (e.g. repacked) weight buffers."""
    return t.buffer != NULL and lib.ggml_backend_buffer_get_type(t.buffer) in _cpu_extra_bufts()


@functools.cache
def _cpu_extra_bufts() -> tuple[object, ...]:
    return tuple(extra_buffer_types(lib.ggml_backend_dev_by_type(DEV_TYPE_CPU)))


def product_supported(dev: object, buft: object, ttype: int, shape: tuple[int, ...]) -> bool:
    """Whether `dev` runs the product of a weight of this type and shape (a 2-D matrix: mul_mat; a 3-D expert
    stack: mul_mat_id, one expert per token) when the weight lives in a buffer of type `buft`. ggml decides by
    the weight's buffer, so the probe weight gets an empty buffer of that type."""
    if len(shape) not in (2, 3):
        return False
    ctx = ggml_context(lib.ggml_tensor_overhead() * 4)
    probe = lib.ggml_backend_buft_alloc_buffer(buft, 0)
    try:
        w = getattr(lib, f"ggml_new_tensor_{len(shape)}d")(ctx, int(ttype), *shape)
        w.buffer = probe
        if len(shape) == 2:
            op = lib.ggml_mul_mat(ctx, w, lib.ggml_new_tensor_2d(ctx, F32, shape[0], 1))
        else:
            x = lib.ggml_new_tensor_3d(ctx, F32, shape[0], 1, 1)
            op = lib.ggml_mul_mat_id(ctx, w, x, lib.ggml_new_tensor_2d(ctx, I32, 1, 1))
        return bool(lib.ggml_backend_dev_supports_op(dev, op))
    finally:
        if probe != NULL:
            lib.ggml_backend_buffer_free(probe)
        lib.ggml_free(ctx)


def set_verbose(on: bool) -> None:
    global _verbose
    _verbose = on


def cstr(p: object) -> str:
    return "" if p == NULL else ffi.string(p).decode("utf-8", "replace")


def type_name(t: int) -> str:
    """ggml's name of a type id ("" for ids ggml does not know: it does not bound-check them itself)."""
    return cstr(lib.ggml_type_name(t)) if 0 <= t < GGML_TYPE_COUNT else ""


def default_threads() -> int:
    """The CPU threads a model computes with by default: one per physical core this process may run on (as
    llama.cpp chooses: a core's second hardware thread adds nothing to matrix math), at least 1."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    return max(1, physical_cores(cpus))


def physical_cores(cpus: set[int], sysfs: pathlib.Path = pathlib.Path("/sys/devices/system/cpu")) -> int:
    """How many physical cores the logical CPUs `cpus` belong to (Linux sysfs topology; elsewhere len(cpus))."""
    cores = set()
    for cpu in cpus:
        try:  # the logical CPUs sharing this one's core, e.g. "0,8" or "0-1": the same text for each of them
            cores.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return len(cores)


def set_n_threads(backend: object, n: int) -> None:
    """Set the thread count of a CPU backend through the portable proc-address route."""
    reg = lib.ggml_backend_dev_backend_reg(lib.ggml_backend_get_device(backend))
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
    if fn != NULL:
        ffi.cast("ggml_backend_set_n_threads_t", fn)(backend, n)


def llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
