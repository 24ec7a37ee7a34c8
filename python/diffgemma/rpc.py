"""ggml's RPC backend: serving a local device, and reaching remote ones without letting a dying server kill us.

ggml's RPC client aborts the whole process when its server stops answering (a failed socket read is a
GGML_ABORT in the client's dispatcher thread). So diffgemma never points ggml at a remote server directly: each
remote endpoint gets a `Relay`, a thread on 127.0.0.1 that forwards ggml's messages to the server and back. When
the server goes away the relay answers in its place, with well-formed empty replies, and remembers the failure;
the engine then turns the failure into a `diffgemma.Error` for the request (`Relay.check`). The relay also counts
the bytes and round trips of each message (what RPC costs per step).

Protocol facts (ggml-rpc.h / ggml-rpc.cpp of the pinned ggml, protocol 7.0.0): a request is
`| command: u8 | size: u64 | payload |`, a reply `| size: u64 | payload |`; some commands have no reply.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
from typing import Any

from . import binding as B
from .errors import Error

PROTO_MAJOR, PROTO_MINOR, PROTO_PATCH = 7, 0, 0
CONN_CAPS_SIZE = 24  # transport capabilities in HELLO (RDMA upgrade); the relay always offers none
DEFAULT_PORT = 50052
CONNECT_TIMEOUT_S = 10.0
CHUNK = 1 << 22  # bytes forwarded per socket call

# Command ids (enum rpc_cmd) and the size of their reply; None: no reply; -1: as many bytes as asked for.
HELLO, DEVICE_COUNT, GET_TENSOR = 14, 15, 8
_REPLY: dict[int, int | None] = {
    0: 16,     # ALLOC_BUFFER -> remote_ptr, remote_size
    1: 8,      # GET_ALIGNMENT
    2: 8,      # GET_MAX_SIZE
    3: 8,      # BUFFER_GET_BASE
    4: None,   # FREE_BUFFER
    5: None,   # BUFFER_CLEAR
    6: None,   # SET_TENSOR
    7: 1,      # SET_TENSOR_HASH -> result
    8: -1,     # GET_TENSOR -> the bytes asked for (the request's last u64)
    9: 1,      # COPY_TENSOR -> result
    10: None,  # GRAPH_COMPUTE
    11: 16,    # GET_DEVICE_MEMORY -> free, total
    12: None,  # INIT_TENSOR
    13: 8,     # GET_ALLOC_SIZE
    14: 4 + CONN_CAPS_SIZE,  # HELLO -> major, minor, patch, padding, caps
    15: 4,     # DEVICE_COUNT
    16: None,  # GRAPH_RECOMPUTE
    17: None,  # MEMSET_TENSOR
}
# What the relay answers for a dead server: values the client takes without aborting, and that make any
# further allocation fail cleanly (a zero remote pointer is "out of memory" to ggml).
_STANDIN = {
    1: struct.pack("<Q", 32),          # an alignment ggml accepts
    2: struct.pack("<Q", 1 << 62),     # max buffer size
    3: struct.pack("<Q", 4096),        # a non-NULL base (ggml asserts on NULL)
    14: bytes([PROTO_MAJOR, PROTO_MINOR, PROTO_PATCH, 0]) + bytes(CONN_CAPS_SIZE),
}


def parse_endpoint(endpoint: Any) -> tuple[str, int]:
    """("host", port) of a "host:port" string (IPv6 hosts in brackets: "[::1]:50052")."""
    if not isinstance(endpoint, str) or ":" not in endpoint:
        raise Error(f"an RPC endpoint is 'host:port', got {endpoint!r}")
    host, _, port = endpoint.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Error(f"an RPC endpoint is 'host:port' with a port in 1..65535, got {endpoint!r}")
    return host, int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed")
        got += k
    return bytes(buf)


def _keepalive(sock: socket.socket) -> None:
    """Notice a vanished host in ~25 s even while waiting for a long graph (no reply is due then)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connect(endpoint: str, timeout: float) -> socket.socket:
    host, port = parse_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise Error(f"cannot reach the RPC server at {endpoint}: {e.strerror or e} (start it there with "
                    f"`diffgemma rpc-server --host HOST --port {port}`)") from e
    _keepalive(sock)
    return sock


def _hello(sock: socket.socket, endpoint: str) -> tuple[int, int, int]:
    """Send HELLO (offering no transport upgrade) and return the server's protocol version."""
    sock.sendall(struct.pack("<BQ", HELLO, CONN_CAPS_SIZE) + bytes(CONN_CAPS_SIZE))
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != _REPLY[HELLO]:
        raise Error(f"{endpoint} did not answer as a ggml RPC server (HELLO reply of {size} bytes)")
    major, minor, patch = _recv_exact(sock, size)[:3]
    return major, minor, patch


