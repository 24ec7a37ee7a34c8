"""Which ggml devices a model runs on: listing them (local and over RPC), reading the user's choice (device=,
n_gpu_layers, tensor_split, rpc=) and the per-layer placement the engine follows.

A model has n_layer transformer layers plus one "output layer" (the tied embedding / LM head, the final norm, the
self-conditioning MLP and its transposed embedding), counted as layer n_layer as llama.cpp counts its output.
Layers not offloaded run on the CPU (the first ones); the offloaded ones are split over the chosen devices in
order, so the output layer, and with it sampling, lands on the last device. Each layer's prompt-KV store lives
on that layer's device; the scheduler gets a backend for every device in use, CPU last.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from . import binding as B
from . import layout, rpc
from .errors import Error

# CMake flag that compiles each ggml backend into llama-cpp-python, by the prefix of its device names.
BUILD_FLAGS = {"CUDA": "-DGGML_CUDA=on", "Vulkan": "-DGGML_VULKAN=on", "RPC": "-DGGML_RPC=on",
               "Metal": "-DGGML_METAL=on", "ROCm": "-DGGML_HIP=on", "SYCL": "-DGGML_SYCL=on",
               "MUSA": "-DGGML_MUSA=on", "OpenCL": "-DGGML_OPENCL=on", "CANN": "-DGGML_CANN=on"}
_TYPES = {B.DEV_TYPE_CPU: "cpu", B.DEV_TYPE_GPU: "gpu", B.DEV_TYPE_IGPU: "igpu", B.DEV_TYPE_ACCEL: "accel"}


@dataclasses.dataclass(frozen=True)
class Device:
    """One ggml device: name ("CPU", "Vulkan0", "CUDA1", "RPC0"), what it is, and its memory when listed."""

    name: str
    description: str
    type: str  # "cpu", "gpu", "igpu" or "accel"
    memory_free: int
    memory_total: int
    handle: Any = dataclasses.field(default=None, repr=False, compare=False)  # ggml_backend_dev_t
    relay: Any = dataclasses.field(default=None, repr=False, compare=False)  # rpc.Relay of a remote device

    @property
    def is_cpu(self) -> bool:
        return self.type == "cpu"

    @property
    def remote(self) -> str | None:
        """host:port of the RPC server holding the device, None for a local one."""
        return None if self.relay is None else self.relay.endpoint

    def free_now(self) -> int:
        """Bytes free on the device now (as listed when there is no handle to ask)."""
        if self.handle is None:
            return self.memory_free
        free, total = B.ffi.new("size_t *"), B.ffi.new("size_t *")
        B.lib.ggml_backend_dev_memory(self.handle, free, total)
        return int(free[0])


def _device(handle: Any, name: str | None = None, relay: Any = None) -> Device:
    free, total = B.ffi.new("size_t *"), B.ffi.new("size_t *")
    B.lib.ggml_backend_dev_memory(handle, free, total)
    # ggml describes an RPC device by the address it connected to: that is the relay's, so name the server
    desc = f"RPC server {relay.endpoint}" if relay is not None else B.cstr(B.lib.ggml_backend_dev_description(handle))
    return Device(name or B.cstr(B.lib.ggml_backend_dev_name(handle)), desc,
                  _TYPES.get(B.lib.ggml_backend_dev_type(handle), "other"), int(free[0]), int(total[0]),
                  handle, relay)


def local() -> list[Device]:
    """The devices of this build on this machine, in ggml's order (CPU included)."""
    return [_device(B.lib.ggml_backend_dev_get(i)) for i in range(B.lib.ggml_backend_dev_count())]


def parse_rpc(servers: Any) -> list[str]:
    """RPC servers as a list of "host:port": None, "h1:p1,h2:p2" or a list of endpoints."""
    if servers is None:
        return []
    items = servers.split(",") if isinstance(servers, str) else servers
    if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
        raise Error(f"rpc must be 'host:port', a comma-separated list of them or a list of str, got {servers!r}")
    items = [s.strip() for s in items if s.strip()]
    for s in items:
        rpc.parse_endpoint(s)
    if len(set(items)) < len(items):
        raise Error(f"an RPC server is listed twice: {items}")
    return items


def remote(servers: Any) -> list[Device]:
    """The devices the RPC servers offer, named RPC0, RPC1, ... in the order given (as llama.cpp names them)."""
    out: list[Device] = []
    for endpoint in parse_rpc(servers):
        relay, handles = rpc.connect(endpoint)
        out += [_device(h, f"RPC{len(out)}", relay) for h in handles]
    return out


def rebuild_hint(name: str) -> str:
    """How to get a build with the backend of device `name` (an empty string for unknown backends)."""
    prefix = name.rstrip("0123456789")
    flag = next((f for p, f in BUILD_FLAGS.items() if p.lower() == prefix.lower()), None)
    if flag is None:
        return ""
    return (f'rebuild llama-cpp-python with that backend: CMAKE_ARGS="{flag}" pip install --force-reinstall '
            f"--no-cache-dir llama-cpp-python=={B.EXPECTED_LLAMA_CPP_PYTHON}")


