"""Hugging Face downloads (diffgemma.hub) against a cache built in huggingface_hub's own layout, offline: no test
touches the network."""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import huggingface_hub
import pytest
from huggingface_hub import constants

import diffgemma as dg
from diffgemma import hub, testing

REPO = "someone/diffusiongemma-tiny-GGUF"
REV = "0123456789abcdef0123456789abcdef01234567"
QUANTS = ("BF16", "Q4_K_M", "Q8_0")


def add_to_cache(cache: pathlib.Path, repo: str, files: dict[str, pathlib.Path], rev: str = REV) -> pathlib.Path:
    """Files put where huggingface_hub keeps them: models--OWNER--NAME/{refs/main, blobs/SHA256,
    snapshots/REV/PATH -> ../../blobs/SHA256}. Returns the snapshot folder."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / rev
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    (folder / "blobs").mkdir(exist_ok=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("hubfiles")
    model = testing.write_random_tiny(d / "tiny.gguf")
    mmproj = testing.write_random_mmproj(d / "mmproj.gguf", n_proj=testing.tiny_hparams().n_embd)
    return {"model": model, "mmproj": mmproj}


@pytest.fixture
def cache(tmp_path, monkeypatch, files) -> pathlib.Path:
    """An offline Hugging Face cache holding REPO: the tiny model under three quant names and two mmprojs."""
    root = tmp_path / "hub"
    layout = {f"diffusiongemma-tiny-{q}.gguf": files["model"] for q in QUANTS}
    layout.update({"mmproj-F32.gguf": files["mmproj"], "mmproj-F16.gguf": files["mmproj"]})
    add_to_cache(root, REPO, layout)
    # huggingface_hub reads both variables when it is imported (maybe before this test): set both places
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return root


def no_network(*args):
    raise AssertionError("a test tried to reach the network")


def test_quant_picks_its_file_and_the_mmproj(cache):
    model, mmproj = hub.resolve_hf(f"{REPO}:Q8_0")
    assert model.name == "diffusiongemma-tiny-Q8_0.gguf" and str(model).startswith(str(cache))
    assert mmproj.name == "mmproj-F16.gguf"  # nearest in bits to an 8-bit model (F16 over F32)
    assert hub.resolve_hf(f"hf://{REPO}:q8_0")[0] == model  # the tag in any case, hf:// or not
    assert hub.resolve_hf(f"{REPO}:BF16", mmproj=False) == (cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
                                                            / REV / "diffusiongemma-tiny-BF16.gguf", None)
    assert hub.resolve_hf(REPO, mmproj="mine.gguf")[1] == "mine.gguf"  # a given mmproj stays


def test_default_quant_is_q4_k_m_then_q8_0_then_the_first():
    files = ["README.md", "m-BF16.gguf", "m-Q8_0.gguf", "m-Q4_K_M.gguf", "mmproj-m-F16.gguf"]
    assert hub.choose(files, None) == "m-Q4_K_M.gguf"
    assert hub.choose([f for f in files if "Q4" not in f], None) == "m-Q8_0.gguf"
    assert hub.choose(["mmproj-F16.gguf", "m-imatrix.gguf", "b-F16.gguf", "a-BF16.gguf"], None) == "a-BF16.gguf"
    # the tag followed by "." or "-" anywhere in the path; split files by their first part; folders
    split = ["BF16/m-BF16-00002-of-00002.gguf", "BF16/m-BF16-00001-of-00002.gguf", "Q4_K_M/m-UD-Q4_K_M.gguf"]
    assert hub.choose(split, "bf16") == "BF16/m-BF16-00001-of-00002.gguf"
    assert hub.choose(split, None) == "Q4_K_M/m-UD-Q4_K_M.gguf"
    with pytest.raises(dg.Error, match="no Q4_K file; it offers Q4_K_M"):
        hub.choose(["m-Q4_K_M.gguf"], "Q4_K")  # Q4_K is not Q4_K_M: the tag ends at "." or "-"


def test_mmproj_beside_the_model_nearest_in_bits():
    files = ["mmproj-F32.gguf", "Q4_K_M/m-Q4_K_M.gguf", "Q4_K_M/mmproj-BF16.gguf", "other/mmproj-F16.gguf"]
    assert hub.choose_mmproj(files, "Q4_K_M/m-Q4_K_M.gguf") == "Q4_K_M/mmproj-BF16.gguf"  # its own folder first
    assert hub.choose_mmproj(files[:2], "Q4_K_M/m-Q4_K_M.gguf") == "mmproj-F32.gguf"  # else a folder above
    assert hub.choose_mmproj(["mmproj-F32.gguf", "mmproj-F16.gguf"], "m-F32.gguf") == "mmproj-F32.gguf"
    assert hub.choose_mmproj(["m-Q8_0.gguf"], "m-Q8_0.gguf") is None


def test_load_hf_paths_and_from_pretrained(cache):
    with dg.load(f"hf://{REPO}/diffusiongemma-tiny-Q4_K_M.gguf", n_gpu_layers=0) as m:
        assert m.path.name == "diffusiongemma-tiny-Q4_K_M.gguf" and m.vision is None  # a file path: that file
        text = m.generate("hello", max_new_tokens=8, seed=3, steps=3).text
    with dg.load(f"hf://{REPO}", n_gpu_layers=0) as m:  # a repository: the default quant and its mmproj
        assert m.path.name == "diffusiongemma-tiny-Q4_K_M.gguf" and m.vision is not None
        assert m.generate("hello", max_new_tokens=8, seed=3, steps=3).text == text
    with dg.Model.from_pretrained(REPO, "Q8_0", n_gpu_layers=0, mmproj=False) as m:
        assert m.path.name == "diffusiongemma-tiny-Q8_0.gguf" and m.vision is None
    with dg.Model.from_pretrained(REPO, filename="diffusiongemma-tiny-BF16.gguf", n_gpu_layers=0) as m:
        assert m.path.name == "diffusiongemma-tiny-BF16.gguf" and m.vision is not None
    assert dg.resolve(f"hf://{REPO}:BF16").name == "diffusiongemma-tiny-BF16.gguf"


def test_unknown_quant_file_and_repo_are_clear_errors(cache):
    offers = r"\(in the cache; HF_HUB_OFFLINE=1\) has no Q5_K_M file; it offers BF16, Q4_K_M, Q8_0 "
    with pytest.raises(dg.Error, match=offers) as e:
        dg.Model.from_pretrained(REPO, "Q5_K_M")
    assert "mmproj-F16.gguf" in str(e.value)  # the .gguf files are listed too
    with pytest.raises(dg.Error, match="has no file nope.gguf; its .gguf files: diffusiongemma-tiny-BF16.gguf"):
        dg.load(f"hf://{REPO}/nope.gguf")
    with pytest.raises(dg.Error, match="someone/nothing is not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        dg.load("hf://someone/nothing:Q4_K_M")
    for bad in ("hf://just-a-name", "hf://a/b/c.bin", "hf://a:b/c", "hf://"):
        with pytest.raises(dg.Error, match="not a Hugging Face model"):
            dg.load(bad)
    with pytest.raises(dg.Error, match="filename must be"):
        dg.Model.from_pretrained(REPO, filename="")


def test_split_files_are_refused_before_downloading(tmp_path, files, cache):
    add_to_cache(cache, "a/split", {"m-BF16-00001-of-00002.gguf": files["model"],
                                    "m-BF16-00002-of-00002.gguf": files["mmproj"], "m-Q8_0.gguf": files["model"]})
    with pytest.raises(dg.Error, match="split into 2 files; .* pick another quant \\(Q8_0\\)"):
        hub.resolve_hf("a/split:BF16")
    assert hub.resolve_hf("a/split")[0].name == "m-Q8_0.gguf"


def test_online_errors_without_the_network(cache, monkeypatch):
    from huggingface_hub.utils import RepositoryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def not_found(self, repo_id, **kw):
        e = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its constructor wants an HTTP response
        Exception.__init__(e, f"404 {repo_id}")
        raise e

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", not_found)
    with pytest.raises(dg.Error, match="no Hugging Face repository someone/typo"):
        hub.resolve_hf("someone/typo")

    def unreachable(self, repo_id, **kw):
        raise ConnectionError("no route to host")

    # the Hub unreachable: the cache answers, as in llama.cpp (hf_hub_download falls back on it by itself)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / REV
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, path, **kw: str(snapshot / path))
    assert hub.resolve_hf(f"{REPO}:Q8_0", mmproj=False)[0].name == "diffusiongemma-tiny-Q8_0.gguf"
    with pytest.raises(dg.Error, match="someone/else is not in the Hugging Face cache .* unreachable: ConnectionError"):
        hub.resolve_hf("someone/else")


def test_cli_hf_flag(cache):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "diffgemma"]
    r = subprocess.run(run + ["generate", "-hf", f"{REPO}:Q8_0", "--no-mmproj", "-p", "hello", "-n", "8", "--seed",
                              "3", "--steps", "3", "-ngl", "0", "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["seed"] == 3
    r = subprocess.run(run + ["info", "--hf-repo", REPO], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "diffusiongemma-tiny-Q4_K_M.gguf" in r.stdout, r.stderr
    r = subprocess.run(run + ["generate", "-m", "x.gguf", "-hf", REPO, "hi"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "-m or -hf, not both" in r.stderr
    r = subprocess.run(run + ["chat", "-hf", f"{REPO}:Q6_K"], capture_output=True, text=True, env=env, input="")
    assert r.returncode == 2 and "offers BF16, Q4_K_M, Q8_0" in r.stderr and "Traceback" not in r.stderr


def test_hf_flag_is_not_help():
    # "-hf" must not be read as "-h" followed by "f", with or without abbreviations allowed
    from diffgemma.cli import build_parser

    for allow_abbrev in (True, False):
        p = build_parser()
        p.allow_abbrev = allow_abbrev
        for sub in ("generate", "chat", "serve", "bench", "info"):
            a = p.parse_args([sub, "-hf", "o/n:Q8_0"] + (["hi"] if sub == "generate" else []))
            assert a.hf_repo == "o/n:Q8_0"
        assert p.parse_args(["generate", "-hfr", "o/n", "--no-mmproj"]).mmproj is False
        assert p.parse_args(["generate", "--mmproj", "m.gguf"]).mmproj == "m.gguf"

