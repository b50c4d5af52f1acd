"""TLS and mutual TLS on the ``otlp`` receiver, inside the real agent process.

A throwaway PKI is made per test: a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate from that CA, and one from a CA the agent does not
trust. Spans are sent with the OpenTelemetry SDK's own exporters; the ``debug``
exporter (``verbosity = "normal"``) logs the service of every batch that arrives, so
each sender names itself with ``service.name`` and the tests read who got through.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import signal
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent.__main__ import main
from agent.component import Kind, Signal
from agent.receivers.otlp import factory
from agent.receivers.otlp import receiver as receiver_module
from agent.receivers.otlp.common import is_loopback
from agent.receivers.otlp.config import (
    GrpcConfig,
    HttpConfig,
    OtlpReceiverConfig,
    TlsServerConfig,
)
from agent.telemetry import Telemetry
from agent.testing import Sink, make_host, settings_for
from tests.conftest import AgentProcess, free_port

pytestmark = pytest.mark.integration

# An exporter that cannot get through gives up after this long (the SDK retries
# UNAVAILABLE and connection errors with backoff until its timeout).
FAILING_TIMEOUT = 1.5

CONFIG = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.endpoint = "127.0.0.1:{http}"
{tls}
[exporters.debug]
verbosity = "normal"
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
exporters = ["debug"]
"""


@pytest.fixture(autouse=True)
def _no_ca_bundle_from_the_environment(monkeypatch):
    # The SDK's HTTP exporter sets its certificate_file as the requests session's
    # ``verify``, which requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override: with
    # either set, the exporter would not trust the test CA.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


# --------------------------------------------------------------------------- certificates


@dataclass
class Pki:
    """PEM files in a test's ``tmp_path``."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A client certificate from a CA the agent is not told about.
    stranger_cert: Path
    stranger_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
                 san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               # Python 3.13's default client contexts verify strictly (VERIFY_X509_STRICT),
               # which wants the key identifiers, and key usage on a CA.
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
           ) -> None:
    """``cert`` to ``path``, and ``key`` (unencrypted) beside it as ``.key``."""
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def make_pki(d: Path) -> Pki:
    """A fresh CA with its server and client certificates, and a stranger's, in ``d``."""
    d.mkdir()
    ca_key, stranger_ca_key, server_key, client_key, stranger_key = (
        ec.generate_private_key(ec.SECP256R1()) for _ in range(5))
    san: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                   x509.DNSName("localhost")]
    _write(d / "ca.pem", _certificate("test ca", ca_key, "test ca", ca_key, ca=True))
    _write(d / "server.pem", _certificate("agent", server_key, "test ca", ca_key, san=san),
           server_key)
    _write(d / "client.pem", _certificate("pod", client_key, "test ca", ca_key), client_key)
    _write(d / "stranger.pem", _certificate("stranger", stranger_key, "other ca",
                                            stranger_ca_key), stranger_key)
    return Pki(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
               client_cert=d / "client.pem", client_key=d / "client.key",
               stranger_cert=d / "stranger.pem", stranger_key=d / "stranger.key")


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "tls")


def tls_tables(pki: Pki, *, client_ca: bool = False, http_min_version: str | None = None) -> str:
    """``[receivers.otlp.grpc.tls]`` and ``[receivers.otlp.http.tls]`` serving ``pki``."""
    out = []
    for transport in ("grpc", "http"):
        out += [f"[receivers.otlp.{transport}.tls]",
                f'cert_file = "{pki.server_cert}"', f'key_file = "{pki.server_key}"']
        if client_ca:
            out.append(f'client_ca_file = "{pki.ca}"')
        if transport == "http" and http_min_version:
            out.append(f'min_version = "{http_min_version}"')
    return "\n".join(out)


# --------------------------------------------------------------------------- agent and senders


@dataclass
class Agent:
    """A started agent process and its two OTLP ports."""

    process: AgentProcess
    grpc: int
    http: int

    def services(self) -> list[str]:
        """The services of the batches the debug exporter logged, in order."""
        return [s for r in self.process.log_records()
                if r.get("msg", "").endswith("traces batch") for s in r.get("services", ())]


def start(tmp_path, start_agent, tls: str) -> Agent:
    grpc_port, http_port, health = free_port(), free_port(), free_port()
    process = start_agent(CONFIG.format(grpc=grpc_port, http=http_port, health=health,
                                        state=tmp_path / "s", tls=tls))
    process.wait_ready(f"127.0.0.1:{health}")
    return Agent(process, grpc_port, http_port)


