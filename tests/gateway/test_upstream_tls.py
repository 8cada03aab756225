"""The documented TLS story end to end: tokenizer and inference demand client
certificates (mTLS), and the gateway presents its own, from certificates made
here with a private CA."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import BIN, ServiceProcess, processes

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmsuite test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"llmsuite {role}")]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if role == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        paths[f"{role}_cert"] = directory / f"{role}.pem"
        paths[f"{role}_cert"].write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM))
        paths[f"{role}_key"] = directory / f"{role}.key"
        _write_key(key, paths[f"{role}_key"])
    return paths


def test_gateway_presents_a_client_certificate_to_mtls_upstreams(tiny_model_dir, tmp_path):
    pki = make_pki(tmp_path)
    server_tls = ["--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], "--tls-client-ca", pki["ca"]]
    client_credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(), private_key=pki["client_key"].read_bytes(),
        certificate_chain=pki["client_cert"].read_bytes())
    tok = ServiceProcess(["llmsuite-tokenizer", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_model_dir}",
                          *server_tls], credentials=client_credentials)
    inf = ServiceProcess(["llmsuite-inference", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_model_dir}",
                          "--device", "cpu", "--intra-op-threads", "1", *server_tls], credentials=client_credentials)
    with processes(tok, inf):
        # The upstreams really demand a client certificate: without one even health is refused.
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with grpc.secure_channel(tok.address, no_cert) as ch, pytest.raises(grpc.RpcError) as exc_info:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE

        gw = ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tok.address,
                             "--inference", inf.address, "--upstream-tls-ca", pki["ca"],
                             "--upstream-tls-cert", pki["client_cert"], "--upstream-tls-key", pki["client_key"]])
        with processes(gw), grpc.insecure_channel(gw.address) as ch:
            reply = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(pb.GenerateRequest(
                model="tiny", prompt="over mTLS", sampling=common_pb2.SamplingParams(max_new_tokens=3)), timeout=30)
            assert reply.summary.usage.completion_tokens > 0


def test_client_certificate_flags_come_in_pairs(tmp_path):
    done = subprocess.run([str(BIN / "llmsuite-gateway"), "--listen", "127.0.0.1:0", "--upstream-tls-cert",
                           str(tmp_path / "client.pem")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--upstream-tls-cert and --upstream-tls-key must be given together" in done.stderr
