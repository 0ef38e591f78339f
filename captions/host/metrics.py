"""The receiving processes' metrics on the engine process's one /metrics (issue 24).

Each receiving process sends a snapshot of its metrics registry (`snapshot`: every sample of
captions/live/metrics.py's registry, its custom collectors included) over its engine channel every
second, and once more when it closes the channel. The engine process keeps the latest snapshot of
each connection (`ReceiverMetrics`) and adds them into its own families when /metrics is scraped
(`ReceiverMetrics.merge`, installed as `CaptionMetrics.merge`). Each report is about 160 samples, 13 KB of JSON: about 0.6 ms of the receiving process's CPU a
second, and 0.2 ms of the engine process's per receiving process (measured on the 2-core test
machine, 2026-12-06).

How they add up: **summed over the receiving processes, under the names and labels a single worker
exports**, so that dashboards, alerts and `rate()` written for one worker read the whole host the
same way (a `receiver` label would split every series by a process number that means nothing to an
operator, and one process's restart would start new series). Counters and histograms are summed;
gauges that count things (rooms, microphones, rooms whose transcript is unavailable) are summed
over the processes running now. `captions_ready`, `captions_engine_broken` and the translation
engine's families (`captions_translation_queued`, `captions_translation_engine_*`) are the engine
process's own (it decides readiness and owns both engines); the rooms' translation metrics
(translations published, finals untranslated, delays) are the receiving processes', summed.

A receiving process that dies: its counters and histograms stay in the sum at their last reported
values (`retire`), and the process started in its place counts from 0 on top of them, so the sums
never go backwards and `rate()` sees no reset. What it counted after its last report (at most about
a second, when it was killed) is lost; its gauges leave the sum at once (its rooms are gone). Only
a restart of the engine process itself resets the counters, as a single worker's restart does.

Why not prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR): it shares only the values
of `Counter`/`Gauge`/`Histogram` objects through files, and drops custom collectors, which this
registry uses for values read at scrape time (errors by kind, the translation engine's counters);
it must also be chosen before prometheus_client is imported, which the worker does before it has
read `--receivers`. The snapshot here is the registry's own `collect()`, whatever made the samples.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from captions.host import wire

ENGINE_PROCESS_ONLY = frozenset({
    "captions_ready", "captions_engine_broken",
    # The translation engine runs in the engine process (translation_server.py); a receiving
    # process's stand-in has no such metrics, and none reported must be counted twice.
    "captions_translation_queued", "captions_translation_engine_submitted",
    "captions_translation_engine_translated", "captions_translation_engine_dropped",
    "captions_translation_engine_failed", "captions_translation_engine_batches",
    "captions_translation_engine_busy_seconds"})
"""Families whose receiving processes' values are not added (module notes)."""

_Key = tuple[str, tuple[tuple[str, str], ...]]
"""A sample: its name and its labels, sorted."""


def snapshot(registry: CollectorRegistry) -> list:
    """Every sample of `registry` as JSON-able lists: [[family, type, help, [[sample, labels, value],
    ...]], ...]. `_created` samples (a process's start time, which no sum can keep) are left out."""
    families = []
    for family in registry.collect():
        created = family.name + "_created"
        samples = [[s.name, s.labels, s.value] for s in family.samples if s.name != created]
        if samples:
            families.append([family.name, family.type, family.documentation, samples])
    return families


class _Family:
    __slots__ = ("documentation", "type", "values")

    def __init__(self, type_: str, documentation: str):
        self.type, self.documentation = type_, documentation
        self.values: dict[_Key, float] = {}

    def add(self, values: dict[_Key, float]) -> None:
        for key, value in values.items():
            self.values[key] = self.values.get(key, 0.0) + value


