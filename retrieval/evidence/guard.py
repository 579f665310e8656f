"""The injection guard: text in a record addressed to an AI model rather than to clinicians (an
attempt to steer the answer, a prompt injection). Such an item keeps its place in the chart, but
its words never reach a model and cannot support a sentence."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace
from typing import TYPE_CHECKING

from retrieval.evidence.text import clean_text

if TYPE_CHECKING:
    from retrieval.evidence.model import Evidence

_ADDRESSED_TO_MODEL = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b[^.]{0,40}\b(?:instructions?|prompts?|rules|guidelines)\b"
    r"|\b(?:system|developer)\s+prompt\b"
    r"|\b(?:you\s+are\s+now|act\s+as|pretend\s+to\s+be)\s+(?:an?\s+|the\s+)?(?:ai|assistant|model|chatbot|"
    r"unrestricted|jailbroken|dan)\b"
    r"|\b(?:as|to)\s+(?:an?\s+)?(?:ai|language)\s+(?:model|assistant)\b"
    r"|\b(?:new|updated)\s+instructions\b"
    r"|<\|?/?(?:system|assistant|user|im_start|im_end)\|?>"
    r"|\b(?:reveal|list|show|print|disclose|give)\b[^.]{0,40}\b(?:records?|medications?|data|charts?|"
    r"information|results|history)\s+(?:of|for)\s+(?:another|other|a\s+different)\s+patients?\b"
    r"|\b(?:reveal|list|show|print|disclose|give)\b[^.]{0,40}\b(?:another|other)\s+patient(?:'s|s')",
    re.IGNORECASE,
)


# Also addressed to a model: telling it what to say or to drop what it was told, and notes to "the
# AI"/"the summarizer"; encoded payloads offered "to decode and follow".
_TELLS_MODEL = re.compile(
    r"\b(?:disregard|ignore|forget)\s+(?:all\s+|the\s+)?(?:above|previous|prior|earlier)\s+"
    r"(?:guidance|instructions?|prompts?|rules|messages?|context|directions)\b"
    r"|\bforget\s+(?:everything|what\s+you\s+(?:were|have\s+been)\s+told)\b"
    r"|\b(?:note|message|instructions?)\s+(?:to|for)\s+(?:the\s+)?(?:ai|llm|model|assistant|"
    r"summari[sz]er|chatbot|bot)\b"
    r"|\b(?:tell|inform)\s+the\s+(?:clinician|doctor|physician|user|reader)\s+(?:that\s+)?"
    r"(?:this|the)\s+patient\b"
    r"|\bdecode\s+(?:it\s+|this\s+)?and\s+(?:follow|obey|execute|run)\b"
    r"|\b(?:new|updated)\s+rules?\s*:",
    re.IGNORECASE,
)
# Latin look-alikes from other scripts (Cyrillic, Greek) that hide a phrase from a pattern
_CONFUSABLES = str.maketrans(
    "АВЕЅІЈКМНОРСТХУаеіјорсхуԁһӏΑΒΕΖΗΙΚΜΝΟΡΤΥΧαεικνορτυχ",
    "ABESIJKMHOPCTXYaeijopcxydhlABEZHIKMNOPTYXaeiknoptux",
)
_INVISIBLE = re.compile(
    r"[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f"
    r"\u202a-\u202e\u2060-\u206f\ufeff]"
)


_SPACES = re.compile(r"\s+")


def _comparable(text: str) -> str:
    """``text`` as a pattern should see it: compatibility forms folded (NFKC), invisible characters
    dropped, look-alike letters of other scripts mapped to Latin, whitespace folded."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).translate(_CONFUSABLES)
    return _SPACES.sub(" ", text)


# Words one of the patterns above needs (every alternative contains one, lower-cased): text
# without any cannot match, and skips the costlier searches (10k chart lines: 0.6 s → 0.1 s)
_ANCHORS = (
    "ignor", "disregard", "forget", "overrid", "system", "developer", "you", "act", "pretend",
    "ai", "language", "instruction", "<", "patient", "rule", "llm", "model", "assistant",
    "summari", "bot", "tell", "inform", "decode",
)  # fmt: skip


def addressed_to_model(text: str) -> str | None:
    """The phrase that marks ``text`` as instructions to an AI model, if any (after undoing the
    usual disguises: invisible characters, look-alike letters, line breaks)."""
    # (ASCII has no compatibility forms, invisible characters or look-alikes to undo)
    plain = _SPACES.sub(" ", text) if text.isascii() else _comparable(text)
    lower = plain.lower()
    if not any(word in lower for word in _ANCHORS):
        return None
    found = _ADDRESSED_TO_MODEL.search(plain) or _TELLS_MODEL.search(plain)
    return found.group(0) if found else None


def withhold_instructions(item: Evidence) -> Evidence:
    """``item``, or, when its text addresses an AI model, a line that says so without its words:
    same reference, date and category, no codes, not abnormal or active, and ``withheld`` saying
    why (quoting at most 60 characters of the phrase, for people, never for the model)."""
    phrase = addressed_to_model(item.text)
    if phrase is None:
        return item
    kind = item.id.split("/", 1)[0]
    reason = f"its text contains instructions addressed to an AI model ({clean_text(phrase, 60)!r})"
    # the line the model sees names no words of the text; the reason (for people) quotes them
    line = f"{item.day + ' ' if item.day else ''}{kind} withheld: its text addresses an AI model [{item.id}]"
    return replace(item, text=line, codes=(), abnormal=False, active=False, withheld=reason)
