"""The root of ChartSight's one exception hierarchy, in a package every layer may import
(``common`` sits below ``connectors``): ``ChartSightError`` and ``ConfigurationError``, and
``scrub``, which keeps URLs and file paths out of what a caller outside is told. Each layer adds
its own subclasses (``ConnectorError`` in ``connectors.errors``, ``CaseIndexError``, ``ToolError``,
``Unauthenticated``).

Each error's message is one line a user can act on; the underlying exception is chained
(``raise ... from exc``) for developers.
"""

from __future__ import annotations

import re

# what a message for a caller outside the deployment never shows: URLs and file paths
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>)]+")
_PATH = re.compile(r"(?<![\w.\]])(?:[A-Za-z]:)?[/\\](?:[\w.@%+~-]+[/\\])+[\w.@%+~-]*")
_REFERENCE = re.compile(r"(?:^|[/#])([A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64})$")


def scrub(text: str) -> str:
    """``text`` with every URL and file path replaced by "<url>" / "<path>"."""
    return _PATH.sub("<path>", _URL.sub("<url>", text))


def _reference_in(url: str) -> str | None:
    """The ``Type/id`` a URL or "<source>#Type/id" names, if any."""
    found = _REFERENCE.search(url.split("?")[0].rstrip("/"))
    return found.group(1) if found else None


class ChartSightError(Exception):
    """Base of every error ChartSight raises on purpose."""

    # What a caller outside is told where the message itself names internals (a server, a
    # database); None: the message, scrubbed. A subclass sets it or overrides ``public``.
    said: str | None = None

    @property
    def public(self) -> str:
        """The message for a caller outside this deployment (HTTP, CDS Hooks, MCP): what they
        sent and what went wrong, never a server's URL, a file path or a setting. The full
        message (``str(exc)``) is for the operator's terminal and logs."""
        return scrub(str(self)) if self.said is None else self.said


class ConfigurationError(ChartSightError):
    """Settings are missing or contradictory."""
