"""workers.uids: deterministic 2.25 UIDs."""

from __future__ import annotations

import pytest

from service.schema import is_valid_uid
from workers.uids import derive_uid


def test_same_parts_give_same_uid() -> None:
    assert derive_uid("1.2.3", "seg-1.0", "sr") == derive_uid("1.2.3", "seg-1.0", "sr")


def test_different_parts_give_different_uids() -> None:
    uids = {derive_uid("1.2.3", "seg-1.0", str(n)) for n in range(200)}
    assert len(uids) == 200
    assert derive_uid("a", "b") != derive_uid("b", "a")


def test_part_boundaries_matter() -> None:
    # Plain concatenation would make these equal.
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert derive_uid("abc") != derive_uid("ab", "c")


def test_uid_is_valid_2_25_form() -> None:
    uid = derive_uid("1.2.840.113619.2.5", "model", "0.1.0")
    assert uid.startswith("2.25.")
    assert is_valid_uid(uid)
    assert not uid[len("2.25.") :].startswith("0")


@pytest.mark.parametrize("parts", [(), ("a", 1)])
def test_bad_parts_are_refused(parts: tuple[object, ...]) -> None:
    with pytest.raises((ValueError, TypeError)):
        derive_uid(*parts)  # type: ignore[arg-type]
