"""A plug-in model backend: ``facts-only``, the tools' statements and nothing else (no quoted
record lines, no similar cases). When no tool answered it writes nothing; the graph then treats it
like a model none of whose sentences held up: it gives the evidence answer instead and flags the
fallback (``Answer.fallback_used``, ``model`` "evidence (fallback from facts-only)")."""

from __future__ import annotations

from agent.backends import BackendRegistry, BackendSettings, Generation, Grounds, Message


class FactsOnly:
    """Composes from ``grounds``: each cited fact statement once, in order."""

    name = "facts-only"

    async def generate(self, messages: list[Message], grounds: Grounds | None = None) -> Generation:
        """The facts' statements, one per line; empty when there are none."""
        facts = grounds.facts if grounds is not None else ()
        text = "\n".join(dict.fromkeys(f.statement for f in facts if f.evidence))
        return Generation(text, self.name)

    async def aclose(self) -> None:
        """Nothing to release."""


def facts_only(settings: BackendSettings) -> FactsOnly:
    """The factory (the settings are not needed)."""
    return FactsOnly()


def register(registry: BackendRegistry) -> None:
    """The ``chartsight.backends`` entry point."""
    registry.add("facts-only", facts_only)
