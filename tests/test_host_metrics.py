"""The receiving processes' metrics on the engine process's /metrics (issue 24, captions/host/metrics.py):
rooms' counters and gauges reported over the real engine channel are summed into the engine process's
own exposition, served over HTTP; a receiving process that dies leaves its counters in the sums (no
reset for `rate()`), and its gauges leave them. Also `--receivers auto` and `captions up` passing it on.
"""

from __future__ import annotations

import argparse
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from captions.host import wire
from captions.host.engine_client import EngineClient
from captions.host.engine_server import EngineServer
from captions.host.metrics import ReceiverMetrics, snapshot
from captions.host.receivers import (
    AUTO,
    MAX_AUTO_RECEIVERS,
    receivers_option,
    resolve_receivers,
    usable_cores,
)
from captions.live.metrics import CaptionMetrics, TaskMetrics, start_observability_server
from captions.live.slots import SlotQueue
from tests.fake_engine import FakeEngine


def until(check, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def parse(body: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def rooms_metrics(rooms: int, dropped: int, latencies: tuple[float, ...] = ()) -> CaptionMetrics:
    """A receiving process's metrics, as its rooms leave them."""
    metrics = CaptionMetrics()
    for _ in range(rooms):
        metrics.room_started()
    metrics.frame_dropped("shutdown", dropped)
    for seconds in latencies:
        metrics.observe_caption_latency(seconds)
    return metrics


@pytest.fixture
def engine_process():
    """The engine process's side: a real engine server (fake engine) whose metrics reports feed a
    ReceiverMetrics merged into an engine-side CaptionMetrics served over HTTP; connect() makes clients."""
    engine = FakeEngine(batch_size=2)
    slots = SlotQueue(engine, poll_s=0.05)
    aggregated = ReceiverMetrics(restarts=lambda: 1)
    server = EngineServer(engine, slots, on_disconnect=lambda r: aggregated.retire(r.number),
                          on_metrics=lambda r, families: aggregated.update(r.number, families))
    own = CaptionMetrics()
    engine.step_listeners = []  # the fake engine steps nothing; the real one reports its steps here
    own.attach_engine(engine, slots)
    own.merge = aggregated.merge
    http = start_observability_server("127.0.0.1", 0, list, metrics=own)
    clients: list[EngineClient] = []

    def connect() -> EngineClient:
        clients.append(EngineClient(server.path, index=len(clients)))
        return clients[-1]

    def scrape() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=5) as response:
            return parse(response.read().decode())

    yield server, aggregated, connect, scrape
    for client in clients:
        client.close()
    http.close()
    server.close()
    slots.close()


def test_rooms_metrics_of_receiving_processes_are_summed_on_the_engine_process(engine_process):
    _, aggregated, connect, scrape = engine_process
    first, second = connect(), connect()
    first.report_metrics(snapshot(rooms_metrics(2, 3, (0.3, 0.6)).registry))
    second.report_metrics(snapshot(rooms_metrics(1, 4, (0.2,)).registry))
    until(lambda: aggregated.reporting() == 2, what="both reports")
    samples = scrape()
    assert value(samples, "captions_rooms") == 3
    assert value(samples, "captions_frames_dropped_total", reason="shutdown") == 7
    assert value(samples, "captions_frames_dropped_total", reason="waiting_overflow") == 0
    assert value(samples, "captions_caption_latency_seconds_count") == 3
    assert value(samples, "captions_caption_latency_seconds_bucket", le="0.5") == 2
    assert value(samples, "captions_caption_latency_seconds_sum") == pytest.approx(1.1)
    assert value(samples, "captions_receivers") == 2
    assert value(samples, "captions_receiver_restarts_total") == 1
    # The engine process's own metrics are still there, once.
    assert value(samples, "captions_engine_batch_size") == 2
    assert value(samples, "captions_ready") == 1


def test_a_dead_receiving_process_keeps_its_counters_in_the_sums(engine_process):
    """A killed process (no goodbye) and the one started in its place, counting from 0: the sums
    never go backwards, so rate() sees no reset; the dead one's rooms leave the gauge."""
    server, aggregated, connect, scrape = engine_process
    doomed, other = connect(), connect()
    doomed.report_metrics(snapshot(rooms_metrics(2, 5, (0.3,)).registry))
    other.report_metrics(snapshot(rooms_metrics(1, 1).registry))
    until(lambda: aggregated.reporting() == 2, what="both reports")
    before = scrape()
    assert value(before, "captions_frames_dropped_total", reason="shutdown") == 6
    doomed._sock.shutdown(socket.SHUT_RDWR)  # as a killed process's socket
    until(lambda: len(server.receivers()) == 1 and aggregated.reporting() == 1, what="the dead one retired")
    after = scrape()
    assert value(after, "captions_rooms") == 1
    assert value(after, "captions_frames_dropped_total", reason="shutdown") == 6
    assert value(after, "captions_caption_latency_seconds_count") == 1
    restarted = connect()
    restarted.report_metrics(snapshot(rooms_metrics(1, 2).registry))
    until(lambda: aggregated.reporting() == 2, what="the new one's report")
    later = scrape()
    assert value(later, "captions_rooms") == 2
    assert value(later, "captions_frames_dropped_total", reason="shutdown") == 8
    for key, count in before.items():
        if key[0].endswith(("_total", "_count", "_bucket")) and not key[0].endswith("_created"):
            assert later.get(key, 0) >= count, f"{key} went backwards: {count} -> {later.get(key)}"


def test_a_closing_receiver_reports_once_more_and_families_only_receivers_have_are_served(engine_process):
    """What the rooms counted while they closed arrives with the channel's close; translation series
    (the engine process has no translation model) come from the receiving processes alone."""
    server, _, connect, scrape = engine_process
    client = connect()
    metrics = rooms_metrics(1, 0)
    metrics.attach_translation(object(), ["de"])
    client.metrics_source = lambda: snapshot(metrics.registry)
    metrics.translation_published("de", final=True)
    metrics.frame_dropped("shutdown", 9)
    client.close()
    until(lambda: not server.receivers(), what="closed")
    samples = scrape()
    assert value(samples, "captions_frames_dropped_total", reason="shutdown") == 9
    assert value(samples, "captions_translations_published_total", kind="final", language="de") == 1
    assert value(samples, "captions_translations_published_total", kind="interim", language="de") == 0
    assert value(samples, "captions_rooms") == 0  # its gauges left with it


def test_receivers_gauges_of_the_engine_process_itself_are_not_summed():
    aggregated = ReceiverMetrics()
    theirs = CaptionMetrics()
    theirs.ready_check = list
    TaskMetrics(theirs.registry).engine_broken.set(1)
    aggregated.update(1, snapshot(theirs.registry))
    own = CaptionMetrics()
    own.ready_check = list
    TaskMetrics(own.registry)
    own.merge = aggregated.merge
    samples = parse(own.render().decode())
    assert value(samples, "captions_ready") == 1 and value(samples, "captions_engine_broken") == 0


@pytest.mark.parametrize("report", [[["x", "counter", "help", [["x_total", "not a dict", 1]]]], "nope", [[1, 2]],
                                    [["x", "counter", "help", [["x_total", {}, 10 ** 400]]]],
                                    [["x", "counter", "help", [["x_total", {}, "nan"]]]]],
                         ids=["labels", "not-a-list", "short", "overflow", "nan"])
def test_a_malformed_metrics_report_is_a_wire_error(report):
    with pytest.raises(wire.WireError):
        ReceiverMetrics().update(1, report)


def test_a_report_read_after_its_connection_was_retired_does_not_bring_it_back():
    """The writer thread can see a closing receiver's socket go (and retire it) while the reader
    thread still parses its last report: counted again, its whole lifetime would double in the sums."""
    metrics = ReceiverMetrics()
    report = [["captions_frames_dropped", "counter", "help", [["captions_frames_dropped_total", {"reason": "x"}, 1001]]]]
    metrics.update(7, report)
    metrics.retire(7)
    metrics.update(7, report)  # the last report, parsed after the retire
    totals = metrics.totals()["captions_frames_dropped"].values
    assert totals == {("captions_frames_dropped_total", (("reason", "x"),)): 1001.0}
    assert metrics.reporting() == 0


def test_receivers_auto_follows_the_usable_cores():
    assert receivers_option("auto") == AUTO and receivers_option("3") == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            receivers_option(bad)
    assert [resolve_receivers(AUTO, cores)[0] for cores in (1, 2, 3, 4, 6, 10, 64)] == \
        [1, 1, 1, 2, 4, MAX_AUTO_RECEIVERS, MAX_AUTO_RECEIVERS]
    assert resolve_receivers(5, cores=2)[0] == 5, "a number given overrides auto"


@pytest.mark.parametrize(("files", "quota"), [({"cpu.max": "250000 100000\n"}, 3), ({"cpu.max": "max 100000\n"}, None),
                                              ({"cpu/cpu.cfs_quota_us": "150000", "cpu/cpu.cfs_period_us": "100000"}, 2),
                                              ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
                                              ({"cpu.max": "garbage"}, None), ({}, None)],
                         ids=["v2-2.5-cpus", "v2-no-quota", "v1-1.5-cpus", "v1-no-quota", "unreadable", "none"])
def test_receivers_auto_counts_a_containers_cpu_quota(tmp_path, monkeypatch, files, quota):
    """A container limited to 2.5 CPUs on a 64-core node gets the receiving processes of 3 cores."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert usable_cores(tmp_path) == (64 if quota is None else quota)


def test_captions_up_passes_receivers_on_to_its_worker(monkeypatch):
    from captions.dev import up

    monkeypatch.delenv("CAPTIONS_RECEIVERS", raising=False)
    parser = argparse.ArgumentParser()
    up.configure_parser(parser)
    worker = up.worker_args(parser.parse_args([]), [], [])
    assert worker[worker.index("--receivers") + 1] == "auto"
    worker = up.worker_args(parser.parse_args(["--receivers", "3"]), [], [])
    assert worker[worker.index("--receivers") + 1] == "3"
    monkeypatch.setenv("CAPTIONS_RECEIVERS", "2")
    parser = argparse.ArgumentParser()
    up.configure_parser(parser)
    assert "--receivers" in (worker := up.worker_args(parser.parse_args([]), [], []))
    assert worker[worker.index("--receivers") + 1] == "2"


def test_a_readiness_check_that_raises_makes_the_receiving_process_unready_and_the_reports_go_on(monkeypatch, caplog):
    """Before, the reporting thread died with the check: the engine process kept the last answer
    (ready) for good, and the process's metrics stopped."""
    import threading

    from captions.host import receiver

    monkeypatch.setattr(receiver, "READY_REPORT_S", 0.01)
    sent: list[tuple[str, object]] = []

    class Client:
        def report_ready(self, missing):
            sent.append(("ready", missing))

        def report_metrics(self, families):
            sent.append(("metrics", families))

    answers = iter([[], RuntimeError("room table locked"), RuntimeError("again"), []])

    def not_ready():
        answer = next(answers, [])
        if isinstance(answer, Exception):
            raise answer
        return answer

    stop = threading.Event()
    thread = threading.Thread(target=receiver.report_forever, args=(Client(), not_ready, lambda: ["m"], stop, 3))
    thread.start()
    deadline = time.monotonic() + 5
    while sum(kind == "ready" for kind, _ in sent) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(2)
    ready = [value for kind, value in sent if kind == "ready"]
    assert ready[0] == [] and ready[3] == [] and len(ready) >= 5, "the reports went on"
    assert ready[1] == ["its readiness check failed: RuntimeError: room table locked"], "unready, saying why"
    assert sum(kind == "metrics" for kind, _ in sent) >= 5
    assert len([r for r in caplog.records if "readiness check failed" in r.getMessage()]) == 1, "logged once"
