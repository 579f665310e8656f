"""The case index's errors: one line for a user, the cause chained for a developer."""

from __future__ import annotations

from connectors.errors import ChartSightError


class CaseIndexError(ChartSightError):
    """The case index cannot be used as asked (a damaged file, an unsupported factory string,
    vectors of the wrong shape)."""


class IndexMismatch(CaseIndexError):
    """The index was built with other encoders, fusion or dimensions than the settings ask for."""