def spans(service: str) -> list[ReadableSpan]:
    """One finished span of ``service``."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("tls-test").start_as_current_span("op"):
        pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def send(agent: Agent, transport: str, service: str, *, pki: Pki | None,
         client: str | None = None, timeout: float = 10) -> SpanExportResult:
    """Export one span of ``service`` with the SDK exporter of ``transport``.

    ``pki`` None: plaintext; otherwise TLS trusting ``pki.ca``, presenting the
    ``client`` ("client" or "stranger") certificate when given.
    """
    cert = key = None
    if pki is not None and client is not None:
        cert, key = getattr(pki, f"{client}_cert"), getattr(pki, f"{client}_key")
    exporter: GrpcSpanExporter | HttpSpanExporter
    if transport == "grpc" and pki is None:
        exporter = GrpcSpanExporter(endpoint=f"127.0.0.1:{agent.grpc}", insecure=True,
                                    timeout=timeout)
    elif transport == "grpc":
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None)
        exporter = GrpcSpanExporter(endpoint=f"127.0.0.1:{agent.grpc}", insecure=False,
                                    credentials=credentials, timeout=timeout)
    else:
        exporter = HttpSpanExporter(
            endpoint=f"{'http' if pki is None else 'https'}://127.0.0.1:{agent.http}/v1/traces",
            certificate_file=str(pki.ca) if pki else None,
            client_certificate_file=str(cert) if cert else None,
            client_key_file=str(key) if key else None, timeout=timeout)
    try:
        return exporter.export(spans(service))
    finally:
        exporter.shutdown()


def wait_for_services(agent: Agent, expected: list[str], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while sorted(agent.services()) != sorted(expected):
        if time.monotonic() > end:
            raise AssertionError(f"expected {expected} at the debug exporter, "
                                 f"got {agent.services()}")
        time.sleep(0.05)


def tls_handshake(port: int, ca: Path, highest: ssl.TLSVersion | None = None) -> str | None:
    """Shake hands with 127.0.0.1:``port`` trusting ``ca``; the TLS version agreed."""
    context = ssl.create_default_context(cafile=str(ca))
    if highest is not None:
        context.maximum_version = highest
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        return conn.version()


def listening_line(agent: Agent) -> str:
    return next(r["msg"] for r in agent.process.log_records()
                if "listening: " in r.get("msg", ""))


# --------------------------------------------------------------------------- serving TLS


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_spans_sent_over_tls_arrive(tmp_path, start_agent, pki, transport):
    agent = start(tmp_path, start_agent, tls_tables(pki))
    port = agent.grpc if transport == "grpc" else agent.http
    assert f"{transport} on 127.0.0.1:{port} (TLS)" in listening_line(agent)

    assert send(agent, transport, "over-tls", pki=pki) is SpanExportResult.SUCCESS
    wait_for_services(agent, ["over-tls"])
    assert agent.process.stop() == 0


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_plaintext_client_gets_nothing_in(tmp_path, start_agent, pki, transport):
    agent = start(tmp_path, start_agent, tls_tables(pki))

    assert send(agent, transport, "plaintext", pki=None,
                timeout=FAILING_TIMEOUT) is SpanExportResult.FAILURE
    # The listener still serves TLS clients, and theirs is all that arrived.
    assert send(agent, transport, "over-tls", pki=pki) is SpanExportResult.SUCCESS
    wait_for_services(agent, ["over-tls"])
    # The failed handshake leaves no line outside the structured log (gRPC core would
    # print one per handshake at its default verbosity).
    assert "Handshake failed" not in agent.process.log()
    assert agent.process.stop() == 0


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_mutual_tls_lets_in_only_clients_with_a_certificate_from_the_ca(
        tmp_path, start_agent, pki, transport):
    agent = start(tmp_path, start_agent, tls_tables(pki, client_ca=True))
    port = agent.grpc if transport == "grpc" else agent.http
    assert f"{transport} on 127.0.0.1:{port} (mutual TLS)" in listening_line(agent)

    assert send(agent, transport, "no-certificate", pki=pki,
                timeout=FAILING_TIMEOUT) is SpanExportResult.FAILURE
    assert send(agent, transport, "stranger", pki=pki, client="stranger",
                timeout=FAILING_TIMEOUT) is SpanExportResult.FAILURE
    assert send(agent, transport, "pod", pki=pki, client="client") is SpanExportResult.SUCCESS
    wait_for_services(agent, ["pod"])
    assert agent.process.stop() == 0


def test_http_min_version_1_3_refuses_tls_1_2(tmp_path, start_agent, pki):
    agent = start(tmp_path, start_agent, tls_tables(pki, http_min_version="1.3"))

    with pytest.raises(ssl.SSLError):
        tls_handshake(agent.http, pki.ca, highest=ssl.TLSVersion.TLSv1_2)
    assert tls_handshake(agent.http, pki.ca) == "TLSv1.3"
    assert agent.process.stop() == 0


def test_a_reload_serves_renewed_certificates(tmp_path, start_agent, pki):
    agent = start(tmp_path, start_agent, tls_tables(pki))
    assert tls_handshake(agent.http, pki.ca)

    renewed = make_pki(tmp_path / "renewed")
    pki.server_cert.write_bytes(renewed.server_cert.read_bytes())
    pki.server_key.write_bytes(renewed.server_key.read_bytes())
    agent.process.signal(signal.SIGHUP)
    end = time.monotonic() + 30
    while not any(r.get("msg") == "reloaded" for r in agent.process.log_records()):
        assert time.monotonic() < end, agent.process.log()
        time.sleep(0.05)

    assert tls_handshake(agent.http, renewed.ca)
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(agent.http, pki.ca)
    assert send(agent, "grpc", "after-renewal", pki=renewed) is SpanExportResult.SUCCESS
    wait_for_services(agent, ["after-renewal"])
    assert agent.process.stop() == 0


def test_a_reload_with_unusable_renewed_files_keeps_serving(tmp_path, start_agent, pki):
    """Files rotated in place but broken (a key from another pair): the reload is
    refused before anything stops, and the listeners keep the certificates they had."""
    agent = start(tmp_path, start_agent, tls_tables(pki))
    assert tls_handshake(agent.http, pki.ca)

    other = make_pki(tmp_path / "other")
    pki.server_key.write_bytes(other.server_key.read_bytes())  # no longer the cert's key
    agent.process.signal(signal.SIGHUP)
    end = time.monotonic() + 30
    while not (refused := [r for r in agent.process.log_records()
                           if r.get("msg", "").startswith("reload refused")]):
        assert time.monotonic() < end, agent.process.log()
        time.sleep(0.05)
    assert any("does not match the certificate" in e for e in refused[0]["errors"])

    assert tls_handshake(agent.http, pki.ca)  # still the old, loaded certificate
    assert send(agent, "grpc", "after-refused-reload", pki=pki) is SpanExportResult.SUCCESS
    wait_for_services(agent, ["after-refused-reload"])
    assert agent.process.stop() == 0


def test_a_reload_that_cannot_restore_the_previous_config_stops_with_status_1(
        tmp_path, start_agent, pki):
    """The new config cannot start (its gRPC port is taken) and the previous one cannot
    start again (its TLS files are gone): the agent stops with status 1, for systemd to
    restart it, instead of running with no receiver."""
    agent = start(tmp_path, start_agent, tls_tables(pki))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        new = CONFIG.format(grpc=taken.getsockname()[1], http=free_port(),
                            health=free_port(), state=tmp_path / "s", tls="")
        agent.process.config_path.write_text(new)
        pki.server_cert.unlink()
        agent.process.signal(signal.SIGHUP)
        assert agent.process.proc.wait(30) == 1
    messages = [r.get("msg", "") for r in agent.process.log_records()]
    assert any(m.startswith("reload failed to start the new config") for m in messages)
    assert any(m.startswith("could not restore the previous config either") for m in messages)


# --------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize("tls, error", [
    ('[receivers.otlp.grpc.tls]\ncert_file = "/etc/mlagent/tls/server.pem"',
     "receivers.otlp.grpc.tls.key_file: required with cert_file"),
    ('[receivers.otlp.http.tls]\nkey_file = "/etc/mlagent/tls/server.key"',
     "receivers.otlp.http.tls.cert_file: required with key_file"),
    ('[receivers.otlp.http.tls]\nclient_ca_file = "/etc/mlagent/tls/clients.pem"',
     "receivers.otlp.http.tls.client_ca_file: needs cert_file and key_file"),
    ('[receivers.otlp.http.tls]\ncert_file = "/s.pem"\nkey_file = "/s.key"\nmin_version = "1.1"',
     "receivers.otlp.http.tls.min_version: '1.1' is not one of '1.2', '1.3'"),
    ('[receivers.otlp.grpc.tls]\ncert_file = "/s.pem"\nkey_file = "/s.key"\nmin_version = "1.3"',
     "receivers.otlp.grpc.tls.min_version: gRPC serves TLS 1.2 and 1.3"),
], ids=["cert-without-key", "key-without-cert", "client-ca-without-cert", "http-tls-1.1",
        "grpc-tls-1.3"])
def test_inconsistent_tls_config_is_a_validation_error_with_its_key_path(
        tmp_path, capsys, tls, error):
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG.format(grpc=4317, http=4318, health=13133, state=tmp_path / "s",
                                  tls=tls))
    assert main(["validate", str(path)]) == 1
    assert error in capsys.readouterr().err


def test_tls_files_are_not_read_by_validate(tmp_path, capsys):
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG.format(grpc=4317, http=4318, health=13133, state=tmp_path / "s",
                                  tls='[receivers.otlp.grpc.tls]\n'
                                      'cert_file = "/nonexistent/server.pem"\n'
                                      'key_file = "/nonexistent/server.key"'))
    assert main(["validate", str(path)]) == 0


@pytest.mark.parametrize("transport, broken", [("grpc", "missing cert_file"),
                                               ("http", "key of another certificate")])
def test_unusable_tls_files_fail_start_up_naming_the_file_and_listener(
        tmp_path, start_agent, pki, transport, broken):
    ports = {"grpc": free_port(), "http": free_port()}
    if broken == "missing cert_file":
        missing = tmp_path / "tls" / "missing.pem"
        tls = f'cert_file = "{missing}"\nkey_file = "{pki.server_key}"'
        expected = (f"{transport} on 127.0.0.1:{ports[transport]}: tls.cert_file "
                    f"'{missing}': cannot read: no such file or directory")
    else:
        tls = f'cert_file = "{pki.server_cert}"\nkey_file = "{pki.client_key}"'
        expected = (f"{transport} on 127.0.0.1:{ports[transport]}: tls.key_file "
                    f"'{pki.client_key}': does not match the certificate in tls.cert_file "
                    f"'{pki.server_cert}'")
    agent = start_agent(CONFIG.format(grpc=ports["grpc"], http=ports["http"],
                                      health=free_port(), state=tmp_path / "s",
                                      tls=f"[receivers.otlp.{transport}.tls]\n{tls}"))
    assert agent.proc.wait(30) == 1
    errors = [r["msg"] for r in agent.log_records() if r.get("level") == "error"]
    assert errors == [f"cannot start: receivers.otlp: failed to start: {expected}"], agent.log()
    assert "Traceback" not in agent.log()


# --------------------------------------------------------------------------- the warning


@pytest.mark.parametrize("endpoint, loopback", [
    ("127.0.0.1:4317", True), ("127.0.0.2:4317", True), ("[::1]:4317", True),
    ("localhost:4317", True), ("0.0.0.0:4317", False), (":4317", False),
    ("10.0.0.7:4318", False), ("[::]:4318", False), ("node-1.cluster.local:4317", False),
])
def test_loopback_endpoints(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


async def test_a_listener_off_loopback_without_tls_is_warned_about(
        tmp_path, pki, caplog, monkeypatch):
    # Binding a non-loopback address would open a port to the network: pretend instead.
    monkeypatch.setattr(receiver_module, "is_loopback", lambda endpoint: False)
    caplog.set_level(logging.WARNING, logger="mlagent")
    config = OtlpReceiverConfig(
        grpc=GrpcConfig(endpoint="127.0.0.1:0"),
        http=HttpConfig(endpoint="127.0.0.1:0", tls=TlsServerConfig(
            cert_file=pki.server_cert, key_file=pki.server_key)))
    receiver = factory.create(settings_for("otlp", Kind.RECEIVER, Telemetry()), config,
                              {Signal.TRACES: Sink()})
    await receiver.start(make_host(tmp_path))
    await receiver.shutdown()
    await receiver.wait_closed()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["otlp: listening without TLS: grpc"]
    assert "grpc.tls.cert_file" in warnings[0].fields["hint"]
