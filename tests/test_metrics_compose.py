"""The compose `observability` profile's Prometheus and Grafana, validated offline.

The files are checked against each other and against the services: Prometheus
scrapes every llmsuite service where its metrics really listen, Grafana reads
that Prometheus and loads the checked-in dashboard, and every dashboard query
names metrics that docs/metrics.md documents and a live cluster exports.
(The compose file itself is validated against the compose spec in
test_container_files.py.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from metrics_scrape import Scrape, scrape
from support import REPO, ServerThread, ServiceProcess, processes, wait_http_ready

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.admission import GatewayLimits
from llmsuite.gateway.app import GatewayApp
from llmsuite.gateway.rate_limit import KeyedRateLimiter
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.service import InferenceApp
from llmsuite.runtime.channels import ChannelSettings
from llmsuite.runtime.settings import ServerSettings, resolve_metrics_listen
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import TokenizerApp

COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS = REPO / "docker" / "prometheus.yml"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llmsuite.json"
METRICS_DOC = REPO / "docs" / "metrics.md"
LLMSUITE_COMMANDS = {"llmsuite-tokenizer", "llmsuite-inference", "llmsuite-gateway"}
METRIC_NAME = re.compile(r"\b(?:llmsuite|process)_[a-z0-9_]+\b")
SAMPLE_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def mounted(service: dict[str, Any], target: str) -> Path:
    """The checked-in file or folder a service mounts at `target`."""
    for volume in service.get("volumes") or []:
        source, mount = volume.split(":")[:2]
        if mount == target:
            return (REPO / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def metrics_address(service: dict[str, Any]) -> str:
    """Where a compose service's metrics listen, by the services' own rule."""
    env = service["environment"]
    return resolve_metrics_listen(str(env.get("LLMSUITE_METRICS_LISTEN", "auto")), env["LLMSUITE_LISTEN"])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_prometheus_scrapes_every_llmsuite_service_where_its_metrics_listen(services):
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])
    ours = {name: s for name, s in services.items() if (s.get("command") or [""])[0] in LLMSUITE_COMMANDS}
    assert set(ours) == {"tokenizer", "inference", "inference-gpu", "gateway"}
    for name, service in ours.items():
        port = metrics_address(service).rpartition(":")[2]
        assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name} on {port}"
        assert port in [str(p) for p in service.get("expose", [])], f"{name} does not expose {port}"
        assert not any(str(p).endswith(port) for p in service.get("ports", [])), f"{name} publishes metrics"
    assert targets <= {f"{name}:{metrics_address(s).rpartition(':')[2]}" for name, s in ours.items()}


def test_prometheus_and_grafana_belong_to_the_observability_profile(services):
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        assert service["profiles"] == ["observability"]
        image, _, tag = service["image"].partition(":")
        assert tag and tag != "latest", f"{image} must be pinned"
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert mounted(prometheus, config_flag.partition("=")[2]) == PROMETHEUS.resolve()
    assert mounted(grafana, "/etc/grafana/provisioning") == (GRAFANA / "provisioning").resolve()
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_started"
    for name, service in services.items():
        if "observability" not in (service.get("profiles") or []):
            assert not set(service.get("depends_on") or {}) & {"prometheus", "grafana"}, name


def test_grafana_reads_that_prometheus_and_loads_the_checked_in_dashboard(services, dashboard):
    grafana = services["grafana"]
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())[
        "datasources"]
    published = services["prometheus"]["ports"][0].rpartition(":")[2]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{published}"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llmsuite.yaml").read_text())[
        "providers"]
    assert mounted(grafana, provider["options"]["path"]) == DASHBOARD.parent.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted(grafana, str(Path(home).parent)) / Path(home).name == DASHBOARD.resolve()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]


def test_dashboard_queries_are_well_formed(dashboard):
    for title, expr in queries(dashboard):
        depth = 0
        for char in expr:
            depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(char, 0)
            assert depth >= 0, (title, expr)
        assert depth == 0, (title, expr)
        for quantile in re.finditer(r"histogram_quantile\(", expr):
            rest = expr[quantile.end():]
            assert re.match(r"0?\.\d+, sum by \(le\b", rest), (title, expr)
            assert "_bucket" in rest.split("histogram_quantile")[0], (title, expr)
        for counter in re.findall(r"rate\((\w+)", expr):
            assert counter.endswith(("_total", "_bucket", "_sum", "_count")), f"{title}: rate() of gauge {counter}"


def test_dashboard_covers_what_an_operator_needs(dashboard):
    used = {name for _, expr in queries(dashboard) for name in METRIC_NAME.findall(expr)}
    for needed in ("llmsuite_inference_generation_tokens_total",  # throughput
                   "llmsuite_inference_time_to_first_token_seconds_bucket",
                   "llmsuite_inference_inter_token_latency_seconds_bucket",
                   "llmsuite_inference_queued_requests",
                   "llmsuite_inference_batch_size_sum",
                   "llmsuite_inference_kv_cache_usage_ratio"):
        assert needed in used, needed


def family(sample_name: str) -> str:
    for suffix in SAMPLE_SUFFIXES:
        if sample_name.endswith(suffix):
            return sample_name[: -len(suffix)]
    return sample_name


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path) -> set[str]:
    """Metric family names a live cluster (all three services and the HTTP API, one generation
    through each front door) exports."""
    settings = ServerSettings(listen="127.0.0.1:0", grace_period_s=1.0, log_format="text",
                              metrics_listen="127.0.0.1:0")
    tokenizer = TokenizerApp({"tiny": tiny_model_dir}, TokenizerLimits())
    inference = InferenceApp({"tiny": tiny_model_dir}, EngineSettings(device="cpu", intra_op_threads=1))
    with ServerThread(tokenizer, settings) as tok, ServerThread(inference, settings) as inf:
        factory = partial(Upstreams.connect, tok.address, [inf.address], ChannelSettings(), tracer_provider=None,
                          breaker_threshold=5, breaker_reset_s=5.0)
        app = GatewayApp(factory, GatewayLimits(), KeyedRateLimiter(0, 1, 0, 1), startup_timeout_s=60)
        with ServerThread(app, settings) as gw, gw.channel() as ch:
            gateway_pb2_grpc.GatewayServiceStub(ch).Generate(pb.GenerateRequest(
                model="tiny", prompt="Hello", sampling=common_pb2.SamplingParams(max_new_tokens=4)), timeout=60)
            # The HTTP API serves its metrics on its own port, beside the API.
            with processes(ServiceProcess(["llmsuite-openai", "--listen", "127.0.0.1:0", "--gateway", gw.address],
                                          wait=False)) as (http,):
                base = wait_http_ready(http)
                answered = httpx.post(f"{base}/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": "Hello", "max_tokens": 2, "user": "counted-as-ignored"})
                assert answered.status_code == 200, answered.text
                with httpx.Client(timeout=30) as client:
                    adapter = client.get(f"{base}/metrics")
                assert adapter.status_code == 200
            scrapes = [scrape(s.running.metrics_port) for s in (tok, inf, gw)]
    scrapes.append(Scrape(adapter.text))
    return {name for result in scrapes for name in result.families}


def test_every_dashboard_metric_is_documented_and_exported(dashboard, exported):
    documented = set(re.findall(r"`((?:llmsuite|process)_[a-z0-9_]+)`", METRICS_DOC.read_text()))
    for title, expr in queries(dashboard):
        for name in METRIC_NAME.findall(expr):
            assert name in documented or family(name) in documented or f"{family(name)}_total" in documented, \
                f"{title}: {name} is not in docs/metrics.md"
            assert family(name) in exported, f"{title}: no service exports {name}"


def test_every_documented_metric_is_exported(exported):
    documented = set(re.findall(r"`((?:llmsuite)_[a-z0-9_]+)`", METRICS_DOC.read_text()))
    missing = {name for name in documented if family(name) not in exported}
    assert not missing, f"documented in docs/metrics.md but exported by no service: {sorted(missing)}"
