"""Device choice and the per-layer placement plan, on made-up device lists (no GPU needed); the RPC relay against
a scripted server that dies."""

import socket
import struct
import threading

import pytest

import diffgemma as dg
from diffgemma import devices, rpc
from diffgemma.devices import Device

GiB = 2**30
CPU = Device("CPU", "host", "cpu", 64 * GiB, 64 * GiB)


def gpu(name, free_gib, kind="gpu", relay=None):
    return Device(name, f"fake {name}", kind, int(free_gib * GiB), int(free_gib * GiB) + GiB, relay=relay)


class FakeRelay:
    endpoint = "10.0.0.2:50052"
    failed = None

    def check(self):
        if self.failed:
            raise dg.Error(f"lost {self.failed}")


SIZES = [GiB] * 10 + [3 * GiB]  # ten layers of 1 GiB, an output layer of 3 GiB


def names(p):
    return [d.name for d in p.layers]


def test_default_offloads_everything_to_the_gpu_and_cpu_only_without_one():
    p = devices.plan(SIZES, [CPU, gpu("CUDA0", 40)])
    assert names(p) == ["CUDA0"] * 11 and p.output.name == "CUDA0" and p.names == ["CUDA0", "CPU"]
    p = devices.plan(SIZES, [CPU])
    assert names(p) == ["CPU"] * 11 and p.devices == [] and p.names == ["CPU"]
    assert names(devices.plan(SIZES, [CPU, gpu("CUDA0", 40)], device="cpu")) == ["CPU"] * 11
    assert names(devices.plan(SIZES, [CPU, gpu("CUDA0", 40)], n_gpu_layers=0)) == ["CPU"] * 11


def test_n_gpu_layers_counts_back_from_the_output_layer():
    p = devices.plan(SIZES, [CPU, gpu("Vulkan0", 40)], n_gpu_layers=3)
    assert names(p) == ["CPU"] * 8 + ["Vulkan0"] * 3
    assert p.describe() == "layers 0-7 CPU, 8-9 Vulkan0, output Vulkan0"
    assert p.of_tensor("blk.8.attn_q.weight").name == "Vulkan0" and p.of_tensor("blk.7.ffn_up.weight").name == "CPU"
    assert p.of_tensor("token_embd.weight").name == "Vulkan0"
    assert names(devices.plan(SIZES, [CPU, gpu("Vulkan0", 40)], n_gpu_layers=99)) == ["Vulkan0"] * 11


def test_split_by_free_memory_and_by_proportion_goes_by_bytes_in_device_order():
    devs = [CPU, gpu("CUDA0", 10), gpu("CUDA1", 30)]
    p = devices.plan(SIZES, devs)  # 13 GiB over shares 1:3 -> CUDA0 takes the first ~3.25 GiB
    assert names(p) == ["CUDA0"] * 3 + ["CUDA1"] * 8 and p.output.name == "CUDA1"
    p = devices.plan(SIZES, devs, tensor_split=[1, 1])
    assert names(p) == ["CUDA0"] * 6 + ["CUDA1"] * 5
    p = devices.plan(SIZES, devs, tensor_split="0,1")
    assert names(p) == ["CUDA1"] * 11 and [d.name for d in p.devices] == ["CUDA1"]
    p = devices.plan(SIZES, devs, device=["CUDA1", "CUDA0"], tensor_split=[1, 1])
    assert names(p) == ["CUDA1"] * 6 + ["CUDA0"] * 5 and p.output.name == "CUDA0"


def test_remote_devices_come_first_by_default_so_sampling_stays_local():
    relay = FakeRelay()
    devs = [CPU, gpu("Vulkan0", 20), gpu("RPC0", 20, relay=relay)]
    p = devices.plan(SIZES, devs, tensor_split=[1, 1])
    assert names(p)[0] == "RPC0" and p.output.name == "Vulkan0"
    p.check()
    relay.failed = "connection reset"
    with pytest.raises(dg.Error, match="connection reset"):
        p.check()


def test_integrated_gpus_are_used_only_without_a_dedicated_one():
    assert devices.plan(SIZES, [CPU, gpu("Vulkan0", 20, "igpu"), gpu("CUDA0", 20)]).names == ["CUDA0", "CPU"]
    assert devices.plan(SIZES, [CPU, gpu("Vulkan0", 20, "igpu")]).names == ["Vulkan0", "CPU"]


@pytest.mark.parametrize("device, match", [
    ("Vulkan1", r"no device 'Vulkan1': this installation has CPU, Vulkan0$"),
    ("CUDA0", r"no CUDA backend: rebuild .*CMAKE_ARGS=\"-DGGML_CUDA=on\""),
    (["Vulkan0", "cpu"], "cannot be part of a device list"),
    ("Vulkan0,vulkan0", "listed twice"),
    ("", "at least one device"),
    (3, "device must be"),
])
def test_bad_device_choices_are_errors_naming_what_exists(device, match):
    with pytest.raises(dg.Error, match=match):
        devices.plan(SIZES, [CPU, gpu("Vulkan0", 20)], device=device)


