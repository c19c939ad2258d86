"""The patient a study belongs to, as a key that can be compared and stored without the identity itself.

One study is one patient's (PS3.3 C.7.1.1, C.7.2.1): a report built over
instances of two patients would file one patient's findings under the
other. The key is a SHA-256 of Issuer of Patient ID and Patient ID (the
pair that identifies a patient, PS3.3 C.7.1.1); it is kept in the spool,
which already holds the images, and never written to a log, a metric or a
queue message.
"""

from __future__ import annotations

import hashlib

from pydicom.dataset import Dataset


def patient_key(ds: Dataset) -> str:
    """The hex SHA-256 of ``IssuerOfPatientID`` and ``PatientID`` (empty where absent), whitespace trimmed."""
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    patient = str(ds.get("PatientID", "") or "").strip()
    return hashlib.sha256(f"{issuer}\x00{patient}".encode()).hexdigest()
