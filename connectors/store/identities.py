"""Which resources one imported file names, so that a file names each resource once.

FHIR R4 Bundle invariant bdl-7: "FullUrl must be unique in a bundle, or else entries with the
same fullUrl must have different meta.versionId (except in history bundles)"; the transaction rules of the RESTful API refuse
overlapping identities too (http.html#trules). NDJSON lines are held to the same rule by
``Type/id``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from connectors.errors import FhirImportError
from connectors.store.parsing import brief


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Identities:
    """The resources one file has named so far, to refuse two entries for one resource.

    A file names each ``Type/id`` and each ``fullUrl`` once, unless ``meta.versionId`` tells the
    entries apart as versions of one resource (FHIR R4 Bundle invariant bdl-7). Of versions, the
    one with the later ``meta.lastUpdated`` is kept (the later in the file when that does not
    decide); the others are listed in ``superseded``. Holds a small tuple per resource.
    """

    def __init__(self, origin: str, entry_word: str = "entry") -> None:
        self.origin = origin
        self.entry_word = entry_word
        # Type/id -> (entry index or line number, fullUrl, versionId, lastUpdated)
        self.by_key: dict[str, tuple[int, str | None, str | None, datetime | None]] = {}
        self.by_url: dict[str, tuple[int, str]] = {}
        self.versions: dict[tuple[str, str], int] = {}  # only for entries with a versionId
        self.superseded: list[str] = []

    def _name(self, index: int, full_url: str | None) -> str:
        return f"{self.entry_word} {index}" + (f" (fullUrl {full_url})" if full_url else "")

    def claim(self, key: str, full_url: str | None, index: int, meta: Any) -> str:
        """Record the entry ``index`` for the resource ``key`` (``Type/id``).

        Returns "new" for a resource not named before, "newer" when this entry's version replaces
        an earlier one, "older" when an earlier entry holds a newer version. Raises
        ``FhirImportError`` naming both entries when they are not told apart by versionId, or when
        one fullUrl names two resources.
        """
        meta = meta if isinstance(meta, dict) else {}
        version = meta.get("versionId") if isinstance(meta.get("versionId"), str) else None
        updated = _instant(meta.get("lastUpdated"))
        word = self.entry_word
        if version is not None:
            # One version twice, even with another version between them.
            first = self.versions.setdefault((key, version), index)
            if first != index:
                raise FhirImportError(
                    self.origin,
                    f"both are {key} version {version}: a file may hold a resource once, or "
                    "versions with different meta.versionIds (FHIR Bundle invariant bdl-7)",
                    f"{word} {first} and {word} {index}",
                )
        if full_url:
            seen_url = self.by_url.setdefault(full_url, (index, key))
            if seen_url[1] != key:
                raise FhirImportError(
                    self.origin,
                    f"one fullUrl {brief(full_url)} names two resources, {seen_url[1]} and "
                    f"{key}; a Bundle's fullUrls are unique (FHIR Bundle invariant bdl-7)",
                    f"{word} {seen_url[0]} and {word} {index}",
                )
        earlier = self.by_key.get(key)
        if earlier is None:
            self.by_key[key] = (index, full_url, version, updated)
            return "new"
        e_index, e_url, e_version, e_updated = earlier
        if version is None or e_version is None or version == e_version:
            raise FhirImportError(
                self.origin,
                f"both are {key}: {self._name(e_index, e_url)} and {self._name(index, full_url)}, "
                "not told apart by meta.versionId; a file may hold a resource once, or versions "
                "with different versionIds (FHIR Bundle invariant bdl-7)",
                f"{word} {e_index} and {word} {index}",
            )
        if e_updated is not None and updated is not None and updated < e_updated:
            self.superseded.append(
                f"{word} {index}: {key} version {version} is older than version {e_version} "
                f"({word} {e_index})"
            )
            return "older"
        self.by_key[key] = (index, full_url, version, updated)
        self.superseded.append(
            f"{word} {e_index}: {key} version {e_version} superseded by version {version} "
            f"({word} {index})"
        )
        return "newer"
