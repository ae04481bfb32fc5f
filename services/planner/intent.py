"""Deterministic intent classification: which template does a free-text goal mean?

Each template declares weighted keywords (words or phrases) and example goals. A goal's
score for a template combines the evidence with a noisy-OR, so it stays in [0, 1], grows
with every extra match and never depends on the order of anything:

* every matched keyword (all its words present, phrases as consecutive words) with its
  weight;
* the template's own name appearing in the goal, weight 0.5;
* the best overlap with an example goal (shared words / words of the example), scaled
  by 0.6.

Words are lower-cased, stop words dropped and plurals reduced to singular, so "laptops"
matches "laptop" and "refunds" matches "refund".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from services.planner.templates import TEMPLATE_NAME_RE, Template, TemplateCatalog
from tessera.runtime.errors import InvalidArgument, NotFound
from tessera.v1 import planner_pb2

__all__ = ["IntentMatch", "choose", "classify", "normalise"]

NAME_WEIGHT = 0.5
EXAMPLE_WEIGHT = 0.6
_WORD_RE = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "has",
        "have",
        "i",
        "in",
        "is",
        "it",
        "its",
        "me",
        "my",
        "of",
        "on",
        "or",
        "our",
        "please",
        "that",
        "the",
        "their",
        "them",
        "this",
        "to",
        "us",
        "we",
        "with",
        "wants",
        "want",
        "need",
        "needs",
        "would",
        "like",
        "can",
        "could",
        "some",
    }
)


@dataclass(frozen=True, order=True)
class IntentMatch:
    """A template and how confident the classifier is that the goal means it."""

    template: str
    confidence: float

    def to_proto(self) -> planner_pb2.IntentMatch:
        return planner_pb2.IntentMatch(template=self.template, confidence=self.confidence)


def _stem(word: str) -> str:
    """Plural → singular, conservatively (``laptops`` → ``laptop``, ``boxes`` → ``box``)."""
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def normalise(text: str) -> tuple[str, ...]:
    """Lower-cased, stemmed content words of ``text``, in order."""
    return tuple(_stem(w) for w in _WORD_RE.findall(text.lower()) if w not in _STOP)


def _contains(words: Sequence[str], phrase: Sequence[str]) -> bool:
    if not phrase:
        return False
    if len(phrase) == 1:
        return phrase[0] in words
    n = len(phrase)
    return any(tuple(words[i : i + n]) == tuple(phrase) for i in range(len(words) - n + 1))


@lru_cache(maxsize=4096)
def _phrase(text: str) -> tuple[str, ...]:
    return normalise(text)


def score(goal_words: Sequence[str], template: Template) -> float:
    """Confidence in [0, 1] that ``goal_words`` (see :func:`normalise`) mean ``template``."""
    if not goal_words:
        return 0.0
    miss = 1.0
    for keyword, weight in template.intents.keywords.items():
        if _contains(goal_words, _phrase(keyword)):
            miss *= 1.0 - weight
    if _contains(goal_words, _phrase(template.name.replace("_", " ").replace("-", " "))):
        miss *= 1.0 - NAME_WEIGHT
    goal_set = set(goal_words)
    best = 0.0
    for example in template.intents.examples:
        words = set(_phrase(example))
        if words:
            best = max(best, len(goal_set & words) / len(words))
    miss *= 1.0 - EXAMPLE_WEIGHT * best
    return round(1.0 - miss, 4)


def classify(goal: str, templates: Iterable[Template]) -> list[IntentMatch]:
    """Every template with a non-zero score, best first (ties by name)."""
    words = normalise(goal)
    matches = [IntentMatch(t.name, score(words, t)) for t in templates]
    return sorted(
        (m for m in matches if m.confidence > 0), key=lambda m: (-m.confidence, m.template)
    )


def _alternatives(matches: Sequence[IntentMatch], limit: int = 3) -> str:
    return ",".join(f"{m.template}={m.confidence:.2f}" for m in matches[:limit])


def choose(
    goal: str, catalog: TemplateCatalog, *, min_confidence: float
) -> tuple[Template, list[IntentMatch]]:
    """The template ``goal`` means, and the ranked matches (chosen one first).

    * ``goal`` equal to a template name → that template, confidence 1.0;
    * a single identifier-like word that names no template → NOT_FOUND
      (reason TEMPLATE_NOT_FOUND, metadata ``known_templates``);
    * best confidence below ``min_confidence`` → INVALID_ARGUMENT (reason
      GOAL_NOT_UNDERSTOOD, metadata ``alternatives`` as ``name=confidence,…``).
    """
    text = goal.strip()
    known = ",".join(catalog.names())
    if not text:
        raise InvalidArgument(
            "goal is required", reason="GOAL_REQUIRED", field_violations=[("goal", "required")]
        )
    if text in catalog:
        others = [m for m in classify(text, catalog.values()) if m.template != text]
        return catalog[text], [IntentMatch(text, 1.0), *others]
    if TEMPLATE_NAME_RE.match(text):
        raise NotFound(
            f"no workflow template named {text!r} (known: {known or 'none'})",
            reason="TEMPLATE_NOT_FOUND",
            metadata={"template": text, "known_templates": known},
        )
    matches = classify(text, catalog.values())
    if not matches or matches[0].confidence < min_confidence:
        best = f"{matches[0].confidence:.2f}" if matches else "0"
        raise InvalidArgument(
            f"goal not understood: best match {best} is below {min_confidence:.2f}; "
            "name a template or rephrase the goal",
            reason="GOAL_NOT_UNDERSTOOD",
            field_violations=[("goal", "matches no workflow template with enough confidence")],
            metadata={
                "alternatives": _alternatives(matches),
                "known_templates": known,
                "min_confidence": f"{min_confidence:.2f}",
            },
        )
    return catalog[matches[0].template], matches
