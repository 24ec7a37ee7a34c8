import pathlib

import pytest

from diffgemma import testing


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_f32(tiny_dir) -> pathlib.Path:
    """A tiny random-weight diffusion-gemma file (6 layers, 5 sliding : 1 global), F32 matrices."""
    return testing.write_model(tiny_dir / "tiny-f32.gguf", testing.tiny_hparams(), wtype="f32")


@pytest.fixture(scope="session")
def random_tiny(tiny_dir) -> pathlib.Path:
    """The well-conditioned random-weight model (canvas 16, Gemma chat template) the plumbing tests run on:
    much faster than the trained embedded model ("tiny")."""
    return testing.write_random_tiny(tiny_dir / "tiny.gguf")


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """The length of every Model.encode call made while the test runs (the prompt-KV store's encoder passes)."""
    from diffgemma import model as model_mod

    calls: list[int] = []
    real = model_mod.Model.encode

    def spy(self, ids, *args, **kw):
        calls.append(len(ids))
        return real(self, ids, *args, **kw)

    monkeypatch.setattr(model_mod.Model, "encode", spy)
    return calls


@pytest.fixture(scope="module")
def model(random_tiny):
    """The random tiny model, loaded once per test module; one thread: no ggml barrier stalls on a busy machine."""
    import diffgemma

    with diffgemma.load(random_tiny, threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def server(request, model):
    """`diffgemma serve` on `model`, on a free localhost port, for one test module (queue size: the module's
    QUEUE, else 4)."""
    srv = pytest.importorskip("diffgemma.server")
    s = srv.Server(model, port=0, queue_size=getattr(request.module, "QUEUE", 4), log_level="warning").start()
    yield s
    s.stop()
