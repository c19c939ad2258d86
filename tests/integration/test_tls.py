"""DICOM TLS (PS3.15 B.1) on the listener and the sender, with certificates made here by openssl.

The listener with a certificate speaks TLS only: a plain association fails.
With client certificates required, a sender without one is refused. The
result sender verifies the PACS's certificate and host name, and refuses a
PACS its CA did not sign.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import UltrasoundImageStorage  # type: ignore[attr-defined]

from service.errors import ConfigurationError, DestinationUnavailable
from service.settings import Destination, Settings
from service.tls import client_context, server_context
from tests.integration.listener_harness import SCP_AE, Service
from workers.sender import store_to_pacs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates"),
]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, ca: str, folder: Path, alt_names: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
    (folder / f"{name}.ext").write_text(f"subjectAltName={alt_names}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=BreastAI test {ca}", cwd=folder)  # fmt: skip
    _signed("listener", "ca", folder, "DNS:localhost,IP:127.0.0.1")
    _signed("modality", "ca", folder, "DNS:modality")
    return folder


def _scu(tls: object | None) -> tuple[AE, dict[str, object]]:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(UltrasoundImageStorage, ExplicitVRLittleEndian)
    return ae, ({"tls_args": (tls, "127.0.0.1")} if tls is not None else {})


def _tls_service(start_service: Callable[..., Service], certificates: Path, **extra: object) -> Service:
    return start_service(
        tls_cert_file=certificates / "listener.pem", tls_key_file=certificates / "listener.key", **extra
    )


def test_a_tls_listener_stores_over_tls_and_refuses_plain_dicom(
    start_service: Callable[..., Service], certificates: Path, us_dataset: Callable[..., Dataset]
) -> None:
    service = _tls_service(start_service, certificates)
    ae, tls = _scu(client_context(certificates / "ca.pem", None, None))
    assoc = ae.associate("127.0.0.1", service.port, ae_title=SCP_AE, **tls)  # type: ignore[arg-type]
    assert assoc.is_established
    assert assoc.send_c_store(us_dataset()).Status == 0x0000
    assoc.release()
    plain, _ = _scu(None)
    refused = plain.associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert not refused.is_established, "a plain association on the TLS port must fail"
    assert len(service.incoming()) == 1


def test_client_certificates_when_required(
    start_service: Callable[..., Service], certificates: Path, us_dataset: Callable[..., Dataset]
) -> None:
    service = _tls_service(
        start_service, certificates, tls_ca_file=certificates / "ca.pem", tls_require_client_cert=True
    )
    anonymous, tls = _scu(client_context(certificates / "ca.pem", None, None))
    assert not anonymous.associate("127.0.0.1", service.port, ae_title=SCP_AE, **tls).is_established  # type: ignore[arg-type]
    known = client_context(certificates / "ca.pem", certificates / "modality.pem", certificates / "modality.key")
    ae, tls = _scu(known)
    assoc = ae.associate("127.0.0.1", service.port, ae_title=SCP_AE, **tls)  # type: ignore[arg-type]
    assert assoc.is_established and assoc.send_c_store(us_dataset()).Status == 0x0000
    assoc.release()


def test_the_result_sender_verifies_the_pacs_certificate(
    start_service: Callable[..., Service], certificates: Path, us_dataset: Callable[..., Dataset]
) -> None:
    pacs = _tls_service(start_service, certificates)  # our own TLS listener stands in for a TLS PACS
    destination = Destination.parse(f"{SCP_AE}@127.0.0.1:{pacs.port}")
    store_to_pacs(
        [us_dataset()], destination, "BREASTAI", timeout_s=5, tls=client_context(certificates / "ca.pem", None, None)
    )
    assert len(pacs.incoming()) == 1
    stranger = client_context(certificates / "other-ca.pem", None, None)
    with pytest.raises(DestinationUnavailable):
        store_to_pacs([us_dataset()], destination, "BREASTAI", timeout_s=5, tls=stranger)
    assert len(pacs.incoming()) == 1


def test_tls_settings_that_cannot_work_stop_the_start(certificates: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="both"):
        server_context(certificates / "listener.pem", None, None, False)
    with pytest.raises(ConfigurationError, match="tls_ca_file"):
        server_context(certificates / "listener.pem", certificates / "listener.key", None, True)
    with pytest.raises(ConfigurationError, match="cannot load"):
        server_context(tmp_path / "missing.pem", tmp_path / "missing.key", None, False)
    settings = Settings(tls_destinations=True, tls_ca_file=certificates / "ca.pem", metrics_port=0)
    assert settings.tls_destinations and settings.tls_require_client_cert is False
