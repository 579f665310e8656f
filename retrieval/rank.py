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

Large charts (a chronic or ICU patient has tens of thousands of lines) are narrowed before the dense
part, which is the costly one (a small encoder embeds ~150 lines/s on two CPU cores): every part but
``dense`` is computed for every line first (from an index built once per list of lines), then only
``dense_candidates`` lines are embedded. They are the newest ``dense_per_series`` lines of each
*series* (lines of one category with the same codes: every heart rate, every blood-pressure panel,
every refill of a drug), best cheap score first. A line left out takes the dense score of the
newest embedded line of its series, which differs from it in value and date only; a line whose
series has none embedded gets 0. Charts of at most ``dense_candidates`` lines are embedded whole.
"""

from __future__ import annotations

import copy
import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from retrieval.embedding_store import EmbeddingStore
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
    """Okapi BM25 with Lucene's always-positive idf, over an inverted index (term → documents),
    so a query costs time in the documents that hold its terms, not in the whole corpus."""

    def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.lengths = np.array([len(doc) for doc in documents], dtype=np.float64)
        self.avg = float(self.lengths.mean()) if len(documents) else 0.0
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for i, doc in enumerate(documents):
            for term, tf in Counter(doc).items():
                ids, tfs = postings.setdefault(term, ([], []))
                ids.append(i)
                tfs.append(tf)
        n = len(documents)
        self.postings = {
            t: (np.array(ids, dtype=np.int64), np.array(tfs, dtype=np.float64))
            for t, (ids, tfs) in postings.items()
        }
        self.idf = {
            t: math.log(1 + (n - len(p[0]) + 0.5) / (len(p[0]) + 0.5))
            for t, p in self.postings.items()
        }
        self.norm = (
            self.k1 * (1 - self.b + self.b * self.lengths / self.avg) if self.avg else self.lengths
        )

    def scores(self, query: Sequence[str]) -> np.ndarray:
        """One score per document, in document order."""
        out = np.zeros(len(self.lengths))
        if not self.avg:
            return out
        for term in set(query):
            found = self.postings.get(term)
            if found is None:
                continue
            ids, tf = found
            out[ids] += self.idf[term] * tf * (self.k1 + 1) / (tf + self.norm[ids])
        return out


@dataclass(frozen=True)
class RankedEvidence:
    """An evidence item with its score and the parts that made it."""

    evidence: Evidence
    score: float
    parts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


class _Corpus:
    """What ranking needs of one list of evidence lines that does not depend on the question:
    the BM25 index, recency, the lines' codes and categories, and their observation series.
    Built once per list (a patient's lines are cached by the agent's runtime) and reused for
    every question about it."""

    def __init__(self, items: Sequence[Evidence], half_life_days: float) -> None:
        self.items = items
        self.plain = [_REF.sub("", e.text) for e in items]
        self.bm25 = BM25([tokens(e.text) for e in items])
        self.recency = _recency(items, half_life_days)
        self.active = np.array([e.active for e in items], dtype=bool)
        self.by_code: dict[str, list[int]] = {}
        self.by_category: dict[str, list[int]] = {}
        for i, e in enumerate(items):
            for c in e.codes:
                self.by_code.setdefault(c, []).append(i)
            self.by_category.setdefault(e.category, []).append(i)
        # Series: lines of one category with the same codes (every heart rate, every BP panel,
        # every refill of one drug); a line without codes is a series of its own. Within a
        # series, 0 = the newest line; undated lines come last.
        keys: dict[tuple[str, tuple[str, ...]] | int, int] = {}
        self.series = np.array(
            [
                keys.setdefault((e.category, e.codes) if e.codes else -1 - i, len(keys))
                for i, e in enumerate(items)
            ],
            dtype=np.int64,
        )
        stamps = np.array([e.date.timestamp() if e.date else -np.inf for e in items])
        newest_first = np.argsort(-stamps, kind="stable")
        self.series_rank = np.zeros(len(items), dtype=np.int64)
        seen: Counter[int] = Counter()
        for i in newest_first.tolist():
            key = int(self.series[i])
            self.series_rank[i] = seen[key]
            seen[key] += 1

    def having(self, index: dict[str, list[int]], wanted: frozenset[str]) -> np.ndarray:
        """1.0 for the lines listed in ``index`` under any of ``wanted``, else 0.0."""
        out = np.zeros(len(self.items))
        for key in wanted:
            ids = index.get(key)
            if ids:
                out[ids] = 1.0
        return out


def _recency(items: Sequence[Evidence], half_life_days: float) -> np.ndarray:
    """0.5 ** (age / half-life), the age counted back from the newest dated line; 0.5 undated."""
    dated = [e.date for e in items if e.date is not None]
    if not dated:
        return np.full(len(items), 0.5)
    newest: datetime = max(dated)
    return np.array(
        [
            0.5 ** (max((newest - e.date).days, 0) / half_life_days) if e.date is not None else 0.5
            for e in items
        ]
    )


class EvidenceRanker:
    """Ranks a record's evidence for questions; embeddings of lines, and what each list of lines
    needs for ranking (``_Corpus``), are cached between calls. With a ``store``, chart lines'
    embeddings are also kept on disk for later processes (``retrieval.embedding_store``)."""

    def __init__(
        self,
        settings: RankSettings | None = None,
        encoder: TextEncoder | None = None,
        terms: TermTable | None = None,
        count_tokens: Callable[[str], int] = approx_tokens,
        cache_size: int = 50_000,
        corpus_cache_size: int = 16,
        store: EmbeddingStore | None = None,
    ) -> None:
        self.settings = settings or RankSettings()
        self.encoder = encoder
        self.store = store
        self.terms = terms or default_terms()
        self.count_tokens = count_tokens
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._corpora: OrderedDict[tuple[str, ...], _Corpus] = OrderedDict()
        self._corpus_cache_size = corpus_cache_size
        self._lock = threading.Lock()

    def without_store(self) -> EvidenceRanker:
        """This ranker sharing its caches in memory but keeping nothing on disk: for records read
        from elsewhere than the embedded store (an EHR session, a CDS request's server)."""
        other = copy.copy(self)
        other.store = None
        return other

    def _embed(self, texts: Sequence[str], keep: bool = False) -> np.ndarray:
        """One row per text; ``keep``: chart lines, looked up in and added to ``store``."""
        assert self.encoder is not None
        with self._lock:  # ranking may run in worker threads (the HTTP service)
            found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        store = self.store if keep else None
        if missing and store is not None:
            found.update(store.get(missing))
            missing = [t for t in missing if t not in found]
        if missing:
            made = dict(zip(missing, self.encoder.encode_texts(missing), strict=True))
            found.update(made)
            if store is not None:
                store.put(made)
        with self._lock:
            for text in dict.fromkeys(texts):
                self._cache[text] = found[text]
                self._cache.move_to_end(text)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.encoder.info.dim), dtype=np.float32)
        return np.stack([found[t] for t in texts])

    def _corpus(self, items: Sequence[Evidence]) -> _Corpus:
        key = tuple(e.text for e in items)
        with self._lock:
            corpus = self._corpora.get(key)
            if corpus is not None:
                self._corpora.move_to_end(key)
        # the same texts with other metadata (a refetched record) make a new corpus
        if corpus is None or any(a is not b for a, b in zip(corpus.items, items, strict=True)):
            corpus = _Corpus(items, self.settings.half_life_days)
            with self._lock:
                self._corpora[key] = corpus
                while len(self._corpora) > self._corpus_cache_size:
                    self._corpora.popitem(last=False)
        return corpus

    def dense_candidates(self, corpus: _Corpus, cheap: np.ndarray) -> np.ndarray:
        """Indices of the lines to embed: every line when there are no more than
        ``settings.dense_candidates`` (or that setting is 0); else the newest
        ``settings.dense_per_series`` lines of each series, best ``cheap`` score first, cut at
        ``settings.dense_candidates``."""
        n = len(corpus.items)
        limit = self.settings.dense_candidates
        if not limit or n <= limit:
            return np.arange(n)
        eligible = np.flatnonzero(corpus.series_rank < self.settings.dense_per_series)
        order = eligible[np.argsort(-cheap[eligible], kind="stable")]
        return order[:limit]

    def score(self, question: str, items: Sequence[Evidence]) -> list[RankedEvidence]:
        """Every item scored for ``question``, best first."""
        return list(self._ranked(question, items))

    def _ranked(self, question: str, items: Sequence[Evidence]) -> Iterator[RankedEvidence]:
        """The items scored for ``question``, best first, each made when it is asked for (a
        large chart's tail is never built when ``rank`` stops early)."""
        if not items:
            return
        s = self.settings
        corpus = self._corpus(items)
        matched = self.terms.matches(question)
        query = tokens(question)
        for term in matched:  # the table's other words for the same concept
            for word in term.words:
                query.extend(tokens(word))
        lexical = corpus.bm25.scores(query)
        top = lexical.max()
        lexical = lexical / top if top > 0 else lexical
        wanted_codes = frozenset().union(*(t.codes for t in matched)) if matched else frozenset()
        wanted_categories = (
            frozenset().union(*(t.categories for t in matched)) if matched else frozenset()
        )
        code = corpus.having(corpus.by_code, wanted_codes)
        category = corpus.having(corpus.by_category, wanted_categories)
        recency = corpus.recency
        words = set(re.findall(r"[a-z]+", question.lower()))
        asks_current = bool(_CURRENT & words)
        recency_weight = s.recency_weight * (s.recent_boost if _RECENT & words else 1.0)
        active = corpus.active.astype(np.float64) if asks_current else np.zeros(len(items))
        cheap = (
            s.lexical_weight * lexical
            + s.code_weight * code
            + s.category_weight * category
            + recency_weight * recency
            + s.active_weight * active
        )
        dense = np.zeros(len(items))
        dense_weight = s.dense_weight if self.encoder is not None else 0.0
        if dense_weight:
            dense = self._dense(question, corpus, cheap)
        total = cheap + dense_weight * dense
        for i in np.argsort(-total, kind="stable"):
            yield RankedEvidence(
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

    def _dense(self, question: str, corpus: _Corpus, cheap: np.ndarray) -> np.ndarray:
        """Cosine of each line with the question (negative counts as 0). Lines left out of the
        dense candidates take the cosine of the newest embedded line of their series (they
        differ from it in value and date only); lines of a series with none embedded get 0."""
        assert self.encoder is not None
        q = self._embed([question])[0]  # a question asked again is not encoded again
        chosen = self.dense_candidates(corpus, cheap)
        dense = np.zeros(len(corpus.items))
        lines = self._embed([corpus.plain[i] for i in chosen], keep=True)
        dense[chosen] = np.clip(lines @ q, 0.0, 1.0)
        if len(chosen) == len(corpus.items):
            return dense
        # the newest embedded line of each series speaks for the rest of it
        by_series = np.zeros(int(corpus.series.max()) + 1)
        for i in sorted(chosen, key=lambda i: -corpus.series_rank[i]):  # the newest written last
            by_series[corpus.series[i]] = dense[i]
        left = np.ones(len(corpus.items), dtype=bool)
        left[chosen] = False
        dense[left] = by_series[corpus.series[left]]
        return dense

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
        for item in self._ranked(question, items):
            if len(chosen) >= limit or spent >= budget:
                break
            if spent + item.tokens > budget:
                continue  # a shorter item further down may still fit
            chosen.append(item)
            spent += item.tokens
        return chosen
