"""Turn a StudyJob into results in the PACS.

Consumer, routing, DICOM reading, result writing (highdicom) and sending.
Imports ``service`` (schema, settings, telemetry) and ``models``.
"""
