"""DICOM over TLS (PS3.15 Annex B.1, the Basic TLS Secure Transport Connection Profile) for the listener and sender.

The listener serves TLS only when a certificate and key are configured: a
plain association on that port then fails the handshake. With a CA file it
can also require each sender to present a certificate that CA signed
(mutual TLS, how many PACS authenticate nodes). Results go to destinations
over TLS when ``tls_destinations`` is set, verifying the PACS's certificate
against the CA file (or the system's store) and its host name.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from service.errors import ConfigurationError


def server_context(
    cert_file: Path | None, key_file: Path | None, ca_file: Path | None, require_client_cert: bool
) -> ssl.SSLContext | None:
    """The listener's TLS context, or ``None`` for plain DICOM (no certificate configured).

    Raises
    ------
    ConfigurationError
        A certificate without its key (or the reverse), unreadable files, or
        client certificates required without a CA to check them against.
    """
    if cert_file is None and key_file is None:
        if require_client_cert:
            raise ConfigurationError("tls_require_client_cert needs the listener's tls_cert_file and tls_key_file")
        return None
    if cert_file is None or key_file is None:
        raise ConfigurationError("TLS needs both tls_cert_file and tls_key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
        if ca_file is not None:
            context.load_verify_locations(ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the listener's TLS files: {exc}") from exc
    if require_client_cert:
        if ca_file is None:
            raise ConfigurationError("tls_require_client_cert needs tls_ca_file to check the senders' certificates")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """The sender's TLS context: verify the PACS against ``ca_file`` (else the system store) and its host name.

    Our certificate and key, where configured, are presented for mutual TLS.

    Raises
    ------
    ConfigurationError
        Unreadable files.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca_file is not None:
            context.load_verify_locations(ca_file)
        if cert_file is not None and key_file is not None:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the sender's TLS files: {exc}") from exc
    return context
