"""The answer prompt: what a model writes its answer from, small enough for a small model.

- Each fact once: the tools' statements are listed once, and an evidence line a statement already
  says word for word is not listed again (the statement carries its citation).
- Evidence that relates to the question: the lines the facts cite, then the ranked lines that match
  the question (its words, a concept or code of the term table, a category it names, or what holds
  now when it asks so: a ``lexical``, ``code``, ``category`` or ``active`` part above 0 in
  ``retrieval.rank``'s scores), best first, within ``BackendSettings.evidence_tokens`` (estimated
  as characters / 4, ``retrieval.rank.approx_tokens``). When no ranked line matches, the
  ``CLOSEST`` best-ranked lines are added as the closest evidence (rule 4 of the system prompt).
- Short citation aliases: every record id a sentence may cite (``given``) is written ``E1``,
  ``E2`` … in order of first appearance. A 36-character id costs ~25 tokens and small models copy it
  wrong; ``AnswerPrompt.resolve`` maps the aliases in the model's answer back to the ids before the
  verifier reads it. An alias the prompt did not give is left as written: a sentence citing only
  such aliases, or one in the same brackets as given ones (``[E1, E99]``), cites nothing the
  verifier knows and is removed, as a sentence citing an unknown id is; in brackets of its own
  next to a given alias (``[E1] [E99]``) it is not read as a citation, and the sentence stands or
  falls on the given one.
- The thread's earlier answers go back to the model without their citations (their ids are not
  this question's aliases).

Measured with SmolLM2-135M's tokenizer on the demo patient (``tests/agent/test_answer_prompt.py``):
"What was his last HbA1c?" went from 3,824 tokens to 1,019.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import prompts
from agent.answer import FactUsed, SentenceCheck, SimilarCase
from agent.backends import Message
from agent.grounding import uncited
from connectors.images import PatientImage
from retrieval.evidence import clean_text
from retrieval.rank import approx_tokens

CLOSEST = 3  # lines shown when nothing relates to the question (rule 4: cite the closest)
MAX_SENTENCES = 6
HISTORY_TURNS = 3
RELATED_PARTS = ("lexical", "code", "category", "active")  # the parts that tie a line to the words
# a record id as a citation names it: Type/id (the verifier's form, ``agent.grounding``)
_REF = re.compile(r"\b[A-Z][A-Za-z]+/[A-Za-z0-9\-.#]+")
_ALIASES = re.compile(r"\[\s*(E\d+(?:\s*[,;]\s*E\d+)*)\s*\]")
_TRAILING_REF = re.compile(r"\s*\[[A-Z][A-Za-z]+/[^\]]+\]\s*$")


@dataclass
class Aliases:
    """Short aliases (``E1``, ``E2`` …) for the record ids a sentence may cite, numbered in order of
    first use. ``citable`` is the verifier's map (id → text); ids outside it are left alone (a
    LOINC unit such as ``[Mass/volume]`` looks like one)."""

    citable: Mapping[str, str]
    by_ref: dict[str, str] = field(default_factory=dict)

    def of(self, ref: str) -> str:
        """The alias of ``ref`` (``"E3"``), given it the first time it is asked for."""
        if ref not in self.by_ref:
            self.by_ref[ref] = f"E{len(self.by_ref) + 1}"
        return self.by_ref[ref]

    def text(self, text: str) -> str:
        """``text`` with every citable id written as its alias."""
        return _REF.sub(
            lambda m: self.of(m.group(0)) if m.group(0) in self.citable else m.group(0), text
        )

    def refs(self) -> dict[str, str]:
        """Alias → record id, for every alias handed out."""
        return {alias: ref for ref, alias in self.by_ref.items()}


def resolve(text: str, refs: Mapping[str, str]) -> str:
    """``text`` with its bracketed aliases (``[E1]``, ``[E1, E2]``, ``[E1; E2]``) written as the
    record ids of ``refs`` (alias → id); a group with an alias not in ``refs`` is left as written."""

    def one(match: re.Match[str]) -> str:
        names = re.split(r"\s*[,;]\s*", match.group(1))
        if not all(name in refs for name in names):
            return match.group(0)
        return "[" + ", ".join(refs[name] for name in names) + "]"

    return _ALIASES.sub(one, text)


@dataclass(frozen=True)
class AnswerPrompt:
    """The messages for the model and the aliases they use (alias → record id)."""

    messages: list[Message]
    aliases: dict[str, str]

    def resolve(self, text: str) -> str:
        """The model's answer with its aliases mapped back to record ids (``resolve``)."""
        return resolve(text, self.aliases)


