"""Studies to send, a PACS-like sender that keeps every per-instance status, and counting what came back."""

from __future__ import annotations

import copy
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.e2e.results import SC_CLASS, SR_CLASS
from tests.integration.orthanc import OrthancServer


@dataclass(frozen=True)
class Study:
    """One study's instances, ready to C-STORE."""

    study_uid: str
    instances: tuple[Dataset, ...]


@dataclass
class Sent:
    """Every C-STORE status the listener answered, per SOP Instance UID (a re-send appends)."""

    statuses: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, sop_instance_uid: str, status: int) -> None:
        with self.lock:
            self.statuses.setdefault(sop_instance_uid, []).append(status)

    def acknowledged(self) -> set[str]:
        """SOP Instance UIDs the listener answered 0x0000 at least once: each of these must reach a report."""
        return {uid for uid, statuses in self.statuses.items() if 0x0000 in statuses}

    def failures(self) -> Counter[int]:
        return Counter(status for statuses in self.statuses.values() for status in statuses if status != 0x0000)


def copies_of(sources: list[Path], studies: int, prefix: str = "FAULT") -> list[Study]:
    """``studies`` new studies, each holding a copy of every source image under fresh UIDs and its own patient."""
    templates = [pydicom.dcmread(path) for path in sources]
    made: list[Study] = []
    for number in range(studies):
        study_uid = generate_uid()
        series_uid = generate_uid()
        instances = []
        for index, template in enumerate(templates):
            ds = copy.deepcopy(template)  # Dataset.copy() is shallow: the copies would share their elements
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = index + 1
            ds.PatientID = f"{prefix}-{number:04d}"
            ds.AccessionNumber = f"A{number:06d}"
            instances.append(ds)
        made.append(Study(study_uid, tuple(instances)))
    return made


def send(port: int, instances: list[Dataset], sent: Sent, *, release: bool = True) -> object:
    """C-STORE ``instances`` over one association, recording each status; returns the association.

    With ``release=False`` the association is left open (a modality or PACS
    still sending), for a test that kills the listener under it.
    """
    ae = AE(ae_title="FAULTPACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for context in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in instances}:
        ae.add_requested_context(context[0], context[1])
    assoc = ae.associate("127.0.0.1", port, ae_title="BREASTAI")
    if not assoc.is_established:
        for ds in instances:
            sent.record(str(ds.SOPInstanceUID), -1)
        return assoc
    for ds in instances:
        status = assoc.send_c_store(ds)
        sent.record(str(ds.SOPInstanceUID), int(status.Status) if status else -1)
    if release:
        assoc.release()
    return assoc


def send_concurrently(port: int, studies: list[Study], associations: int, sent: Sent) -> None:
    """Send the studies over ``associations`` concurrent associations, studies dealt round-robin."""
    shares = [studies[i::associations] for i in range(associations)]
    threads = [
        threading.Thread(target=send, args=(port, [ds for study in share for ds in study.instances], sent))
        for share in shares
        if share
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)


def results_by_study(pacs: OrthancServer) -> dict[str, Counter[str]]:
    """For every study in the PACS: how many reports (SR) and overlays (SC) it holds, from the series' instances."""
    found: dict[str, Counter[str]] = {}
    for study in pacs.get("/studies?expand"):
        counts: Counter[str] = Counter()
        for series_id in study["Series"]:
            instances = pacs.get(f"/series/{series_id}/instances?expand")
            for instance in instances:
                sop_class = pacs.get(f"/instances/{instance['ID']}/metadata/SopClassUid")
                if sop_class == SR_CLASS:
                    counts["SR"] += 1
                elif sop_class == SC_CLASS:
                    counts["SC"] += 1
        found[study["MainDicomTags"]["StudyInstanceUID"]] = counts
    return found


def reports_by_study(pacs: OrthancServer) -> Counter[str]:
    """Study Instance UID -> reports (SR series' instances) in the PACS; one REST call, cheap enough to poll."""
    counts: Counter[str] = Counter()
    studies = {study["ID"]: study["MainDicomTags"]["StudyInstanceUID"] for study in pacs.get("/studies?expand")}
    for series in pacs.get("/series?expand"):
        if series["MainDicomTags"].get("Modality") == "SR":
            counts[studies[series["ParentStudy"]]] += len(series["Instances"])
    return counts
