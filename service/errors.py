"""The one exception tree of BreastAI.

::

    BreastAIError
    ├── ConfigurationError          bad settings; the process refuses to start
    ├── TransientError              retry later with backoff (PACS down, broker gone)
    │   ├── DestinationUnavailable  a C-STORE destination refused or did not answer
    │   └── QueueUnavailable        the broker is unreachable or closed the channel
    └── PermanentError              never retried; the job is dead-lettered with the reason
        ├── InvalidInstance         a received object is not usable DICOM
        │   ├── PatientConflict     an instance of a study that already holds another patient's images
        │   └── ImageTooLarge       an image that declares more pixels than the limits allow decoding
        ├── UnsupportedInput        SOP class, transfer syntax or photometry we do not handle
        ├── IntegrityError          a spooled file no longer matches its recorded sha256
        ├── JobSchemaError          a StudyJob message that does not parse or has a wrong version
        └── ResultRejected          a destination refused a result with a non-transient failure status

Queue consumers decide between requeue and dead-letter on this split alone.
"""

from __future__ import annotations


class BreastAIError(Exception):
    """Root of every error raised on purpose by BreastAI."""


class ConfigurationError(BreastAIError):
    """Settings that cannot work (bad port, unknown destination syntax...)."""


class TransientError(BreastAIError):
    """A failure that may go away by itself: retry with backoff."""


class DestinationUnavailable(TransientError):
    """A C-STORE destination refused the association or did not answer."""


class QueueUnavailable(TransientError):
    """The message broker is unreachable or closed the connection."""


class PermanentError(BreastAIError):
    """A failure that retrying cannot fix: dead-letter with the reason."""


class InvalidInstance(PermanentError):
    """A received object is not usable DICOM (truncated, missing UIDs...)."""


class PatientConflict(InvalidInstance):
    """An instance whose patient differs from the one its study is bound to: never mixed into one report."""


class ImageTooLarge(InvalidInstance):
    """An image whose declared rows x columns x frames x samples x bits exceed the decoding limits."""


class UnsupportedInput(PermanentError):
    """A SOP class, transfer syntax or pixel format that is not handled."""


class IntegrityError(PermanentError):
    """A spooled file does not match the sha256 recorded in its job."""


class JobSchemaError(PermanentError):
    """A StudyJob document that does not parse or has an unknown version."""


class ResultRejected(PermanentError):
    """A destination answered a result C-STORE with a failure status that retrying cannot change."""
