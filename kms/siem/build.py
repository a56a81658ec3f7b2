"""The sinks ``[siem]`` configures, built and checked before the KME serves.

A setting that cannot work is a configuration error, reported in one line when ``qkms serve``
starts (``SiemConfigError``): a file that cannot be opened for appending, a receiver host name that
does not resolve, a CA, client certificate or key that cannot be loaded. A receiver that is merely
down is not: the shipper retries, and the database keeps every record until it is delivered.
"""

from __future__ import annotations

import socket
import ssl

from kms.config import KmsSettings, SiemSyslogSection
from kms.siem.file_sink import FileSink
from kms.siem.sink import Sink, SinkError
from kms.siem.syslog_sink import SyslogSink, SyslogTarget


class SiemConfigError(RuntimeError):
    """``[siem]`` cannot work as configured; the message is one line."""


def build_sinks(settings: KmsSettings) -> list[Sink]:
    """Every configured sink, checked (raises :class:`SiemConfigError`)."""
    siem, kme_id = settings.siem, settings.kme.id
    sinks: list[Sink] = []
    if siem.file is not None:
        file_sink = FileSink(siem.file, kme_id, siem.fsync)
        try:
            file_sink.check()
        except SinkError as exc:
            raise SiemConfigError(str(exc)) from exc
        finally:
            file_sink.reset()
        sinks.append(file_sink)
    if siem.syslog is not None:
        sinks.append(SyslogSink(syslog_target(siem.syslog), kme_id))
    return sinks


def syslog_target(cfg: SiemSyslogSection) -> SyslogTarget:
    try:
        socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise SiemConfigError(f"siem.syslog.host {cfg.host!r} does not resolve: {exc}") from exc
    context = _tls_context(cfg) if cfg.transport == "tls" else None
    return SyslogTarget(
        host=cfg.host,
        port=cfg.port,
        tls=context,
        server_name=cfg.server_name or cfg.host,
        facility=cfg.facility,
        hostname=cfg.hostname or socket.gethostname(),
        connect_timeout=cfg.connect_timeout_seconds,
        confirm_seconds=cfg.confirm_seconds,
    )


def _tls_context(cfg: SiemSyslogSection) -> ssl.SSLContext:
    """TLS 1.2 or newer; the receiver's certificate checked against the CA and its name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(cfg.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise SiemConfigError(
            f"siem.syslog.ca_file {cfg.ca_file} is not a usable CA certificate file: {_why(exc)}"
        ) from exc
    if cfg.client_cert is not None and cfg.client_key is not None:
        try:
            context.load_cert_chain(str(cfg.client_cert), str(cfg.client_key))
        except (OSError, ssl.SSLError) as exc:
            raise SiemConfigError(
                f"siem.syslog.client_cert {cfg.client_cert} and client_key cannot be used: {_why(exc)}"
            ) from exc
    return context


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
