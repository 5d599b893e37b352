"""The public surface is exactly what ``__all__`` says (Trio's test_exports habit)."""

from __future__ import annotations

import importlib

import pytest

import xintu

PUBLIC = {
    "xintu": {"CATEGORIES", "Category", "Classification", "Config", "Source", "load_config"},
    # The actor system as DESIGN §4 draws it (envelope, dispatcher, chain, pools, ...).
    "xintu.actors": {
        "SHARED_SCOPE",
        "Answer",
        "Cache",
        "Chain",
        "Classifier",
        "ClassifyRequest",
        "Dispatcher",
        "Envelope",
        "LocalModel",
        "LocalPool",
        "Readiness",
        "Runtime",
        "RuntimeStatistics",
        "Writer",
    },
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_exact(module: str) -> None:
    mod = importlib.import_module(module)
    assert set(mod.__all__) == PUBLIC[module]
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_no_public_names_outside_all() -> None:
    public = {n for n in dir(xintu) if not n.startswith("_")}
    submodules = {
        "errors",
        "actors",
        "http",
        "model",
        "store",
        "vision",
        "llm",
        "testing",
        "client",
        "cli",
    }
    assert public - submodules == set(xintu.__all__)


def test_categories_are_the_original_eight() -> None:
    assert xintu.CATEGORIES == (
        "social_activities",
        "pets",
        "single_person",
        "foods",
        "travel_scenery",
        "screenshot",
        "idcard",
        "other",
    )