@pytest.mark.parametrize("split, match", [
    ([1], "1 numbers for 2 device"), ([1, -1], "non-negative"), ([0, 0], "not all zero"),
    ("a,b", "must be numbers"), ([float("nan"), 1], "non-negative"),
])
def test_bad_tensor_splits_are_errors(split, match):
    with pytest.raises(dg.Error, match=match):
        devices.plan(SIZES, [CPU, gpu("CUDA0", 20), gpu("CUDA1", 20)], tensor_split=split)


def test_a_split_that_does_not_fit_names_the_devices_and_the_bytes():
    with pytest.raises(dg.Error) as e:
        devices.plan(SIZES, [CPU, gpu("CUDA0", 4), gpu("CUDA1", 4)])
    msg = str(e.value)
    assert "CUDA0" in msg and "CUDA1" in msg and f"{4 * GiB:,} free" in msg and "n_gpu_layers" in msg
    p = devices.plan(SIZES, [CPU, gpu("CUDA0", 4), gpu("CUDA1", 4)], n_gpu_layers=6)
    assert names(p) == ["CPU"] * 5 + ["CUDA0"] * 4 + ["CUDA1"] * 2  # 4 + 4 GiB: by bytes, not by count


@pytest.mark.parametrize("bad", ["localhost", "host:0", "host:x", ":50052", 5, "h:70000"])
def test_bad_rpc_endpoints(bad):
    with pytest.raises(dg.Error, match="host:port"):
        devices.parse_rpc([bad] if isinstance(bad, str) else bad)


def test_rpc_endpoint_lists():
    assert devices.parse_rpc("a:1, b:2") == ["a:1", "b:2"] and devices.parse_rpc(None) == []
    assert rpc.parse_endpoint("[::1]:50052") == ("::1", 50052)
    with pytest.raises(dg.Error, match="twice"):
        devices.parse_rpc(["a:1", "a:1"])


def test_rpc_to_a_closed_port_is_an_error_not_an_abort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(dg.Error, match=f"cannot reach the RPC server at 127.0.0.1:{port}"):
        rpc.probe(f"127.0.0.1:{port}", timeout=2)


def _recv(sock, n):
    return rpc._recv_exact(sock, n)


def test_the_relay_answers_for_a_server_that_dies_mid_request():
    """A scripted server answers HELLO and one GET_TENSOR, then dies while a graph runs: the client (playing ggml)
    still gets well-formed replies of the sizes it asked for, and the relay reports the loss."""
    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = f"127.0.0.1:{listener.getsockname()[1]}"

    def server():
        conn, _ = listener.accept()
        cmd, size = struct.unpack("<BQ", _recv(conn, 9))
        assert cmd == rpc.HELLO and _recv(conn, size) == bytes(rpc.CONN_CAPS_SIZE)
        conn.sendall(struct.pack("<Q", 28) + bytes([7, 0, 0, 0]) + bytes(range(24)))
        cmd, size = struct.unpack("<BQ", _recv(conn, 9))
        req = _recv(conn, size)
        n = struct.unpack("<Q", req[-8:])[0]
        conn.sendall(struct.pack("<Q", n) + b"\x07" * n)
        cmd, size = struct.unpack("<BQ", _recv(conn, 9))  # a graph: read it and die
        _recv(conn, size)
        conn.close()
        listener.close()

    t = threading.Thread(target=server, daemon=True)
    t.start()
    relay = rpc.Relay(endpoint)
    host, port = rpc.parse_endpoint(relay.address)
    ggml = socket.create_connection((host, port), timeout=10)
    ggml.sendall(struct.pack("<BQ", rpc.HELLO, 24) + b"\x01" * 24)  # caps offered by the client are dropped
    assert _recv(ggml, 8 + 28)[8:] == bytes([7, 0, 0, 0]) + bytes(24)  # and the server's too

    def get_tensor(n):
        ggml.sendall(struct.pack("<BQ", rpc.GET_TENSOR, 16 + 8) + bytes(8) + bytes(8) + struct.pack("<Q", n))
        (size,) = struct.unpack("<Q", _recv(ggml, 8))
        return _recv(ggml, size)

    assert get_tensor(5) == b"\x07" * 5 and relay.failed is None
    ggml.sendall(struct.pack("<BQ", 10, 3) + b"abc")  # GRAPH_COMPUTE: no reply
    t.join(10)
    assert get_tensor(6) == bytes(6)  # the stand-in
    ggml.sendall(struct.pack("<BQ", 3, 8) + bytes(8))  # BUFFER_GET_BASE: never NULL
    assert struct.unpack("<QQ", _recv(ggml, 16)) == (8, 4096)
    assert relay.failed is not None and relay.stats["round_trips"] == 4
    with pytest.raises(dg.Error, match=f"RPC server at {endpoint} was lost"):
        relay.check()
    ggml.close()
    relay.close()
