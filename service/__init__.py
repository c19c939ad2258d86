"""The process shell and the DICOM edge of BreastAI.

Settings, logging, metrics, the StudyJob schema, queue adapters, the
listener (Storage SCP), the spool, durable file writes (shared with the
workers' result folders) and the study tracker. This package knows
DICOM networking and nothing of models; it imports neither ``workers`` nor
``models``.
"""
