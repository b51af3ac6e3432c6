"""Comparing two answers to the same request: the client's and a shadow tier's.

Two measures, chosen per route (``shadow.compare``) or by the answers' length (``auto``):

- **exact** — normalized exact match, for labels, categories and JSON fields: both answers are
  case-folded, whitespace-collapsed and stripped of surrounding quotes and final punctuation; two
  answers that both parse as JSON compare as JSON (key order and spacing do not matter). Score 1 or 0.
- **similarity** — ROUGE-L F1 over words: ``2 · LCS / (len a + len b)`` of the two answers' word
  sequences, which is rapidfuzz's normalized Indel similarity over word lists. 1 for the same
  words in the same order; two unrelated texts score near 0. The answers agree when the score is at
  least the route's ``threshold``.

``auto`` uses exact when both normalized answers are at most ``SHORT_CHARS`` characters long.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rapidfuzz.distance import Indel

from gateway.policy.schema import Compare

SHORT_CHARS = 64
_SPACE = re.compile(r"\s+")
_EDGES = "\"'`\u201c\u201d\u2018\u2019 .!;:,"  # quotes (straight and curly), spaces, final punctuation
_WORD = re.compile(r"\w+", re.UNICODE)


class Comparison:
    __slots__ = ("agree", "measure", "score")

    def __init__(self, measure: str, score: float, agree: bool):
        self.measure = measure  # "exact" | "similarity"
        self.score = score
        self.agree = agree


def normalize(text: str) -> str:
    return _SPACE.sub(" ", text.casefold()).strip(_EDGES)


def _as_json(text: str) -> Any:
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[":
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return None


def exact(a: str, b: str) -> bool:
    ja, jb = _as_json(a), _as_json(b)
    if ja is not None and jb is not None:
        return bool(ja == jb)
    return normalize(a) == normalize(b)


def similarity(a: str, b: str) -> float:
    """ROUGE-L F1 over case-folded words (rapidfuzz's normalized Indel similarity of word lists)."""
    wa, wb = _WORD.findall(a.casefold()), _WORD.findall(b.casefold())
    if not wa and not wb:
        return 1.0
    return float(Indel.normalized_similarity(wa, wb))


def compare(a: str, b: str, how: Compare, threshold: float) -> Comparison:
    if how is Compare.AUTO:
        short = len(normalize(a)) <= SHORT_CHARS and len(normalize(b)) <= SHORT_CHARS
        how = Compare.EXACT if short else Compare.SIMILARITY
    if how is Compare.EXACT:
        same = exact(a, b)
        return Comparison("exact", 1.0 if same else 0.0, same)
    score = similarity(a, b)
    return Comparison("similarity", score, score >= threshold)
