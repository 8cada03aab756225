"""Scraping a live /metrics endpoint the way Prometheus does, for tests."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support import ServiceProcess


class Scrape:
    """One scrape's samples, looked up by name and a subset of labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum over samples named `name` whose labels include `labels`; None when there is none."""
        found = [s.value for s in self.samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        return sum(found) if found else None

    def get(self, name: str, **labels: str) -> float:
        value = self.value(name, **labels)
        return 0.0 if value is None else value

    def samples_named(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name]

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples_named(name) if label in s.labels}


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(response.read().decode())


def scrape_until(port: int, condition: Callable[[Scrape], bool], timeout: float = 30.0) -> Scrape:
    """Scrapes until `condition` holds (values recorded when a stream ends land
    just after the client saw the end); fails with the last scrape after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = scrape(port)
        if condition(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


def _logged(lines: list[str], message: str) -> dict[str, object] | None:
    for line in list(lines):
        if f'"msg": "{message}"' in line:
            entry: dict[str, object] = json.loads(line)
            return entry
    return None


def wait_for_log(proc: ServiceProcess, message: str, timeout: float = 60.0) -> dict[str, object]:
    """The first structured log entry with `message` (a process's log is read
    by a background thread, so a line may land a moment after health says SERVING)."""
    deadline = time.monotonic() + timeout
    while (entry := _logged(proc.lines, message)) is None:
        if time.monotonic() > deadline or (proc.proc is not None and proc.proc.poll() is not None):
            raise AssertionError(f"no {message!r} log line:\n{proc.log()}")
        time.sleep(0.02)
    return entry


def metrics_port(proc: ServiceProcess) -> int:
    """The port a service process reported in its 'serving metrics' log line."""
    return int(wait_for_log(proc, "serving metrics")["metrics_port"])  # type: ignore[call-overload]


def metrics_were_served(proc: ServiceProcess) -> bool:
    """Whether the process served metrics; asked after it logged 'serving', which comes later."""
    wait_for_log(proc, "serving")
    return _logged(proc.lines, "serving metrics") is not None
