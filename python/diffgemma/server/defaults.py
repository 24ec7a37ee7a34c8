"""The server's defaults that the command line shows in `diffgemma serve --help`.

Kept apart from the rest of the package so that reading them needs none of the [serve] extras (fastapi,
uvicorn, pydantic, prometheus-client): the `diffgemma` command builds its parser on every run.
"""

MAX_BATCH = 4  # requests denoised together by default (bench/batch_throughput.py, docs/performance.md)
REASONING_FORMATS = ("auto", "none")  # thinking in `reasoning_content` | left in the content, markers and all
NEEDS_EXTRAS = "diffgemma serve needs its extras: pip install 'diffgemma[serve]' (fastapi, uvicorn, prometheus-client)"
