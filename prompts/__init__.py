"""Prompt templates (Jinja2), loaded by name and version.

Templates live in ``prompts/<version>/<name>.jinja``. Every answer records the version it was made
with; a new wording is a new version folder, so old answers stay explainable.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from jinja2 import Environment, StrictUndefined

DEFAULT_VERSION = "v2"


@cache
def _environment() -> Environment:
    # Plain text prompts: no HTML escaping; undefined variables are errors, not empty strings.
    return Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


def versions() -> list[str]:
    """Prompt versions shipped."""
    root = files("prompts")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v"))


@cache
def template_text(name: str, version: str = DEFAULT_VERSION) -> str:
    """The Jinja source of ``prompts/<version>/<name>.jinja`` (read once). Raises ``KeyError``
    naming the versions shipped when there is no such prompt."""
    path = files("prompts").joinpath(version, f"{name}.jinja")
    if not path.is_file():
        raise KeyError(f"no prompt {name!r} in version {version!r} (have: {', '.join(versions())})")
    return path.read_text(encoding="utf-8")


def render(name: str, version: str = DEFAULT_VERSION, **values: Any) -> str:
    """The prompt ``name`` of ``version`` filled with ``values``."""
    return _environment().from_string(template_text(name, version)).render(**values).strip()
