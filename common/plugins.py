"""The one plug-in contract every extensible registry of ChartSight follows.

A registry holds named items of one kind: tools (``chartsight.tools``), planner rules
(``chartsight.planner_rules``), model backends (``chartsight.backends``), evidence compactors
(``chartsight.compactors``) and encoders (``chartsight.encoders``). An installed package extends one
through an entry point in that group whose object is ``register(registry) -> None``; it calls
``registry.add(name, item)``. Adding a name that is already registered (a built-in, or another
plug-in's) is refused unless the plug-in says ``replace=True``; a replacement is logged and listed in
``registry.replaced``. A plug-in that fails to load or to register is logged and left out: it never
takes the built-ins down. Entry points are read in the order ``importlib.metadata`` gives.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoints, entry_points
from typing import Any, Generic, TypeVar

from common.errors import ChartSightError

log = logging.getLogger(__name__)

T = TypeVar("T")

# what sys.path held then (each entry with its modification time), and every entry point
# (SelectableGroups on Python 3.11, EntryPoints from 3.12)
_scanned: tuple[tuple[tuple[str, float], ...], Any] | None = None


def installed_entry_points(group: str) -> EntryPoints:
    """The entry points of ``group`` in the distributions on ``sys.path``. ``importlib.metadata``
    reads every installed distribution's metadata on each call (≈25 ms for a development
    environment's ≈220 distributions, and a question's first run asks for five groups), so the
    scan is kept while ``sys.path`` and the modification time of each of its folders stay the
    same: a plug-in folder added at run time, or a package installed into the running
    environment (a new ``.dist-info`` folder), is seen on the next call; an edit inside an
    existing metadata folder (a development package's ``egg-info`` regenerated) is seen after a
    restart."""
    global _scanned
    key = tuple((entry, _mtime(entry)) for entry in sys.path)
    scanned = _scanned
    if scanned is None or scanned[0] != key:
        scanned = _scanned = (key, entry_points())
    found: EntryPoints = scanned[1].select(group=group)
    return found


def _mtime(path: str) -> float:
    try:
        return os.stat(path or ".").st_mtime
    except OSError:
        return -1.0


class PluginError(ChartSightError):
    """A plug-in could not be registered (a name clash without ``replace=True``, a wrong type)."""


class Registry(Generic[T]):
    """Named items of one kind. ``kind`` names them in messages ("tool"); ``group`` is the entry
    point group plug-ins use. ``replaced`` maps each replaced name to the entry point (or
    ``"code"``) that replaced it."""

    kind = "item"
    group = ""

    def __init__(self) -> None:
        self.items: dict[str, T] = {}
        self.replaced: dict[str, str] = {}
        self._loading: str = "code"

    def add(self, name: str, item: T, *, replace: bool = False) -> T:
        """Register ``item`` under ``name`` and return it. Raises ``PluginError`` when the name is
        taken and ``replace`` is false, or when ``item`` is not what this registry holds."""
        self.check(name, item)
        if name in self.items:
            if not replace:
                raise PluginError(
                    f"{self.kind} {name!r} is already registered; a plug-in replaces it only "
                    "with replace=True"
                )
            self.replaced[name] = self._loading
            log.info("%s %r replaced by %s", self.kind, name, self._loading)
        self.items[name] = item
        return item

    def check(self, name: str, item: T) -> None:
        """Raise ``PluginError`` when ``item`` cannot be registered as ``name`` (subclasses check
        the item's type)."""
        if not name or not isinstance(name, str):
            raise PluginError(f"a {self.kind} needs a non-empty name, not {name!r}")

    def __getitem__(self, name: str) -> T:
        return self.items[name]

    def get(self, name: str) -> T | None:
        """The item registered as ``name``, or None."""
        return self.items.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.items

    def __iter__(self) -> Iterator[str]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self.items)

    def load_entry_points(self, group: str | None = None) -> list[str]:
        """Call every installed ``register(registry)`` of ``group`` (default: the registry's own);
        returns the names of the entry points that loaded. Failures are logged, not raised."""
        loaded = []
        for ep in installed_entry_points(group or self.group):
            self._loading = f"plug-in {ep.name} ({ep.value})"
            try:
                register: Callable[[Registry[T]], None] = ep.load()
                register(self)
                loaded.append(ep.name)
            except Exception as exc:  # a broken plug-in must not take the built-ins down
                log.warning("%s plug-in %s failed to load: %s", self.kind, ep.name, exc)
            finally:
                self._loading = "code"
        return loaded
