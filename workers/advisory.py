"""The advisory notice that every result carries, in one wording.

The SR's comment, the overlay's burned-in banner and the overlay's Image
Comments all start with :data:`NOT_FOR_DIAGNOSTIC_USE`, so a radiologist
reads the same warning whichever object the viewer shows. It is ASCII
only: the overlay burns it in with a Hershey font.
"""

from __future__ import annotations

NOT_FOR_DIAGNOSTIC_USE = "AI result - not for diagnostic use"
