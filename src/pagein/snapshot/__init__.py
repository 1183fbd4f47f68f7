"""Snapshot formats and page sources (raw memory file, stores); see :mod:`.source`."""