def _parse(families: object) -> dict[str, _Family]:
    """A receiver's snapshot, checked (it crossed a socket); raises WireError if malformed."""
    parsed: dict[str, _Family] = {}
    try:
        for name, type_, documentation, samples in families:  # type: ignore[union-attr]
            family = parsed.setdefault(str(name), _Family(str(type_), str(documentation)))
            for sample, labels, value in samples:
                key = (str(sample), tuple(sorted((str(k), str(v)) for k, v in labels.items())))
                number = float(value)
                if math.isnan(number):  # would poison the kept sums of a process gone for good
                    raise ValueError(f"{sample} is NaN")
                family.values[key] = family.values.get(key, 0.0) + number
    except (TypeError, ValueError, AttributeError, OverflowError) as e:
        raise wire.WireError(f"malformed metrics report: {e}") from None
    return parsed


class ReceiverMetrics:
    """The latest metrics of every connected receiving process, and the counters of those gone
    (module notes). `update` and `retire` come from the engine server's connection threads, `merge`
    from the /metrics handler."""

    def __init__(self, restarts: Callable[[], int] | None = None):
        self._lock = threading.Lock()
        self._live: dict[int, dict[str, _Family]] = {}
        """By connection number: its latest snapshot."""
        self._retired: dict[str, _Family] = {}
        """Counters and histograms of the connections gone, at their last reported values."""
        self._gone: set[int] = set()
        """Connections retired: a report of theirs still being read when they went (the writer
        thread can see the socket close first) must not bring them back into the sums."""
        self._restarts = restarts

    def update(self, connection: int, families: object) -> None:
        """Connection `connection` reported `families` (a `snapshot`)."""
        parsed = _parse(families)
        with self._lock:
            if connection not in self._gone:
                self._live[connection] = parsed

    def retire(self, connection: int) -> None:
        """Connection `connection` is gone: its counters stay in the sums, its gauges leave them."""
        with self._lock:
            self._gone.add(connection)
            gone = self._live.pop(connection, None)
            for name, family in (gone or {}).items():
                if family.type != "gauge":
                    self._retired.setdefault(name, _Family(family.type, family.documentation)).add(family.values)

    def reporting(self) -> int:
        """Receiving processes whose metrics are in the sums now."""
        with self._lock:
            return len(self._live)

    def totals(self) -> dict[str, _Family]:
        """Every family's sums over the receiving processes, live and gone."""
        with self._lock:
            totals: dict[str, _Family] = {}
            for name, family in self._retired.items():
                totals.setdefault(name, _Family(family.type, family.documentation)).add(family.values)
            for families in self._live.values():
                for name, family in families.items():
                    totals.setdefault(name, _Family(family.type, family.documentation)).add(family.values)
        for name in ENGINE_PROCESS_ONLY:
            totals.pop(name, None)
        return totals

    def merge(self, own: Iterable[Metric]) -> list[Metric]:
        """The engine process's families `own` with the receiving processes' added (module notes);
        families only the receiving processes have come after, then this host's own two."""
        totals = self.totals()
        merged = []
        for family in own:
            theirs = totals.pop(family.name, None)
            if theirs is None:
                merged.append(family)
                continue
            result = Metric(family.name, family.documentation, family.type)
            values = dict(theirs.values)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                result.samples.append(sample._replace(value=sample.value + values.pop(key, 0.0)))
            _add_samples(result, values)
            merged.append(result)
        for name, family in totals.items():
            result = Metric(name, family.documentation, family.type)
            _add_samples(result, family.values)
            merged.append(result)
        merged += self._own_families()
        return merged

    def _own_families(self) -> list[Metric]:
        receivers = Metric("captions_receivers", "Receiving processes whose metrics are in these sums now "
                           "(connected to the engine process)", "gauge")
        receivers.add_sample("captions_receivers", {}, self.reporting())
        families = [receivers]
        if self._restarts is not None:
            restarts = Metric("captions_receiver_restarts", "Receiving processes started again after one "
                              "exited (their counters carry on from the last values they reported)", "counter")
            restarts.add_sample("captions_receiver_restarts_total", {}, self._restarts())
            families.append(restarts)
        return families


def _add_samples(family: Metric, values: dict[_Key, float]) -> None:
    for (name, labels), value in values.items():
        family.add_sample(name, dict(labels), value)
