"""Rank chart evidence for a question: BM25 + embedding similarity + codes + recency, in a budget.

Scores (each part in [0, 1], weighted by ``RankSettings``):
  lexical   BM25 of the question (expanded with the term table's words) over the evidence lines,
            divided by the best BM25 of this question;
  dense     cosine between the question's and the line's embeddings (negative counts as 0);
  code      1 when the evidence carries a code one of the question's words maps to;
  category  1 when the question names the evidence's category ("medications", "allergies");
  recency   0.5 ** (age / half-life), the age counted back from the newest dated item; its weight
            is multiplied by ``recent_boost`` when the question asks for the last or latest value;
  active    1 for active problems, medications and allergies when the question asks what holds
            now ("currently", "is she on", "active").
The best items are taken, in score order, until the token budget is spent.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from retrieval.encoders import TextEncoder
from retrieval.evidence import Evidence
from retrieval.settings import RankSettings
from retrieval.terms import TermTable, default_terms

_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "his",
        "how",
        "in",
        "is",
        "it",
        "its",
        "last",
        "latest",
        "me",
        "most",
        "of",
        "on",
        "or",
        "patient",
        "patients",
        "she",
        "show",
        "than",
        "that",
        "the",
        "their",
        "there",
        "this",
        "to",
        "was",
        "what",
        "when",
        "which",
        "who",
        "why",
        "will",
        "with",
    ]
)
# Words asking for what holds now: active problems, medications and allergies rank higher.
_CURRENT = frozenset(["active", "current", "currently", "now", "ongoing", "on", "taking", "still"])
# Words asking for the newest value: recency counts more.
_RECENT = frozenset(["last", "latest", "recent", "current", "currently", "newest", "now", "today"])
_REF = re.compile(r"\[[A-Za-z]+/[^\]]+\]$")


def tokens(text: str) -> list[str]:
    """Lower-case word tokens without stop words (the trailing ``[Type/id]`` left out)."""
    words = re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", _REF.sub("", text).lower())
    return [w for w in words if w not in _STOP]


def approx_tokens(text: str) -> int:
    """Tokens a text costs a language model: about four characters each for English and codes."""
    return max(1, math.ceil(len(text) / 4))


class BM25:
    """Okapi BM25 with Lucene's always-positive idf."""

    def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.counts = [Counter(doc) for doc in documents]
        self.lengths = np.array([len(doc) for doc in documents], dtype=np.float64)
        self.avg = float(self.lengths.mean()) if len(documents) else 0.0
        df: Counter[str] = Counter()
        for counts in self.counts:
            df.update(counts.keys())
        n = len(documents)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: Sequence[str]) -> np.ndarray:
        out = np.zeros(len(self.counts))
        if not self.avg:
            return out
        norm = self.k1 * (1 - self.b + self.b * self.lengths / self.avg)
        for term in set(query):
            idf = self.idf.get(term)
            if idf is None:
                continue
            tf = np.array([c.get(term, 0) for c in self.counts], dtype=np.float64)
            out += idf * tf * (self.k1 + 1) / (tf + norm)
        return out


@dataclass(frozen=True)
class RankedEvidence:
    """An evidence item with its score and the parts that made it."""

    evidence: Evidence
    score: float
    parts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


class EvidenceRanker:
    """Ranks a record's evidence for questions; embeddings of lines are cached between calls."""

    def __init__(
        self,
        settings: RankSettings | None = None,
        encoder: TextEncoder | None = None,
        terms: TermTable | None = None,
        count_tokens: Callable[[str], int] = approx_tokens,
        cache_size: int = 50_000,
    ) -> None:
        self.settings = settings or RankSettings()
        self.encoder = encoder
        self.terms = terms or default_terms()
        self.count_tokens = count_tokens
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        assert self.encoder is not None
        with self._lock:  # ranking may run in worker threads (the HTTP service)
            found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            found.update(zip(missing, self.encoder.encode_texts(missing), strict=True))
        with self._lock:
            for text in dict.fromkeys(texts):
                self._cache[text] = found[text]
                self._cache.move_to_end(text)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return np.stack([found[t] for t in texts])

    def score(self, question: str, items: Sequence[Evidence]) -> list[RankedEvidence]:
        """Every item scored for ``question``, best first."""
        if not items:
            return []
        s = self.settings
        matched = self.terms.matches(question)
        query = tokens(question)
        for term in matched:  # the table's other words for the same concept
            for word in term.words:
                query.extend(tokens(word))
        lexical = BM25([tokens(e.text) for e in items]).scores(query)
        top = lexical.max()
        lexical = lexical / top if top > 0 else lexical
        wanted_codes = frozenset().union(*(t.codes for t in matched)) if matched else frozenset()
        wanted_categories = (
            frozenset().union(*(t.categories for t in matched)) if matched else frozenset()
        )
        code = np.array([1.0 if wanted_codes.intersection(e.codes) else 0.0 for e in items])
        category = np.array([1.0 if e.category in wanted_categories else 0.0 for e in items])
        dense = np.zeros(len(items))
        dense_weight = s.dense_weight if self.encoder is not None else 0.0
        if dense_weight:
            q = self.encoder.encode_texts([question])[0]  # type: ignore[union-attr]
            dense = np.clip(self._embed([_REF.sub("", e.text) for e in items]) @ q, 0.0, 1.0)
        recency = self._recency(items)
        words = set(re.findall(r"[a-z]+", question.lower()))
        asks_current = bool(_CURRENT & words)
        recency_weight = s.recency_weight * (s.recent_boost if _RECENT & words else 1.0)
        active = np.array([1.0 if asks_current and e.active else 0.0 for e in items])
        total = (
            s.lexical_weight * lexical
            + dense_weight * dense
            + s.code_weight * code
            + s.category_weight * category
            + recency_weight * recency
            + s.active_weight * active
        )
        order = np.argsort(-total, kind="stable")
        return [
            RankedEvidence(
                items[i],
                float(total[i]),
                {
                    "lexical": float(lexical[i]),
                    "dense": float(dense[i]),
                    "code": float(code[i]),
                    "category": float(category[i]),
                    "recency": float(recency[i]),
                    "active": float(active[i]),
                },
                self.count_tokens(items[i].text),
            )
            for i in order
        ]

    def _recency(self, items: Sequence[Evidence]) -> np.ndarray:
        dated = [e.date for e in items if e.date is not None]
        if not dated:
            return np.full(len(items), 0.5)
        newest: datetime = max(dated)
        half_life = self.settings.half_life_days
        return np.array(
            [
                0.5 ** (max((newest - e.date).days, 0) / half_life) if e.date is not None else 0.5
                for e in items
            ]
        )

    def rank(
        self,
        question: str,
        items: Sequence[Evidence],
        *,
        token_budget: int | None = None,
        max_items: int | None = None,
    ) -> list[RankedEvidence]:
        """The best items for ``question`` that fit the token budget, best first."""
        budget = token_budget or self.settings.token_budget
        limit = max_items or self.settings.max_items
        chosen: list[RankedEvidence] = []
        spent = 0
        for item in self.score(question, items):
            if len(chosen) >= limit:
                break
            if spent + item.tokens > budget:
                continue  # a shorter item further down may still fit
            chosen.append(item)
            spent += item.tokens
        return chosen
