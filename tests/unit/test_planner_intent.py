"""Intent classification: realistic goals reach the right template, deterministically."""

from __future__ import annotations

import pytest

from services.planner.intent import choose, classify, normalise
from services.planner.settings import BUILTIN_TEMPLATES_DIR
from services.planner.templates import TemplateCatalog, load_templates
from tessera.runtime.errors import InvalidArgument, NotFound


@pytest.fixture(scope="module")
def catalog() -> TemplateCatalog:
    return load_templates([BUILTIN_TEMPLATES_DIR])


@pytest.mark.parametrize(
    ("goal", "template"),
    [
        ("customer wants a refund for a double charge", "support"),
        ("assess a loan for ACME", "loan"),
        ("buy 100 laptops under 10k", "procurement"),
        ("churn and fraud risk for customer 42", "risk"),
        ("The customer cannot log in after a password reset", "support"),
        ("Review the mortgage application of Jane Doe", "loan"),
        ("find a supplier for 500 monitors", "procurement"),
        ("how likely is customer 13 to churn?", "risk"),
    ],
)
def test_realistic_goals_pick_the_right_template(
    catalog: TemplateCatalog, goal: str, template: str
) -> None:
    chosen, matches = choose(goal, catalog, min_confidence=0.35)
    assert chosen.name == template
    assert matches[0].template == template
    assert 0.35 <= matches[0].confidence <= 1.0
    confidences = [m.confidence for m in matches]
    assert confidences == sorted(confidences, reverse=True)


def test_classification_is_deterministic(catalog: TemplateCatalog) -> None:
    goal = "customer wants a refund for a double charge"
    assert classify(goal, catalog.values()) == classify(goal, reversed(list(catalog.values())))


def test_a_template_name_is_chosen_with_full_confidence(catalog: TemplateCatalog) -> None:
    chosen, matches = choose("procurement", catalog, min_confidence=0.35)
    assert chosen.name == "procurement"
    assert matches[0].template == "procurement"
    assert matches[0].confidence == 1.0


def test_an_unknown_template_name_is_not_found(catalog: TemplateCatalog) -> None:
    with pytest.raises(NotFound) as raised:
        choose("payroll", catalog, min_confidence=0.35)
    assert raised.value.reason == "TEMPLATE_NOT_FOUND"
    assert raised.value.metadata["known_templates"] == "loan,procurement,risk,support"


def test_a_vague_goal_is_not_understood_and_lists_alternatives(
    catalog: TemplateCatalog,
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        choose("please look into customer 42", catalog, min_confidence=0.35)
    assert raised.value.reason == "GOAL_NOT_UNDERSTOOD"
    assert raised.value.field_violations[0][0] == "goal"
    assert raised.value.metadata["alternatives"]  # e.g. "risk=0.15,support=0.12"
    assert "known_templates" in raised.value.metadata


def test_an_unrelated_goal_is_not_understood(catalog: TemplateCatalog) -> None:
    with pytest.raises(InvalidArgument) as raised:
        choose("what is the weather in Paris", catalog, min_confidence=0.35)
    assert raised.value.reason == "GOAL_NOT_UNDERSTOOD"
    assert raised.value.metadata["alternatives"] == ""


def test_an_empty_goal_is_required(catalog: TemplateCatalog) -> None:
    with pytest.raises(InvalidArgument) as raised:
        choose("   ", catalog, min_confidence=0.35)
    assert raised.value.field_violations == (("goal", "required"),)


def test_normalise_drops_stop_words_and_plurals() -> None:
    assert normalise("Buy 100 Laptops for the boxes") == ("buy", "100", "laptop", "box")
