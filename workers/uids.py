"""Deterministic DICOM UIDs for result objects.

Result objects (SR, SC overlays) must get the same UIDs when a job is
redelivered, so that the PACS de-duplicates instead of storing a second
report (see "Idempotent results" in the architecture notes). UIDs are
therefore derived from what identifies a result (study, pipeline, model
version, source instance...) rather than drawn at random.

The ``2.25.<integer>`` form (PS3.5 §B.2, a UUID-derived UID) needs no
registered root, which suits an open-source product installed by many
sites. The UUID is name-based (RFC 4122 version 5: the first 128 bits of
the SHA-1 of a fixed BreastAI namespace and the parts, with 6 bits set to
the version and variant), the standard way to make a UUID from a name. ``pydicom.uid.generate_uid(prefix=None)`` is not
used because it ignores its entropy sources and draws a random UUID4.
"""

from __future__ import annotations

import json
import uuid

# Namespace of all BreastAI name-based UUIDs; changing it changes every UID.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://breastai.invalid/dicom-uid")


def derive_uid(*parts: str) -> str:
    """Derive a DICOM UID deterministically from ``parts``.

    Parameters
    ----------
    *parts
        The strings that identify the object, in a fixed order. At least one
        is required.

    Returns
    -------
    str
        A UID of the form ``2.25.<integer>`` (PS3.5 §B.2), at most 44
        characters (the integer is the 128-bit UUID, at most 39 digits),
        equal for equal ``parts`` and different for different ones up to
        a collision of the 122 hash bits a version-5 UUID keeps of SHA-1.

    Raises
    ------
    ValueError
        If no part is given.
    TypeError
        If a part is not a ``str``.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"derive_uid parts must be str, got {type(part).__name__}: {part!r}")
    # A JSON array keeps the part boundaries: ("ab", "c") and ("a", "bc")
    # would collide if the parts were simply concatenated.
    name = json.dumps(list(parts), ensure_ascii=True, separators=(",", ":"))
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
