"""Structured logging: JSON (or console) lines on stderr, never patient identity.

Log lines may carry UIDs, AE titles, counts, durations and job ids. They
must never carry the attributes of the PS3.15 Annex E Basic Application
Level Confidentiality Profile that identify a person (name, ID, birth date,
accession number...). :func:`redact_patient_identity` enforces that for
keyword arguments. Event names are fixed snake_case strings by
convention (``listener_started``, ``job_retry``): what varies goes into
keyword arguments, never into the event.

Job and study context is bound with :func:`bind_job` through
``structlog.contextvars`` so that every line logged while a job is being
handled names it without passing loggers around.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from service.settings import Settings

REDACTED = "[redacted]"

# Normalised (lower case, no separators) keys that may identify a patient.
_IDENTITY_KEYS = frozenset(
    {
        "patientname",
        "patientid",
        "patientsname",
        "patientbirthdate",
        "patientbirthname",
        "birthdate",
        "dateofbirth",
        "dob",
        "patientbirthtime",
        "patientaddress",
        "patienttelephonenumbers",
        "patientmothersbirthname",
        "otherpatientids",
        "otherpatientidssequence",
        "otherpatientnames",
        "issuerofpatientid",
        "accession",
        "accessionnumber",
        "medicalrecordlocator",
        "referringphysicianname",
        "performingphysicianname",
        "operatorsname",
        "institutionname",
        "institutionaddress",
        "ssn",
        "mrn",
    }
)
_SEPARATORS = re.compile(r"[\s_\-.']")


def _is_identity_key(key: str) -> bool:
    return _SEPARATORS.sub("", key).lower() in _IDENTITY_KEYS


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and _is_identity_key(k) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(item) for item in value)
    return value


def redact_patient_identity(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace values of identity-bearing keys.

    Pure: looks only at the event dictionary, at any nesting depth of
    dicts, lists and tuples. The key stays (so that a reader sees that
    something was removed); its value becomes ``"[redacted]"``.
    """
    for key in list(event_dict):
        if _is_identity_key(key):
            event_dict[key] = REDACTED
        else:
            value = event_dict[key]
            if isinstance(value, (dict, list, tuple)):
                event_dict[key] = _scrub(value)
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_patient_identity,
    ]


def configure_logging(settings: Settings) -> None:
    """Send structlog and standard-library logging to stderr as one stream.

    Standard-library records (pynetdicom, pika) are rendered by the same
    processors. pynetdicom, pika and highdicom are held at WARNING: their INFO/DEBUG
    output dumps association and data set details (PS3.8 PDUs, element
    values) that may include patient identity.
    """
    level = logging.getLevelNamesMapping()[settings.log_level]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_shared_processors(), structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_breastai", False):
            root.removeHandler(existing)
    handler._breastai = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("pynetdicom", "pika", "highdicom"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # pydicom's validation warnings quote element values verbatim (a PN value
    # is a patient name), so only its errors are let through.
    logging.getLogger("pydicom").setLevel(max(level, logging.ERROR))
    # pika logs every failed connection attempt and every dropped idle connection at ERROR with a traceback; the
    # queue adapters report the same failure once, typed (queue_unavailable, queue_available), so pika's own go.
    logging.getLogger("pika").setLevel(max(level, logging.CRITICAL))
    silence_value_quoting_warnings()


def silence_value_quoting_warnings() -> None:
    """Stop pydicom and highdicom warnings, which quote header values, from reaching stderr.

    They are Python warnings, not log records, so no log processor sees
    them, and their text carries patient names and birth dates verbatim
    ("The string 'SMITH JANE' is unlikely to represent...", "Invalid value
    for VR DA: '19700102 '"). Value validation on reading is switched off
    for the same reason; objects we write are still validated.
    """
    import pydicom.config

    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\..*)?$")
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; ``name`` becomes the ``logger`` key."""
    return structlog.get_logger(name) if name is None else structlog.get_logger().bind(logger=name)


@contextmanager
def bind_job(job_id: str | None = None, study_uid: str | None = None) -> Iterator[None]:
    """Bind ``job_id`` / ``study_uid`` to every log line in this context.

    Uses ``structlog.contextvars`` so the binding follows the current thread
    (or task) and is undone on exit, even on error.
    """
    values = {k: v for k, v in (("job_id", job_id), ("study_uid", study_uid)) if v is not None}
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
