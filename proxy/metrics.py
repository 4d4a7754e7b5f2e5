"""Prometheus metrics: one registry per app, fed by the per-request frame (middlewares.py).

Labels stay bounded and carry no secrets: routes are patterns (`/continue/{token}`, never the
token), models are the canonical ids of pricing.toml, and no member, org or key is ever a label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

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
    """The app's metrics in a registry of their own (no global state).

    What every request records (`observe`) is kept as plain numbers, `_Tally` and `_Spread`
    below, turned into Prometheus families only when /metrics is scraped: prometheus_client's
    own Counter and Histogram take a lock and a child lookup at each change, 3.8% of a request's
    instructions (1.482 -> 1.426 M with `observe` cut out, `usage-proxy bench --instructions`).
    Every change runs on the event loop's thread."""

    def __init__(self, tasks: Tasks) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = _Tally(
            "usage_proxy_requests",
            "Requests handled, by route pattern, outcome and HTTP status.",
            ("route", "outcome", "status"),
        )
        self.tokens = _Tally(
            "usage_proxy_tokens",
            "Tokens charged, by canonical model and kind (output may be an estimate for a cut "
            "stream).",
            ("model", "kind"),
        )
        self.cost = _Tally(
            "usage_proxy_cost_nanos",
            "Cost charged in nano-USD, by canonical model and who pays (included | extra).",
            ("model", "billing"),
        )
        self.refusals = _Tally(
            "usage_proxy_refusals",
            "Requests refused by a limit (session, weekly, org_monthly, balance, ...).",
            ("limit",),
        )
        self.upstream_latency = _Spread(
            "usage_proxy_upstream_latency_seconds",
            "Upstream time: to the response head for streams and relays, to the whole answer "
            "for non-streaming messages.",
            UPSTREAM_BUCKETS_S,
        )
        self.added_latency = _Spread(
            "usage_proxy_added_latency_seconds",
            "The proxy's own time on forwarded requests: arrival to upstream call, plus, for "
            "non-streaming messages, upstream answer to response.",
            ADDED_BUCKETS_S,
        )
        r.register(
            _Families(
                (
                    self.requests,
                    self.tokens,
                    self.cost,
                    self.refusals,
                    self.upstream_latency,
                    self.added_latency,
                )
            )
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

    def watch_store(self, store: Store) -> None:
        """Count the batches of the PostgreSQL store (there are none on SQLite)."""
        if isinstance(store, BatchedStore):
            self._batches.store = store

    def observe(self, ex: Exchange, *, route: str, status: int, duration_s: float) -> None:
        """Record one finished request (called once, from the middleware's `finally`)."""
        self.requests.add((route, ex.outcome, str(status)))
        if ex.outcome.startswith(REFUSED):
            self.refusals.add((ex.outcome.removeprefix(REFUSED),))
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
            for kind, name in TOKEN_KINDS:
                self.tokens.add((model, kind), getattr(ex.usage, name))
        self.cost.add((model, ex.billing), ex.cost_nanos)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Tally:
    """A counter by label values, as plain numbers."""

    __slots__ = ("_values", "doc", "labels", "name")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self._values: dict[tuple[str, ...], int | float] = {}

    def add(self, labels: tuple[str, ...], amount: int | float = 1) -> None:
        values = self._values
        values[labels] = values.get(labels, 0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, value in self._values.items():
            family.add_metric(labels, value)
        return family


class _Spread:
    """A histogram without labels, as plain numbers: a count per bucket and the sum."""

    __slots__ = ("_bounds", "_counts", "_sum", "doc", "name")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self._bounds = name, doc, bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # le: the first bound >= value
        self._sum += value

    def family(self) -> HistogramMetricFamily:
        cumulative = list(accumulate(self._counts))
        bounds = [*(floatToGoString(bound) for bound in self._bounds), "+Inf"]
        return HistogramMetricFamily(
            self.name,
            self.doc,
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=self._sum,
        )


class _Families:
    """The registry's view of the tallies and spreads: read at each scrape."""

    def __init__(self, metrics: tuple[_Tally | _Spread, ...]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        for metric in self._metrics:
            yield metric.family()


class _StoreBatches:
    """The PostgreSQL store's group commit (store/batches.py), read at each scrape: steps over
    batches is the steps a batch; steps alone are those whose rows another transaction held;
    leased steps never waited for a batch."""

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
            (
                "leased_steps",
                "Admissions and settlements decided in memory from a lease, their records "
                "applied in later batches (store/leases.py).",
                self.store.steps_leased,
            ),
        ):
            yield CounterMetricFamily(f"usage_proxy_store_{name}", text, value=value)


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