def parse_device(device: Any) -> list[str] | None:
    """The user's device choice as a list of names: None (the default: every GPU), [] (CPU only: "cpu" or
    "none"), or the names of a str ("Vulkan0", "CUDA0,CUDA1") or a list of str."""
    if device is None:
        return None
    items = device.split(",") if isinstance(device, str) else device
    if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
        raise Error(f"device must be a device name, a comma-separated list, a list of names or 'cpu', got {device!r}")
    names = [s.strip() for s in items if s.strip()]
    if not names:
        raise Error(f"device must name at least one device, got {device!r}")
    if [n.lower() for n in names] in (["cpu"], ["none"]):
        return []
    if any(n.lower() in ("cpu", "none") for n in names):
        raise Error(f"'cpu' cannot be part of a device list ({names}): the layers that are not offloaded "
                    "(n_gpu_layers) run on the CPU")
    if len({n.lower() for n in names}) < len(names):
        raise Error(f"a device is listed twice: {names}")
    return names


def choose(names: list[str] | None, available: Sequence[Device]) -> list[Device]:
    """The non-CPU devices to put layers on, in layer order. Default: every dedicated GPU (integrated ones if
    there is none), remote ones first so that the output layer and sampling stay on this machine."""
    if names is None:
        gpus = [d for d in available if d.type == "gpu"] or [d for d in available if d.type == "igpu"]
        return sorted(gpus, key=lambda d: d.relay is None)  # stable: remote first, then local, each in order
    by_name = {d.name.lower(): d for d in available}
    out = []
    for n in names:
        d = by_name.get(n.lower())
        if d is None:
            have = ", ".join(d.name for d in available)
            hint = rebuild_hint(n)
            known = any(d.name.rstrip("0123456789").lower() == n.rstrip("0123456789").lower() for d in available)
            raise Error(f"no device {n!r}: this installation has {have}" + (
                "" if known or not hint else f"; this build has no {n.rstrip('0123456789')} backend: {hint}"))
        if d.is_cpu:
            raise Error(f"'{d.name}' cannot be part of a device list: layers that are not offloaded run on the CPU")
        out.append(d)
    return out


def parse_split(tensor_split: Any, n_devices: int) -> list[float] | None:
    """tensor_split as one non-negative weight per device (None: split by free memory)."""
    if tensor_split is None:
        return None
    items = tensor_split.split(",") if isinstance(tensor_split, str) else tensor_split
    try:
        weights = [float(x) for x in items]
    except (TypeError, ValueError) as e:
        raise Error(f"tensor_split must be numbers, one per device, got {tensor_split!r}") from e
    if len(weights) != n_devices:
        raise Error(f"tensor_split has {len(weights)} numbers for {n_devices} device(s)")
    if any(not w >= 0 or w == float("inf") for w in weights) or sum(weights) <= 0:
        raise Error(f"tensor_split must be finite, non-negative and not all zero, got {tensor_split!r}")
    return weights


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where each layer lives: `layers[il]` is the device of layer il, `layers[-1]` that of the output layer."""

    cpu: Device
    layers: tuple[Device, ...]

    @functools.cached_property  # read on every call and step (check): derived once
    def devices(self) -> list[Device]:
        """The non-CPU devices holding layers, in layer order."""
        out: list[Device] = []
        for d in self.layers:
            if not d.is_cpu and d not in out:
                out.append(d)
        return out

    @property
    def output(self) -> Device:
        """The device of the output layer (LM head, self-conditioning, sampling)."""
        return self.layers[-1]

    @property
    def names(self) -> list[str]:
        """Names of the devices in use, CPU last (the CPU always runs the host side of the graphs)."""
        return [d.name for d in self.devices] + [self.cpu.name]

    def of_layer(self, il: int) -> Device:
        return self.layers[il]

    def of_tensor(self, name: str) -> Device:
        """The device of a model tensor by its GGUF name (blk.N.* in layer N, the rest in the output layer)."""
        il = layout.layer_of(name)
        return self.layers[-1 if il is None else il]

    def check(self) -> None:
        """Raise an Error if a remote device's server was lost."""
        for d in self.devices:
            if d.relay is not None:
                d.relay.check()

    def describe(self) -> str:
        """E.g. "layers 0-9 CPU, 10-29 Vulkan0, output Vulkan0"."""
        runs: list[list[Any]] = []
        for il, d in enumerate(self.layers[:-1]):
            if runs and runs[-1][2] is d:
                runs[-1][1] = il
            else:
                runs.append([il, il, d])
        parts = [f"{a}-{b} {d.name}" if a != b else f"{a} {d.name}" for a, b, d in runs]
        return f"layers {', '.join(parts)}, output {self.output.name}"


