"""A real cluster for the fuzz suite, a tally of the codes it sees, and the budget.

`LLMSUITE_FUZZ_EXAMPLES` sets hypothesis' examples per test (default 20, about a
minute for the whole directory); `make fuzz` raises it. `LLMSUITE_FUZZ_REPORT=PATH`
writes requests and codes per RPC as JSON when the session ends.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from support import ServiceProcess, processes

EXAMPLES = int(os.environ.get("LLMSUITE_FUZZ_EXAMPLES", "20"))
settings.register_profile(
    "fuzz", max_examples=EXAMPLES, deadline=None, database=None,
    # The default run is the same every time (CI must not flake on a new example);
    # a larger budget explores fresh examples on each run.
    derandomize=EXAMPLES <= 20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)

Tally = dict[str, collections.Counter[str]]


@pytest.fixture(scope="session")
def tally() -> Iterator[Tally]:
    seen: Tally = collections.defaultdict(collections.Counter)
    yield seen
    report = os.environ.get("LLMSUITE_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({rpc: dict(codes) for rpc, codes in sorted(seen.items())}, indent=2))


def _upstream(kind: str, model_dir: Path, *extra: str) -> ServiceProcess:
    argv = [f"llmsuite-{kind}", "--listen", "127.0.0.1:0", "--model", f"tiny={model_dir}", *extra]
    if kind == "inference":
        argv += ["--device", "cpu", "--intra-op-threads", "1"]
    return ServiceProcess(argv)


@pytest.fixture(scope="session")
def cluster(tiny_model_dir: Path) -> Iterator[dict[str, ServiceProcess]]:
    tokenizer = _upstream("tokenizer", tiny_model_dir, "--allow-request-templates")
    inference = _upstream("inference", tiny_model_dir)
    with processes(tokenizer, inference):
        gateway = ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tokenizer.address,
                                  "--inference", inference.address])
        with processes(gateway):
            yield {"tokenizer": tokenizer, "inference": inference, "gateway": gateway}