def probe(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> tuple[int, int, int]:
    """Check that `endpoint` is a ggml RPC server this build can talk to; its protocol version. An Error if it
    is unreachable, silent (ggml's server serves one client at a time) or speaks another protocol."""
    sock = _connect(endpoint, timeout)
    try:
        version = _hello(sock, endpoint)
    except (OSError, ConnectionError) as e:
        raise Error(f"the RPC server at {endpoint} did not answer within {timeout:.0f} s ({e}); ggml's rpc-server "
                    "serves one client at a time: is another process connected to it?") from e
    finally:
        sock.close()
    if version[0] != PROTO_MAJOR or version[1] > PROTO_MINOR:
        raise Error(f"the RPC server at {endpoint} speaks protocol {'.'.join(map(str, version))}, this build "
                    f"{PROTO_MAJOR}.{PROTO_MINOR}.{PROTO_PATCH}: run the same llama-cpp-python version on both sides")
    return version


class Relay:
    """A local stand-in for one remote RPC server: ggml connects to `address` (127.0.0.1), the relay forwards.

    `failed` holds why the server was lost (None while it answers); `stats` counts what crossed."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.failed: str | None = None
        self.stats = {"messages": 0, "round_trips": 0, "bytes_sent": 0, "bytes_received": 0}
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name=f"diffgemma-rpc-relay {endpoint}", daemon=True).start()

    def check(self) -> None:
        """Raise an Error if the server was lost (the model using it must be loaded again)."""
        if self.failed is not None:
            raise Error(f"the RPC server at {self.endpoint} was lost ({self.failed}); this model's layers there "
                        "are gone: restart the server and load the model again")

    def _fail(self, why: str) -> None:
        with self._lock:
            if self.failed is None:
                self.failed = why

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(client,), daemon=True,
                             name=f"diffgemma-rpc-relay {self.endpoint}").start()

    def _serve(self, client: socket.socket) -> None:
        """Forward one ggml connection's messages in order (ggml waits for each reply before the next request)."""
        server = None
        if self.failed is None:
            try:
                server = _connect(self.endpoint, CONNECT_TIMEOUT_S)
                server.settimeout(None)
            except Error as e:
                self._fail(str(e))
        try:
            while True:
                try:
                    head = _recv_exact(client, 9)
                except (OSError, ConnectionError):
                    return  # ggml closed its connection
                cmd, size = struct.unpack("<BQ", head)
                reply = _REPLY.get(cmd)
                if cmd not in _REPLY:  # not a command of this protocol: nothing sane to forward
                    self._fail(f"ggml sent unknown RPC command {cmd}")
                    return
                tail = b""
                if cmd in (HELLO, GET_TENSOR):  # small requests whose payload the relay needs
                    payload = _recv_exact(client, size)
                    if cmd == HELLO:
                        payload = bytes(len(payload))  # offer no transport upgrade: traffic stays on this socket
                    else:
                        (reply,) = struct.unpack("<Q", payload[-8:])
                    tail = payload
                try:
                    server = self._forward(server, client, head, tail, size - len(tail))
                    if reply is not None:
                        server = self._answer(server, client, cmd, reply)
                except (OSError, ConnectionError):
                    return  # ggml went away mid-message (its process is ending): nothing left to answer
        finally:
            client.close()
            if server is not None:
                server.close()

    def _forward(self, server: socket.socket | None, client: socket.socket, head: bytes, tail: bytes,
                 rest: int) -> socket.socket | None:
        """Send a request (head, the payload already read, then `rest` more bytes read from the client) on."""
        with self._lock:
            self.stats["messages"] += 1
            self.stats["bytes_sent"] += len(head) + len(tail) + rest
        if server is not None:
            try:
                server.sendall(head + tail)
            except OSError as e:
                self._fail(f"sending failed: {e}")
                server = None
        while rest:  # stream large payloads (weights) through without holding them
            chunk = client.recv(min(CHUNK, rest))
            if not chunk:
                raise ConnectionError("ggml closed its connection mid-request")
            rest -= len(chunk)
            if server is not None:
                try:
                    server.sendall(chunk)
                except OSError as e:
                    self._fail(f"sending failed: {e}")
                    server = None
        return server

    def _answer(self, server: socket.socket | None, client: socket.socket, cmd: int,
                size: int) -> socket.socket | None:
        """Pass the server's reply to the client, or a stand-in of the expected size once it is gone."""
        with self._lock:
            self.stats["round_trips"] += 1
        if server is not None:
            rest = None  # bytes of the reply still owed to the client once its header went
            try:
                (got,) = struct.unpack("<Q", _recv_exact(server, 8))
                if got != size:
                    raise ConnectionError(f"reply of {got} bytes to command {cmd}, {size} expected")
                if cmd == HELLO:  # the server's transport upgrade is refused too: both ends stay on TCP
                    reply = _recv_exact(server, got)
                    client.sendall(struct.pack("<Q", got) + reply[:4] + bytes(got - 4))
                    return server
                client.sendall(struct.pack("<Q", got))
                rest = got
                while rest:
                    chunk = server.recv(min(CHUNK, rest))
                    if not chunk:
                        raise ConnectionError("connection closed mid-reply")
                    client.sendall(chunk)
                    rest -= len(chunk)
                with self._lock:
                    self.stats["bytes_received"] += 8 + got
                return server
            except (OSError, ConnectionError) as e:
                self._fail(str(e) or type(e).__name__)
                server.close()
                if rest is not None:  # finish the reply the client is reading with zeros
                    client.sendall(bytes(rest))
                    return None
        standin = _STANDIN.get(cmd, b"")
        client.sendall(struct.pack("<Q", size) + standin.ljust(size, b"\0")[:size])
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()


_relays: dict[str, Relay] = {}
_relays_lock = threading.Lock()


def _rpc_reg_proc(name: str, ctype: str) -> Any:
    """A function of ggml's RPC backend, looked up through its registry entry; an Error in builds without it."""
    reg = B.lib.ggml_backend_reg_by_name(b"RPC")
    fn = B.NULL if reg == B.NULL else B.lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if fn == B.NULL:
        raise Error("this build of ggml has no RPC backend; rebuild llama-cpp-python with it: "
                    'CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir '
                    f"llama-cpp-python=={B.EXPECTED_LLAMA_CPP_PYTHON}")
    return B.ffi.cast(ctype, fn)


def connect(endpoint: str) -> tuple[Relay, list[Any]]:
    """The relay for a remote RPC server (one per endpoint and process, replaced once lost) and the ggml devices
    the server offers, as `ggml_backend_dev_t` handles."""
    add_server = _rpc_reg_proc("ggml_backend_rpc_add_server", "ggml_backend_rpc_add_server_t")
    parse_endpoint(endpoint)
    with _relays_lock:
        relay = _relays.get(endpoint)
        if relay is None or relay.failed is not None:
            probe(endpoint)  # only with no live connection: the server serves one client at a time
            relay = _relays[endpoint] = Relay(endpoint)
    reg = add_server(relay.address.encode())
    relay.check()
    if reg == B.NULL:
        raise Error(f"the RPC server at {endpoint} offers no device")
    return relay, [B.lib.ggml_backend_reg_dev_get(reg, i) for i in range(B.lib.ggml_backend_reg_dev_count(reg))]


def serve(devices: list[Any], host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int = 1,
          cache_dir: str | None = None) -> None:
    """Serve ggml devices (handles) to RPC clients on host:port with ggml's own server, until interrupted.

    The protocol has no authentication or encryption: anyone who can reach the port can run graphs and read the
    served device's memory. Bind to localhost (the default) or a trusted network only."""
    start = _rpc_reg_proc("ggml_backend_rpc_start_server", "ggml_backend_rpc_start_server_t")
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    parse_endpoint(endpoint)
    print(f"warning: ggml's RPC protocol has no authentication or encryption: whoever can connect to {endpoint} can "
          "run graphs on the served device and read its memory" + (
              "" if host in ("127.0.0.1", "localhost", "::1") else "; serve on a trusted network only"),
          file=sys.stderr)
    try:  # a clear error for a busy port or an unknown address (ggml's own message is a bare "failed")
        socket.create_server((host, port)).close()
    except OSError as e:
        raise Error(f"cannot serve on {endpoint}: {e.strerror or e}") from e
    arr = B.ffi.new("ggml_backend_dev_t[]", devices)
    c_endpoint = B.ffi.new("char[]", endpoint.encode())
    c_cache = B.ffi.new("char[]", cache_dir.encode()) if cache_dir else B.NULL
    # ggml's loop blocks in accept(): run it beside the main thread so Ctrl-C still ends the process
    done = threading.Event()

    def run() -> None:
        try:
            start(c_endpoint, c_cache, threads, len(devices), arr)
        finally:
            done.set()

    threading.Thread(target=run, name="diffgemma-rpc-server", daemon=True).start()
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        print("diffgemma rpc-server: stopped", file=sys.stderr)
        return
    raise Error(f"ggml's RPC server stopped (could it bind {endpoint}? see the messages above)")