def plan(layer_bytes: Sequence[int], available: Sequence[Device], *, device: Any = None, n_gpu_layers: int = -1,
         tensor_split: Any = None) -> Placement:
    """The placement of the n_layer + 1 layers whose weights take `layer_bytes` (the output layer last).

    n_gpu_layers: how many layers, counted from the output layer back, go to the chosen devices (-1: all).
    tensor_split: one weight per chosen device; None splits in proportion to free memory. Layers go to devices
    in order and by bytes: device k takes the layers whose middle byte falls in its share. An unknown device,
    or a device whose layers do not fit in its free memory, is an Error naming the devices and the bytes."""
    if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int):
        raise Error(f"n_gpu_layers must be an int, got {n_gpu_layers!r}")
    cpu = next((d for d in available if d.is_cpu), None)
    if cpu is None:
        raise Error("ggml lists no CPU device (a broken llama-cpp-python install?)")
    n = len(layer_bytes)
    chosen = choose(parse_device(device), available)
    weights = parse_split(tensor_split, len(chosen)) if chosen else None
    k = 0 if not chosen or n_gpu_layers == 0 else n if n_gpu_layers < 0 else min(n_gpu_layers, n)
    layers = [cpu] * n
    if k:
        if weights is None:
            weights = [float(max(d.memory_free, 0)) for d in chosen]
            if sum(weights) <= 0:  # no device says how much it has: equal shares
                weights = [1.0] * len(chosen)
        offloaded = list(range(n - k, n))
        total = sum(max(layer_bytes[il], 1) for il in offloaded)
        bounds, acc = [], 0.0
        for w in weights:
            acc += w / sum(weights)
            bounds.append(acc * total)
        done = 0
        for il in offloaded:
            size = max(layer_bytes[il], 1)
            middle = done + size / 2
            done += size
            layers[il] = chosen[next((j for j, b in enumerate(bounds) if middle < b), len(chosen) - 1)]
    placement = Placement(cpu, tuple(layers))
    _check_fit(placement, layer_bytes)
    return placement


def _check_fit(placement: Placement, layer_bytes: Sequence[int]) -> None:
    need = {d.name: sum(b for b, ld in zip(layer_bytes, placement.layers, strict=True) if ld is d)
            for d in placement.devices}
    short = [d for d in placement.devices if d.memory_total and need[d.name] > d.memory_free]
    if short:
        table = "; ".join(f"{d.name}: {need[d.name]:,} bytes of weights, {d.memory_free:,} free"
                          for d in placement.devices)
        raise Error(f"the layers placed on {', '.join(d.name for d in short)} do not fit ({table}); offload fewer "
                    "layers (n_gpu_layers), move them with tensor_split, or add a device")


def layer_bytes(hp: layout.HParams, tensors: Any, extra_output: int = 0) -> list[int]:
    """Weight bytes of each layer and of the output layer (last) of a file's tensors (name -> info with .nbytes);
    extra_output: bytes the engine adds on the output layer's device (the transposed embedding)."""
    out = [0] * (hp.n_layer + 1)
    for info in tensors.values():
        il = layout.layer_of(info.name)
        out[hp.n_layer if il is None else il] += info.nbytes
    out[-1] += extra_output
    return out


def backends_text(devices: Sequence[Device]) -> list[str]:
    """One line per device: name, type, memory and description (for `diffgemma info --devices`)."""
    lines = []
    for d in devices:
        mem = f"{d.memory_free / 2**30:.1f}/{d.memory_total / 2**30:.1f} GiB free" if d.memory_total else ""
        lines.append(f"{d.name:10s} {d.type:6s} {mem:22s} {d.description}")
    return lines


def serve_rpc(host: str = "127.0.0.1", port: int = rpc.DEFAULT_PORT, threads: int | None = None,
              device: Any = None, cache_dir: str | None = None) -> None:
    """Serve local devices to other machines' models through ggml's RPC server (`diffgemma rpc-server`), until
    interrupted. device: a name or list of names (default: the first GPU, else the CPU). threads: CPU threads
    of the served CPU backend (default: one per physical core). The protocol has no authentication: keep the default
    host 127.0.0.1 or use a trusted network."""

    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise Error(f"port must be in 1..65535, got {port!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise Error(f"threads must be an int >= 1, got {threads!r}")
    have = local()
    names = parse_device(device)
    if names is None:
        served = ([d for d in have if d.type == "gpu"] or [d for d in have if d.type == "igpu"] or
                  [d for d in have if d.is_cpu])[:1]
    elif not names:
        served = [d for d in have if d.is_cpu]
    else:
        served = choose(names, [d for d in have if not d.is_cpu])
    rpc.serve([d.handle for d in served], host, port, threads or B.default_threads(), cache_dir)
