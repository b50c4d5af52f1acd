"""What both transports of the ``otlp`` receiver share: refusals, responses, bind errors,
TLS files."""

from __future__ import annotations

import errno
import ipaddress
import math
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from agent.component import Signal
from agent.config import split_endpoint
from agent.receivers.otlp.config import TlsServerConfig

# Response message and the partial-success field that counts rejected items, per signal.
_RESPONSES: dict[Signal, tuple[type[Message], str]] = {
    Signal.TRACES: (trace_service_pb2.ExportTraceServiceResponse, "rejected_spans"),
    Signal.METRICS: (metrics_service_pb2.ExportMetricsServiceResponse, "rejected_data_points"),
    Signal.LOGS: (logs_service_pb2.ExportLogsServiceResponse, "rejected_log_records"),
}

DEFAULT_RETRY_AFTER = 1.0


class Refusal(Exception):
    """A request answered with an error rather than passed on.

    ``code`` is a ``google.rpc.Code``; each transport maps it to its own status (the
    table is in ``agent.receivers.otlp.receiver``). ``retry_after`` (seconds) is set
    when the client should retry.
    """

    def __init__(self, code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


def response_for(signal: Signal, rejected: int = 0, message: str = "") -> Message:
    """The ``Export*ServiceResponse`` of ``signal``: empty, or a partial success."""
    cls, field = _RESPONSES[signal]
    response = cls()
    if rejected or message:
        setattr(response.partial_success, field, rejected)
        response.partial_success.error_message = message
    return response


def retry_after_seconds(retry_after: float | None) -> int:
    """A retry hint as whole seconds for ``Retry-After`` (at least 1)."""
    return max(1, math.ceil(retry_after if retry_after is not None else DEFAULT_RETRY_AFTER))


# ----------------------------------------------------------------------------- binding


def bind_error(endpoint: str, reason: str) -> OSError:
    """The error ``start`` raises when a listener cannot bind.

    The graph prefixes it with the component ("receivers.otlp: failed to start: ...").
    """
    return OSError(f"cannot listen on {endpoint}: {reason}")


def why_bind_fails(endpoint: str) -> str:
    """Find out why binding ``endpoint`` fails, for a library that does not say.

    gRPC only reports "Failed to bind"; binding a plain socket the same way recovers
    the operating system's reason ("address in use", ...).
    """
    host, port = split_endpoint(endpoint)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as e:
        return os_reason(e)
    return "bind failed"


def os_reason(e: OSError) -> str:
    """``[Errno 98] Address already in use`` -> ``address in use``; plain text otherwise."""
    if e.errno == errno.EADDRINUSE:
        return "address in use"
    if e.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    if e.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host: {e.strerror}"
    return (e.strerror or str(e)).lower()


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` listens on loopback only (a host name other than
    ``localhost`` counts as reachable from elsewhere)."""
    host, _ = split_endpoint(endpoint)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- TLS

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class ServerTls:
    """A listener's TLS files, read and checked at start-up.

    gRPC takes the PEM bytes; aiohttp takes ``context``, built from the same files.
    """

    certificate_chain: bytes
    private_key: bytes
    # PEM CAs that client certificates must chain to; None: no client certificate asked.
    client_ca: bytes | None
    context: ssl.SSLContext


def tls_error(listener: str, key: str, path: Path, reason: str) -> OSError:
    """The error ``start`` raises when a listener's TLS files do not make a server:
    ``grpc on 0.0.0.0:4317: tls.cert_file '/etc/x.pem': cannot read: no such file``."""
    return OSError(f"{listener}: tls.{key} {str(path)!r}: {reason}")


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Without a password callback OpenSSL would prompt on the terminal for one.
    raise _EncryptedKey


def load_server_tls(listener: str, tls: TlsServerConfig) -> ServerTls:
    """Read ``tls``'s files and check that they make a server: the certificate chain and
    key parse and belong together, the client CA file holds certificates.

    ``listener`` (``"grpc on 0.0.0.0:4317"``) starts every error message. Raises
    ``OSError`` (``tls_error``). Blocking: call it in a thread.
    """
    assert tls.cert_file is not None and tls.key_file is not None, "validate() ensures both"
    files = {"cert_file": tls.cert_file, "key_file": tls.key_file}
    if tls.client_ca_file is not None:
        files["client_ca_file"] = tls.client_ca_file
    pem: dict[str, bytes] = {}
    for key, path in files.items():
        try:
            pem[key] = path.read_bytes()
        except OSError as e:
            raise tls_error(listener, key, path,
                            f"cannot read: {(e.strerror or str(e)).lower()}") from None

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except _EncryptedKey:
        raise tls_error(listener, "key_file", tls.key_file,
                        "the key is encrypted; give an unencrypted key (and keep the file "
                        "readable by the agent alone)") from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise tls_error(listener, "key_file", tls.key_file,
                            "does not match the certificate in tls.cert_file "
                            f"{str(tls.cert_file)!r}") from None
        # OpenSSL says only "PEM lib" for either file: find out which one it was.
        if not _holds_certificates(tls.cert_file):
            raise tls_error(listener, "cert_file", tls.cert_file,
                            "no PEM certificate in it") from None
        raise tls_error(listener, "key_file", tls.key_file, "no PEM private key in it") from None
    if tls.client_ca_file is not None:
        if not _holds_certificates(tls.client_ca_file):
            raise tls_error(listener, "client_ca_file", tls.client_ca_file,
                            "no PEM certificate in it")
        context.load_verify_locations(cafile=tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return ServerTls(pem["cert_file"], pem["key_file"], pem.get("client_ca_file"), context)


def _holds_certificates(path: Path) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        return False
    return True
