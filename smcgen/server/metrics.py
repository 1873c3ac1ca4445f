"""Server counters and their Prometheus text exposition (``GET /metrics``)."""

from __future__ import annotations

import threading
import time
from collections import Counter


class ServerMetrics:
    """Counters of one server process, safe to update from the event loop and the engine thread.

    Exposed: requests by endpoint and status code, answer tokens and all-particle tokens generated,
    engine busy seconds (throughput = tokens / busy seconds), the last batch's tokens/s, queue depth
    and requests in flight, request latency (sum and count), and the final ESS / N of each request
    (sum, count and the last value).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.completion_tokens = 0
        self.particle_tokens = 0
        self.busy_s = 0.0
        self.batches = 0
        self.last_tokens_per_s = 0.0
        self.latency_sum = 0.0
        self.latency_count = 0
        self.ess_frac_sum = 0.0
        self.ess_frac_count = 0
        self.ess_frac_last = float("nan")
        self.queue_depth = 0
        self.in_flight = 0

    def request_done(self, endpoint: str, status: int, latency_s: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency_sum += latency_s
            self.latency_count += 1

    def batch_done(self, busy_s: float, results: list) -> None:
        """One engine batch finished: its wall time and the results it produced."""
        with self._lock:
            self.batches += 1
            self.busy_s += busy_s
            tokens = 0
            for r in results:
                self.completion_tokens += len(r.token_ids)
                self.particle_tokens += r.particle_tokens
                tokens += len(r.token_ids)
                if r.ess_history:
                    frac = r.ess_history[-1] / r.n_particles
                    self.ess_frac_sum += frac
                    self.ess_frac_count += 1
                    self.ess_frac_last = frac
            self.last_tokens_per_s = tokens / busy_s if busy_s > 0 else 0.0

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in samples:
                    lines.append(f"{name}{labels} {value}")

            metric(
                "smcgen_requests_total",
                "counter",
                "Requests answered, by endpoint and HTTP status.",
                [(f'{{endpoint="{e}",code="{c}"}}', n) for (e, c), n in sorted(self.requests.items())] or [("", 0)],
            )
            metric(
                "smcgen_completion_tokens_total",
                "counter",
                "Tokens of the returned answers.",
                [("", self.completion_tokens)],
            )
            metric(
                "smcgen_particle_tokens_total",
                "counter",
                "Tokens generated over all particles.",
                [("", self.particle_tokens)],
            )
            metric(
                "smcgen_engine_busy_seconds_total",
                "counter",
                "Wall time the engine spent running batches.",
                [("", round(self.busy_s, 6))],
            )
            metric("smcgen_batches_total", "counter", "Engine batches run.", [("", self.batches)])
            rate = self.completion_tokens / self.busy_s if self.busy_s > 0 else 0.0
            prate = self.particle_tokens / self.busy_s if self.busy_s > 0 else 0.0
            metric(
                "smcgen_tokens_per_second",
                "gauge",
                "Answer tokens per engine-busy second since start (kind=answer) and over all particles "
                "(kind=particles); kind=last_batch: answer tokens/s of the last batch.",
                [
                    ('{kind="answer"}', round(rate, 3)),
                    ('{kind="particles"}', round(prate, 3)),
                    ('{kind="last_batch"}', round(self.last_tokens_per_s, 3)),
                ],
            )
            metric("smcgen_queue_depth", "gauge", "Requests waiting for the engine.", [("", self.queue_depth)])
            metric(
                "smcgen_requests_in_flight", "gauge", "Requests accepted and not yet answered.", [("", self.in_flight)]
            )
            metric(
                "smcgen_request_latency_seconds",
                "summary",
                "Request latency, accepted to answered.",
                [("_sum", round(self.latency_sum, 6)), ("_count", self.latency_count)],
            )
            metric(
                "smcgen_final_ess_fraction",
                "summary",
                "Final ESS / N of each request.",
                [("_sum", round(self.ess_frac_sum, 6)), ("_count", self.ess_frac_count)],
            )
            metric(
                "smcgen_last_final_ess_fraction",
                "gauge",
                "Final ESS / N of the last request.",
                [("", self.ess_frac_last)],
            )
            metric(
                "smcgen_uptime_seconds",
                "gauge",
                "Seconds since the server started.",
                [("", round(time.time() - self.started, 3))],
            )
            return "\n".join(lines) + "\n"
