"""Prometheus metrics: one registry per app, fed by the per-request frame (middlewares.py).

Labels stay bounded and carry no secrets: routes are patterns (`/continue/{token}`, never the
token), models are the canonical ids of pricing.toml, and no member, org or key is ever a label.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from proxy.appkeys import METRICS, STORE
from proxy.exchange import Exchange
from proxy.store.base import Store
from proxy.store.batches import BatchedStore
from proxy.tasks import Tasks

REFUSED = "refused_"
# The proxy's own time: the aim is well under a millisecond (today an admission's SQLite
# transaction puts it at a few ms); a store under load can take far longer.
ADDED_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
# Upstream: tens of ms for count_tokens or models, seconds for a long prompt or a busy API.
UPSTREAM_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
# (label value, Usage field) for usage_proxy_tokens_total{kind}
TOKEN_KINDS = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cache_write_5m", "cache_creation_5m_input_tokens"),
    ("cache_write_1h", "cache_creation_1h_input_tokens"),
    ("cache_read", "cache_read_input_tokens"),
)


class Metrics:
    """The app's metrics in a registry of their own (no global state)."""

    def __init__(self, tasks: Tasks) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "usage_proxy_requests_total",
            "Requests handled, by route pattern, outcome and HTTP status.",
            ["route", "outcome", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "usage_proxy_tokens_total",
            "Tokens charged, by canonical model and kind (output may be an estimate for a cut "
            "stream).",
            ["model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "usage_proxy_cost_nanos_total",
            "Cost charged in nano-USD, by canonical model and who pays (included | extra).",
            ["model", "billing"],
            registry=r,
        )
        self.refusals = Counter(
            "usage_proxy_refusals_total",
            "Requests refused by a limit (session, weekly, org_monthly, balance, ...).",
            ["limit"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "usage_proxy_upstream_latency_seconds",
            "Upstream time: to the response head for streams and relays, to the whole answer "
            "for non-streaming messages.",
            buckets=UPSTREAM_BUCKETS_S,
            registry=r,
        )
        self.added_latency = Histogram(
            "usage_proxy_added_latency_seconds",
            "The proxy's own time on forwarded requests: arrival to upstream call, plus, for "
            "non-streaming messages, upstream answer to response.",
            buckets=ADDED_BUCKETS_S,
            registry=r,
        )
        self.open_streams = Gauge(
            "usage_proxy_open_streams",
            "Streamed /v1/messages responses being relayed now.",
            registry=r,
        )
        background = Gauge(
            "usage_proxy_background_tasks",
            "Tracked background tasks in flight: settlements, non-streaming forwards, reloads, "
            "webhook deliveries, and the reservation sweeper (so 1 when idle).",
            registry=r,
        )
        background.set_function(lambda: tasks.pending)
        self.pending_reservations = Gauge(
            "usage_proxy_pending_reservations",
            "Admitted requests not yet settled (read from the store at each scrape; across "
            "replicas when they share one).",
            registry=r,
        )
        self._batches = _StoreBatches()
        r.register(self._batches)
        # Labelled children, looked up once (labels() costs ~1 us a call); their keys are the
        # labels' own values, so these are bounded as the label sets are.
        # model -> its token counters in TOKEN_KINDS order
        self._tokens_by_model: dict[str, list[Counter]] = {}
        self._requests_by_labels: dict[tuple[str, ...], Counter] = {}
        self._cost_by_labels: dict[tuple[str, ...], Counter] = {}

    def watch_store(self, store: Store) -> None:
        """Count the batches of the PostgreSQL store (there are none on SQLite)."""
        if isinstance(store, BatchedStore):
            self._batches.store = store

    def observe(self, ex: Exchange, *, route: str, status: int, duration_s: float) -> None:
        """Record one finished request (called once, from the middleware's `finally`)."""
        _child(self._requests_by_labels, self.requests, route, ex.outcome, str(status)).inc()
        if ex.outcome.startswith(REFUSED):
            self.refusals.labels(limit=ex.outcome.removeprefix(REFUSED)).inc()
        if ex.upstream_ms is not None:
            self.upstream_latency.observe(ex.upstream_ms / 1000)
        added_s = added_latency_s(ex, duration_s)
        if added_s is not None:
            self.added_latency.observe(added_s)
        if not charge_pending(ex):
            self.observe_charge(ex)

    def observe_charge(self, ex: Exchange) -> None:
        """Record what an admitted request was charged: its tokens and its cost."""
        if not ex.admitted or ex.price is None:
            return
        model = ex.price.model  # canonical: aliases, dated ids and price_as models fold into it
        if ex.usage is not None:
            counters = self._tokens_by_model.get(model)
            if counters is None:
                counters = [self.tokens.labels(model, kind) for kind, _ in TOKEN_KINDS]
                self._tokens_by_model[model] = counters
            for counter, (_, name) in zip(counters, TOKEN_KINDS, strict=True):
                if tokens := getattr(ex.usage, name):  # inc(0) changes nothing, and locks
                    counter.inc(tokens)
        _child(self._cost_by_labels, self.cost, model, ex.billing).inc(ex.cost_nanos)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StoreBatches:
    """The PostgreSQL store's group commit (store/batches.py), read at each scrape: steps over
    batches is the steps a batch; steps alone are those whose rows another transaction held."""

    def __init__(self) -> None:
        self.store: BatchedStore | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        if self.store is None:
            return
        for name, text, value in (
            (
                "batches",
                "Transactions of admissions and settlements committed together (group "
                "commit, PostgreSQL).",
                self.store.batches_committed,
            ),
            (
                "batched_steps",
                "Admissions and settlements committed in those transactions.",
                self.store.steps_committed,
            ),
            (
                "steps_alone",
                "Admissions and settlements that a batch left to a transaction of "
                "their own (their rows were held elsewhere, or their batch failed).",
                self.store.steps_alone,
            ),
        ):
            yield CounterMetricFamily(f"usage_proxy_store_{name}", text, value=value)


def _child(children: dict[tuple[str, ...], Counter], metric: Counter, *labels: str) -> Counter:
    """The metric's child for these label values, looked up in prometheus once."""
    child = children.get(labels)
    if child is None:
        child = children[labels] = metric.labels(*labels)
    return child


def charge_pending(ex: Exchange) -> bool:
    """A non-streaming answer whose client left: the forward runs on (handlers.messages) and
    records its charge with `observe_charge` when it ends."""
    return ex.outcome == "client_disconnected" and ex.model is not None and not ex.stream


def added_latency_s(ex: Exchange, duration_s: float) -> float | None:
    """The proxy's own time on a forwarded request; None when nothing was forwarded."""
    if ex.forwarded_s is None:
        return None
    to_forward_s = ex.forwarded_s - ex.started_s
    if ex.stream or ex.model is None or ex.upstream_ms is None:
        return to_forward_s  # a relayed body takes upstream's time, not the proxy's
    return max(duration_s - ex.upstream_ms / 1000, to_forward_s)


async def scrape(request: web.Request) -> web.Response:
    """GET /metrics: no authentication (no keys, prompts or emails in it): keep it internal."""
    metrics = request.app[METRICS]
    metrics.pending_reservations.set(await request.app[STORE].pending_count())
    response = web.Response(body=request.app[METRICS].exposition())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
