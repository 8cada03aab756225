"""Typed server settings, built from CLI flags with matching LLMSUITE_* env vars.

Every service's `__main__` builds one settings object here and passes it down;
nothing reads os.environ at import time. Each flag `--foo-bar` also reads
`LLMSUITE_FOO_BAR`; the flag wins when both are given.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "LLMSUITE_"
DEFAULT_DRAIN_DELAY_S = 2.0


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to their LLMSUITE_* variable.

    The environment is read when the parser is built (in `main`), never at
    import. Lists (`action="append"`) read a comma-separated variable.
    """

    def __init__(self, *args: Any, environ: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._environ = os.environ if environ is None else environ

    def _apply_environment(self) -> None:
        """Every option (groups included) defaults to its variable; idempotent."""
        for action in self._actions:
            long = next((o for o in action.option_strings if o.startswith("--")), None)
            if long is None or long == "--help" or getattr(action, "_env_applied", False):
                continue
            var = env_name(long)
            raw = self._environ.get(var)
            if raw is not None and raw != "":
                action.default = _from_env(raw, action)
                action.required = False
            if action.help != argparse.SUPPRESS:  # a hidden option stays hidden
                action.help = f"{action.help or ''} [env: {var}]".strip()
            action._env_applied = True  # type: ignore[attr-defined]

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._apply_environment()
        # argparse appends a repeated flag to a list default, so `--model b` with
        # LLMSUITE_MODEL=a would serve both; the flag must replace the variable instead.
        list_defaults = {action: action.default for action in self._actions
                         if isinstance(action, argparse._AppendAction) and isinstance(action.default, list)}
        for action in list_defaults:
            action.default = None
        try:
            parsed, rest = super().parse_known_args(args, namespace)
        finally:
            for action, default in list_defaults.items():
                action.default = default
        for action, default in list_defaults.items():
            if getattr(parsed, action.dest, None) is None:
                setattr(parsed, action.dest, list(default))
        return parsed, rest

    def format_help(self) -> str:
        self._apply_environment()
        return super().format_help()


def _from_env(raw: str, action: argparse.Action) -> Any:
    if action.nargs == 0:  # flags: store_true/false, BooleanOptionalAction
        return raw.strip().lower() in ("1", "true", "yes", "on")
    convert = action.type or str
    if isinstance(action, argparse._AppendAction):
        return [convert(item.strip()) for item in raw.split(",") if item.strip()]  # type: ignore[operator]
    return convert(raw)  # type: ignore[operator]


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` -> (NAME, PATH); a bare PATH is named after its last component."""
    name, sep, directory = spec.partition("=")
    if not sep:
        path = Path(spec)
        return path.name, path
    if not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {spec!r}")
    return name, Path(directory)


@dataclass(frozen=True)
class KeepaliveSettings:
    """HTTP/2 keepalive. Defaults keep idle connections alive through NATs and
    load balancers (ping every 30 s) while refusing clients that ping more
    often than every 10 s."""

    time_s: float = 30.0
    timeout_s: float = 10.0
    permit_without_calls: bool = True
    min_ping_interval_s: float = 10.0
    max_connection_idle_s: float = 0.0  # 0 = unlimited
    max_connection_age_s: float = 0.0  # 0 = unlimited; set it to rebalance behind L4 balancers
    max_connection_age_grace_s: float = 30.0


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None  # set -> mTLS: clients must present a cert signed by it

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class TelemetrySettings:
    exporter: str = "none"  # none | console | otlp
    otlp_endpoint: str = "http://localhost:4317"
    service_name: str = "llmsuite"


@dataclass(frozen=True)
class ServerSettings:
    """Everything the shared bootstrap needs, identical across services."""

    listen: str
    grace_period_s: float = 10.0
    # Seconds health says NOT_SERVING while the port still accepts RPCs, so
    # pollers see it before the port closes. The command line defaults to
    # DEFAULT_DRAIN_DELAY_S; servers built in code (tests) close at once.
    drain_delay_s: float = 0.0
    compression: str = "gzip"  # gzip | none
    max_message_bytes: int = 64 * 1024 * 1024
    # A tighter cap on what the server receives (0 = max_message_bytes): gRPC refuses a larger
    # message (RESOURCE_EXHAUSTED) from its length prefix, before buffering it.
    max_receive_message_bytes: int = 0
    keepalive: KeepaliveSettings = field(default_factory=KeepaliveSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    api_keys: tuple[str, ...] = ()
    auth_exempt_methods: tuple[str, ...] = (
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1alpha.ServerReflection/",
        "/grpc.reflection.v1.ServerReflection/",
    )
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    log_level: str = "INFO"
    log_format: str = "json"  # json | text
    metrics_listen: str = ""  # HOST:PORT for Prometheus /metrics (port 0 picks one); empty = off


METRICS_PORT_OFFSET = 1000


def resolve_metrics_listen(value: str, listen: str) -> str:
    """`--metrics-listen` as an address, or "" for off. 'auto' puts metrics on
    the gRPC host at port + 1000 (so the defaults 50050-50052 get 51050-51052,
    and a server on port 0 gets its metrics on a free port too)."""
    value = value.strip()
    if value.lower() in ("", "off"):
        return ""
    if value.lower() != "auto":
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise SystemExit(f"--metrics-listen: expected HOST:PORT, 'auto' or 'off', got {value!r}")
        return value
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise SystemExit(f"--metrics-listen auto: cannot derive a port from --listen {listen!r}; give HOST:PORT")
    metrics_port = int(port) + METRICS_PORT_OFFSET if int(port) else 0
    if metrics_port > 65535:
        raise SystemExit(f"--metrics-listen auto: port {port} + {METRICS_PORT_OFFSET} is out of range; give HOST:PORT")
    return f"{host}:{metrics_port}"


def add_server_arguments(parser: EnvArgumentParser, *, default_listen: str) -> None:
    """The flags every service shares (listen, TLS, auth, keepalive, telemetry)."""
    g = parser.add_argument_group("server")
    g.add_argument("--listen", default=default_listen, help="HOST:PORT to bind (port 0 picks a free one)")
    g.add_argument("--grace-period", type=float, default=10.0,
                   help="seconds to drain in-flight RPCs after SIGTERM/SIGINT")
    g.add_argument("--drain-delay", type=float, default=DEFAULT_DRAIN_DELAY_S,
                   help="seconds after SIGTERM/SIGINT during which health reports NOT_SERVING while new RPCs are "
                        "still accepted, so health pollers and load balancers stop sending before the port closes "
                        "(set it to at least their poll period); a second signal ends it early")
    g.add_argument("--compression", choices=["gzip", "none"], default="gzip",
                   help="default compression for responses and outgoing calls")
    g.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024,
                   help="largest request or response message accepted")
    g.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    g.add_argument("--log-format", choices=["json", "text"], default="json", help="log line format")
    g.add_argument("--metrics-listen", default="auto",
                   help="HOST:PORT for the Prometheus /metrics endpoint; 'off' disables it; 'auto' = the "
                        f"--listen host at its port + {METRICS_PORT_OFFSET} "
                        f"({resolve_metrics_listen('auto', default_listen)} for the default --listen; port 0 stays 0)")

    k = parser.add_argument_group("keepalive")
    k.add_argument("--keepalive-time", type=float, default=30.0,
                   help="seconds between server keepalive pings")
    k.add_argument("--keepalive-timeout", type=float, default=10.0,
                   help="seconds to wait for a ping ack before closing the connection")
    k.add_argument("--keepalive-permit-without-calls", action=argparse.BooleanOptionalAction, default=True,
                   help="allow client pings on connections with no active RPC")
    k.add_argument("--min-ping-interval", type=float, default=10.0,
                   help="shortest interval between client pings the server tolerates")
    k.add_argument("--max-connection-idle", type=float, default=0.0,
                   help="close connections idle this many seconds (0 = never)")
    k.add_argument("--max-connection-age", type=float, default=0.0,
                   help="close connections older than this many seconds (0 = never)")
    k.add_argument("--max-connection-age-grace", type=float, default=30.0,
                   help="grace for in-flight RPCs on a connection closed for age")

    s = parser.add_argument_group("security")
    s.add_argument("--api-keys-file", type=Path, default=None,
                   help="the way to pass API keys (or the LLMSUITE_API_KEYS variable): a file with one key per "
                        "line, 'KEY', 'NAME KEY' or 'NAME KEY SCOPES' where SCOPES is a comma-separated list of "
                        "'user' (ordinary RPCs, the default) and 'admin' (administrative RPCs such as the "
                        "tokenizer's Reload); '#' starts a comment. No keys at all = authentication off")
    s.add_argument("--api-keys", default="",
                   help="comma-separated API key entries as in --api-keys-file; avoid this flag outside tests: "
                        "command lines are visible to every user in ps, so use --api-keys-file or the variable")
    s.add_argument("--tls-cert", type=Path, default=None, help="PEM server certificate; enables TLS")
    s.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, default=None,
                   help="PEM CA bundle; when set, clients must present a certificate (mTLS)")

    t = parser.add_argument_group("telemetry")
    t.add_argument("--otel-exporter", choices=["none", "console", "otlp"], default="none",
                   help="where OpenTelemetry spans go")
    t.add_argument("--otel-endpoint", default="http://localhost:4317", help="OTLP gRPC endpoint")


def parse_api_keys(file: Path | None, inline: str) -> tuple[str, ...]:
    """Keys from `--api-keys-file` (one per line, '#' comments) plus
    comma-separated `--api-keys`. Returns the 'KEY' / 'NAME KEY' / 'NAME KEY
    SCOPES' entries; `llmsuite.runtime.auth.parse_keys` splits them."""
    entries: list[str] = []
    if file is not None:
        for line in file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append(line)
    entries.extend(k.strip() for k in inline.split(",") if k.strip())
    return tuple(entries)


def server_settings_from_args(args: argparse.Namespace, *, service_name: str) -> ServerSettings:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key must be given together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise SystemExit("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    return ServerSettings(
        listen=args.listen,
        grace_period_s=args.grace_period,
        drain_delay_s=args.drain_delay,
        compression=args.compression,
        max_message_bytes=args.max_message_bytes,
        keepalive=KeepaliveSettings(
            time_s=args.keepalive_time,
            timeout_s=args.keepalive_timeout,
            permit_without_calls=args.keepalive_permit_without_calls,
            min_ping_interval_s=args.min_ping_interval,
            max_connection_idle_s=args.max_connection_idle,
            max_connection_age_s=args.max_connection_age,
            max_connection_age_grace_s=args.max_connection_age_grace,
        ),
        tls=TlsSettings(args.tls_cert, args.tls_key, args.tls_client_ca),
        api_keys=parse_api_keys(args.api_keys_file, args.api_keys),
        telemetry=TelemetrySettings(
            exporter=args.otel_exporter, otlp_endpoint=args.otel_endpoint, service_name=service_name
        ),
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_listen=resolve_metrics_listen(args.metrics_listen, args.listen),
    )


def model_specs(values: Sequence[str] | None) -> dict[str, Path]:
    """Repeated `--model NAME=DIR` -> {name: dir}, rejecting duplicate names."""
    models: dict[str, Path] = {}
    for spec in values or ():
        name, directory = parse_model_spec(spec)
        if name in models:
            raise SystemExit(f"--model {name} given twice")
        models[name] = directory
    return models
