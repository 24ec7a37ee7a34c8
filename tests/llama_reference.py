"""llama.cpp's own per-tensor type choices, from `llama_model_quantize(dry_run=True)` of the pinned libllama.

libllama (the library llama-quantize is a command line for) refuses the `diffusion-gemma` architecture, so
`gemma4_copy` writes a metadata-only (sparse) copy whose keys are renamed to `gemma4`, an architecture it
knows with the same hyper-parameter keys; its rules have no gemma4 special case. Each dry run happens in a
child process (libllama aborts on some errors) and its per-tensor log lines are parsed:

    [  12/ 692] blk.0.attn_v.weight - [ 2816, 2048, 1, 1], type =   q8_0, size = ... -> ... (q6_K)

(no "(type)" at the end: the tensor keeps its type).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from diffgemma import gguf_file, layout

_CHILD = r'''
import ctypes, json, re, sys
import llama_cpp as L
jobs = json.load(sys.stdin)
log = []
@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def cb(level, text, ud):
    log.append(text.decode(errors="replace"))
L.llama_log_set(cb, None)
line = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =[^\n]*?(?:\((\w+)\))?\n")
out = []
for j in jobs:
    p = L.llama_model_quantize_default_params()
    p.ftype, p.dry_run, p.allow_requantize, p.pure = j["ftype"], True, True, j.get("pure", False)
    keep = []
    for field in ("token_embedding_type", "output_tensor_type"):
        if j.get(field) is not None:
            setattr(p, field, j[field])
    if j.get("imatrix"):  # one entry is enough: the rules only ask whether there is an imatrix
        name, n = j["imatrix"]
        data = (ctypes.c_float * n)(*([1.0] * n))
        arr = (L.llama_model_imatrix_data * 2)()
        arr[0].name, arr[0].data, arr[0].size = name.encode(), data, n
        keep += [data, arr]
        p.imatrix = arr
    if j.get("tensor_types"):
        tt = (L.llama_model_tensor_override * (len(j["tensor_types"]) + 1))()
        for i, (pat, t) in enumerate(j["tensor_types"]):
            tt[i].pattern, tt[i].type = pat.encode(), t
        keep.append(tt)
        p.tt_overrides = tt
    if j.get("prune"):
        pr = (ctypes.c_int32 * (len(j["prune"]) + 1))(*j["prune"], -1)
        keep.append(pr)
        p.prune_layers = pr
    log.clear()
    rc = L.llama_model_quantize(j["path"].encode(), b"/dev/null", ctypes.byref(p))
    text = "".join(log)
    out.append({"rc": rc, "types": {m.group(1): m.group(3) or m.group(2) for m in line.finditer(text)},
                "tail": text[-400:]})
json.dump(out, sys.stdout)
'''


def gemma4_copy(src: str | os.PathLike, dst: str | os.PathLike) -> pathlib.Path:
    """A sparse copy of the diffusion-gemma file `src` that libllama loads as `gemma4` (same tensors)."""
    g = gguf_file.read(src)
    md = {("gemma4" + k[len(layout.ARCH):] if k.startswith(layout.ARCH + ".") else k): v
          for k, v in g.metadata.items() if k != "general.alignment"}
    md["general.architecture"] = "gemma4"
    w = gguf_file.Writer(dst)
    w.set_all(md)
    for t in g.tensors.values():
        w.add_tensor(t.name, t.shape, t.type)
    w.write(sparse=True)
    return pathlib.Path(dst)


def dry_runs(jobs: list[dict]) -> list[dict[str, str]]:
    """Per-tensor output types ({name: ggml type name}) of each job: {path, ftype (llama_ftype int),
    optional imatrix [entry name, n floats], tensor_types [[pattern, ggml type id]], token_embedding_type,
    output_tensor_type (ggml type ids), pure, prune [layer ids]}."""
    env = dict(os.environ, LLAMA_LOG_COLORS="0")
    res = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(jobs), capture_output=True, text=True,
                         env=env, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"libllama dry run failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout)
    for j, o in zip(jobs, out, strict=True):
        if o["rc"] != 0 or not o["types"]:
            raise RuntimeError(f"libllama dry run of {j} failed (rc {o['rc']}): {o['tail']}")
    return [o["types"] for o in out]
