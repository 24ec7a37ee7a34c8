"""The command line: generate (plain, JSON, visual on a pseudo-terminal) and the chat REPL."""

import json
import os
import pty
import subprocess
import sys

import diffgemma as dg

CLI = [sys.executable, "-m", "diffgemma.cli"]


def test_generate_json_is_reproducible():
    # the embedded default model (canvas 32): 40 new tokens are two canvases, the second cut
    out = [subprocess.run(CLI + ["generate", "-p", "ROMEO:", "-n", "40", "--seed", "4", "--steps", "5", "--json"],
                          capture_output=True, text=True, check=True).stdout for _ in range(2)]
    a, b = (json.loads(o) for o in out)
    assert a == b or (a["tokens"] == b["tokens"] and a["text"] == b["text"])
    assert len(a["tokens"]) == 40 and a["seed"] == 4 and len(a["canvases"]) == 2 and a["finish_reason"] == "length"
    assert {"prefill_ms", "step_ms", "tokens_per_s"} <= set(a["timings"])


def test_generate_plain_pipe_prints_only_the_text():
    r = subprocess.run(CLI + ["generate", "hello", "-n", "16", "--seed", "1", "--steps", "3", "--visual"],
                       capture_output=True, text=True, check=True)
    assert "\x1b[" not in r.stdout and "tokens/s" not in r.stdout and r.stderr == ""


def test_generate_visual_on_a_terminal():
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(sys.executable, CLI + ["generate", "hello", "-n", "16", "--seed", "1", "--steps", "4", "--visual"])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert "step 1/4" in out and "step 4/4" in out and "mean entropy" in out
    assert "\x1b[?2026h" in out  # synchronized repaint in place
    assert "ms/step" in out and "tokens/s" in out


def test_chat_repl():
    r = subprocess.run(CLI + ["chat", "-n", "16", "--steps", "3", "--seed", "2"], input="hi\n/clear\nhello\n/exit\n",
                       capture_output=True, text=True, check=True, timeout=120)
    assert "(cleared)" in r.stderr
    assert r.stdout.count("> ") >= 3


def test_bad_parameters_exit_cleanly():
    r = subprocess.run(CLI + ["generate", "hello", "--steps", "-3"], capture_output=True, text=True)
    assert r.returncode == 2 and "steps" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(CLI + ["generate", "-m", "/nope.gguf", "hello"], capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "diffgemma", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("diffgemma ")


SLOW_STEPS = """
import sys, time
from diffgemma import cli, engine
real = engine.Engine.denoise_step
def slow(self, *a, **kw):  # a slow machine: the generation lasts seconds, each canvas commits in turn
    time.sleep(0.05)
    return real(self, *a, **kw)
engine.Engine.denoise_step = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_generate_into_a_pipe_writes_each_canvas_as_it_commits(random_tiny):
    """Issue 29: piped, nothing came out until the end and a SIGTERM lost everything. Now the first canvas's
    text is in the pipe while the generation goes on, and a SIGTERM keeps what was written."""
    import signal

    with dg.load(random_tiny) as m:
        want = m.generate("hi", max_new_tokens=320, steps=3, seed=2).text
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = ["generate", "hi", "-m", str(random_tiny), "-n", "320", "--steps", "3", "--seed", "2"]  # 20 canvases
    p = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env)
    first = os.read(p.stdout.fileno(), 65536)  # blocks until something is written
    assert first and p.poll() is None  # the text came while the generation still ran
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=60)
    got = (first + rest).decode("utf-8")
    assert 0 < len(got) < len(want) and want.startswith(got)  # the canvases that committed before the signal
    assert p.returncode == 128 + signal.SIGTERM, err
