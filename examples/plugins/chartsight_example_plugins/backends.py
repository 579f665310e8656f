"""A plug-in model backend: ``facts-only``, the tools' statements and nothing else (no quoted
record lines, no similar cases): for a site that shows only computed facts. It abstains when no
tool answered."""

from __future__ import annotations

from agent.backends import BackendRegistry, BackendSettings, Generation, Grounds, Message


class FactsOnly:
    """Composes from ``grounds``: each cited fact statement once, in order."""

    name = "facts-only"

    async def generate(self, messages: list[Message], grounds: Grounds | None = None) -> Generation:
        """The facts' statements joined; empty (the answer abstains) when there are none."""
        facts = grounds.facts if grounds is not None else ()
        text = " ".join(dict.fromkeys(f.statement for f in facts if f.evidence))
        return Generation(text, self.name)

    async def aclose(self) -> None:
        """Nothing to release."""


def facts_only(settings: BackendSettings) -> FactsOnly:
    """The factory (the settings are not needed)."""
    return FactsOnly()


def register(registry: BackendRegistry) -> None:
    """The ``chartsight.backends`` entry point."""
    registry.add("facts-only", facts_only)
