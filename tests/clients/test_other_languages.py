"""The Node.js example against the fake gateway, and `buf generate` (what
`make stubs` runs) producing Go and TypeScript stubs with local plugins.
Both skip, saying what to install, where the tools are missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

NODE_DIR = REPO / "clients" / "node"
BUF = Path(sys.executable).parent / "buf"
GO_PLUGINS = ("protoc-gen-go", "protoc-gen-go-grpc")
PROTOC_GEN_ES = NODE_DIR / "node_modules" / ".bin" / "protoc-gen-es"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """clients/node installed from its lockfile (`npm ci`), reused while the lockfile is unchanged."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH (apt-get install nodejs npm)")
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        try:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                                  text=True, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci in clients/node timed out (offline?)")
        if done.returncode != 0:
            pytest.skip(f"npm ci in clients/node failed (offline?): {done.stderr.strip()[-500:]}")
    return NODE_DIR / "node_modules"


def _node_example(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(NODE_DIR / "generate.js"), *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", **env})


def test_node_example_streams_deltas_then_summary_json(node_modules, gateway, recording_proxy):
    prompt = "node " * 30 + "stream"
    done = _node_example("--address", recording_proxy.address, "--max-new-tokens", "5", "--request-id", "node-1",
                         prompt, env={"LLMSUITE_API_KEY": gateway.api_key})
    assert done.returncode == 0, done.stderr
    *text_lines, last = done.stdout.splitlines()
    assert text_lines == ["node node node node node"]
    summary = json.loads(last)
    assert summary["text"] == "node node node node node" and summary["finish_reason"] == "length"
    assert summary["usage"] == {"prompt_tokens": 32, "completion_tokens": 5, "cached_tokens": 0}
    assert summary["request_id"] == "node-1" and summary["timings"]["total_s"] == pytest.approx(0.0125)
    call = gateway.app.last("GenerateStream")
    assert call.metadata["authorization"] == f"Bearer {gateway.api_key}"
    assert call.request.sampling.max_new_tokens == 5 and not call.request.sampling.HasField("top_p")
    (headers, body), = [r for r in recording_proxy.requests() if r[0][":path"].endswith("/GenerateStream")]
    assert headers["grpc-encoding"] == "gzip" and body[0] == 1


def test_node_example_reports_rich_errors(node_modules, gateway):
    done = _node_example("--address", gateway.address, "--top-p", "1.5", "hi",
                         env={"LLMSUITE_ADDRESS": "unused:1", "LLMSUITE_API_KEY": gateway.api_key})
    assert done.returncode == 1
    assert done.stderr == "INVALID_ARGUMENT: sampling.top_p: must be in (0, 1] [reason INVALID_FIELD]\n"
    done = _node_example("hi", env={"LLMSUITE_ADDRESS": gateway.address})  # no key
    assert done.returncode == 1 and done.stderr.startswith("UNAUTHENTICATED: ")
    assert "[reason MISSING_API_KEY]" in done.stderr


def test_buf_generate_makes_go_and_typescript_stubs(tmp_path: Path):
    missing = [p for p in GO_PLUGINS if shutil.which(p) is None]
    if missing or not PROTOC_GEN_ES.exists() or not BUF.exists():
        needs = []
        if missing:
            needs.append(f"{', '.join(missing)} (apt-get install protoc-gen-go protoc-gen-go-grpc)")
        if not PROTOC_GEN_ES.exists():
            needs.append("protoc-gen-es (cd clients/node && npm ci)")
        if not BUF.exists():
            needs.append("buf (make setup installs it)")
        pytest.skip("buf generate needs " + "; ".join(needs))
    done = subprocess.run([str(BUF), "generate", "--template", "buf.gen.yaml", "-o", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    go = tmp_path / "gen" / "go" / "llmsuite"
    for service in ("gateway", "tokenizer", "inference"):
        assert (go / service / "v1" / f"{service}.pb.go").is_file()
        assert (go / service / "v1" / f"{service}_grpc.pb.go").is_file()
    gateway_go = (go / "gateway" / "v1" / "gateway_grpc.pb.go").read_text()
    assert "package gatewayv1" in gateway_go and "func NewGatewayServiceClient(" in gateway_go
    assert '"llmsuite.dev/gen/go/llmsuite/common/v1"' in (go / "gateway" / "v1" / "gateway.pb.go").read_text()
    ts = tmp_path / "gen" / "ts" / "llmsuite"
    gateway_ts = (ts / "gateway" / "v1" / "gateway_pb.ts").read_text()
    assert "export const GatewayService" in gateway_ts and '"../../common/v1/common_pb.js"' in gateway_ts
    assert (ts / "common" / "v1" / "common_pb.ts").is_file()
