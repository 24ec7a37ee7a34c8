"""The server's Prometheus metrics (GET /metrics), on prometheus_client.

Each app has its own CollectorRegistry, so several apps in one process (tests) count apart. docs/server.md lists
the metrics.
"""

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

CANVAS_STEP_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST  # of the exposition text render() writes


class Metrics:
    """Counters, gauges and a histogram of one app: requests, generations, tokens, steps, the queue."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._requests = Counter("diffgemma_requests_total", "HTTP requests by endpoint and status code.",
                                 ["endpoint", "status"], registry=r)
        self._cancelled = Counter("diffgemma_requests_cancelled_total",
                                  "Generations abandoned because the client disconnected.", registry=r)
        self._generations = Counter("diffgemma_generations_total", "Generations completed (not cancelled).",
                                    registry=r)
        self._prompt_tokens = Counter("diffgemma_prompt_tokens_total", "Prompt tokens of finished generations.",
                                      registry=r)
        self._generated_tokens = Counter("diffgemma_generated_tokens_total", "Completion tokens returned.",
                                         registry=r)
        self._steps = Counter("diffgemma_denoise_steps_total", "Denoising steps run.", registry=r)
        self._step_seconds = Counter("diffgemma_denoise_seconds_total", "Wall time spent in denoising steps.",
                                     registry=r)
        self._step_ms = Gauge("diffgemma_step_ms", "Mean milliseconds per denoising step (last generation).",
                              registry=r)
        self._steps_per_canvas = Gauge("diffgemma_steps_per_canvas",
                                       "Mean denoising steps per canvas (last generation).", registry=r)
        self._tokens_per_s = Gauge("diffgemma_tokens_per_second", "New tokens per second (last generation).",
                                   registry=r)
        self._canvas_steps = Histogram("diffgemma_canvas_steps", "Denoising steps each committed canvas took.",
                                       buckets=CANVAS_STEP_BUCKETS, registry=r)
        self._queue_depth = Gauge("diffgemma_queue_depth", "Requests waiting for the model.", registry=r)
        self._queue_capacity = Gauge("diffgemma_queue_capacity", "Most requests that may wait (--queue-size).",
                                     registry=r)
        self._running = Gauge("diffgemma_requests_running",
                              "Requests being generated now (up to --max-batch at once).", registry=r)

    def track_queue(self, depth: Callable[[], tuple[int, int]], capacity: int) -> None:
        """Read the queue gauges at each scrape: depth() -> (waiting, running); capacity: the queue size."""
        self._queue_depth.set_function(lambda: depth()[0])
        self._running.set_function(lambda: depth()[1])
        self._queue_capacity.set(capacity)

    def count_request(self, endpoint: str, status: int) -> None:
        """One HTTP response (endpoint: a known path, or "other")."""
        self._requests.labels(endpoint, str(status)).inc()

    def count_cancelled(self) -> None:
        """A generation abandoned because its client left."""
        self._cancelled.inc()

    @property
    def cancelled(self) -> int:
        """Generations abandoned so far."""
        return int(self.registry.get_sample_value("diffgemma_requests_cancelled_total") or 0)

    def observe(self, canvas_steps: list[int], step_ms: float, prompt_tokens: int, tokens: int,
                tokens_per_s: float) -> None:
        """A finished generation: the steps of each committed canvas, its timings and token counts."""
        self._generations.inc()
        self._prompt_tokens.inc(prompt_tokens)
        self._generated_tokens.inc(tokens)
        n = sum(canvas_steps)
        self._steps.inc(n)
        self._step_seconds.inc(n * step_ms / 1e3)
        for s in canvas_steps:
            self._canvas_steps.observe(s)
        if n:
            self._step_ms.set(step_ms)
            self._steps_per_canvas.set(n / len(canvas_steps))
        self._tokens_per_s.set(tokens_per_s)

    def render(self) -> bytes:
        """The exposition text (CONTENT_TYPE)."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A registry's metrics without prometheus_client's `<name>_created` series (each counter's and histogram's
    start time, exposed as gauges of their own): /metrics lists only the metrics docs/server.md names."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for m in self.registry.collect():
            m.samples = [s for s in m.samples if not s.name.endswith("_created")]
            yield m