def related(scores: Mapping[str, float]) -> bool:
    """Whether a ranked line matches the question itself, not only by recency or embedding
    closeness (``RELATED_PARTS`` of ``retrieval.rank``'s score parts)."""
    return any(scores.get(part, 0.0) > 0 for part in RELATED_PARTS)


def evidence_lines(
    facts: Sequence[FactUsed],
    ranked: Mapping[str, str],
    scores: Mapping[str, Mapping[str, float]],
    all_lines: Mapping[str, str],
    budget: int,
) -> dict[str, str]:
    """The evidence lines for the prompt (id → line, in prompt order): the lines the facts cite,
    then the related ranked lines, best first, each once, while ``budget`` tokens
    (``approx_tokens``) last; a line a fact's statement already says is left out; the Patient's
    line is the prompt's first line already. When no ranked line relates, the ``CLOSEST`` best-ranked
    lines are added as the closest evidence."""
    statements = [f.statement for f in facts]
    cited = [ref for f in facts for ref in f.evidence]
    wanted = [*cited, *(ref for ref in ranked if related(scores.get(ref, {})))]
    if not any(related(scores.get(ref, {})) for ref in ranked):
        # nothing matched the question's words: the best-ranked lines are the closest evidence
        wanted += [ref for ref in ranked if not ref.startswith("Patient/")][:CLOSEST]
    chosen: dict[str, str] = {}
    spent = 0
    for ref in dict.fromkeys(wanted):
        line = ranked.get(ref) or all_lines.get(ref)
        if not line or ref.startswith("Patient/"):
            continue
        body = _TRAILING_REF.sub("", line)
        if any(body in statement for statement in statements):
            continue  # the fact says it, with its citation
        cost = approx_tokens(line)
        if spent + cost > budget:
            continue  # a shorter line further down may still fit
        chosen[ref] = line
        spent += cost
    return chosen


def answer_prompt(
    state: Mapping[str, Any],
    citable: Mapping[str, str],
    *,
    evidence_tokens: int,
    images: tuple[PatientImage, ...] = (),
    version: str = prompts.DEFAULT_VERSION,
) -> AnswerPrompt:
    """The system prompt, the thread's last ``HISTORY_TURNS`` turns (uncited), and the question
    with its facts and evidence, aliased; on a retry (``attempts`` > 0 with a ``draft``) also the
    draft and the verifier's findings. ``state`` is the graph's (``agent.state.AskState``: reads
    ``patient_line``, ``question``, ``facts``, ``evidence``, ``evidence_scores``, ``all_lines``,
    ``similar``, ``images``, ``history``, ``attempts``, ``draft``, ``checked``); ``citable`` is what
    a sentence may cite (``agent.grounding.evidence_map``); ``images`` are attached to the question."""
    aliases = Aliases(citable)
    facts: list[FactUsed] = list(state.get("facts", []))
    # the demographics line cites the Patient: by alias when it may be cited, else not at all
    patient_line = _TRAILING_REF.sub("", aliases.text(state.get("patient_line", "")))
    statements = [aliases.text(s) for s in dict.fromkeys(f.statement for f in facts)]
    lines = evidence_lines(
        facts,
        state.get("evidence", {}),
        state.get("evidence_scores", {}),
        state.get("all_lines", {}),
        evidence_tokens,
    )
    similar: list[SimilarCase] = list(state.get("similar", []))
    user = prompts.render(
        "answer",
        version,
        patient_line=patient_line,
        question=state["question"],
        facts=statements,
        evidence=[aliases.text(line) for line in lines.values()],
        similar=[aliases.text(f"{clean_text(c.summary, 200)} [{c.key}]") for c in similar],
        images=[
            aliases.text(f"{i.modality or 'image'} [{i.reference}]")
            for i in state.get("images", [])
        ],
    )
    messages = [Message("system", prompts.render("system", version, max_sentences=MAX_SENTENCES))]
    for turn in state.get("history", [])[-HISTORY_TURNS:]:
        messages += [
            Message("user", turn["question"]),
            Message("assistant", uncited(turn["answer"])),
        ]
    messages.append(Message("user", user, images))
    if state.get("attempts", 0) > 0 and state.get("draft"):
        checked: list[SentenceCheck] = list(state.get("checked", []))
        rejected = [
            {"text": aliases.text(c.text), "problems": [aliases.text(p) for p in c.problems]}
            for c in checked
            if not c.supported
        ]
        messages += [
            Message("assistant", aliases.text(state["draft"])),
            Message("user", prompts.render("retry", version, rejected=rejected)),
        ]
    return AnswerPrompt(messages, aliases.refs())
