from collections import Counter

import pyarrow.compute as pc
import pytest

from batch.generate import GeneratorConfig, generate
from inkling.events.schema import validate

SMALL = GeneratorConfig(users=300, items=800, sessions=1500, days=5, seed=3)


def test_same_seed_same_events_other_seed_differs():
    a, b = generate(SMALL), generate(SMALL)
    assert a.events.equals(b.events)
    assert a.items.equals(b.items)
    c = generate(GeneratorConfig(users=300, items=800, sessions=1500, days=5, seed=4))
    assert not a.events.equals(c.events)


def test_events_pass_schema_validation_and_follow_the_funnel():
    data = generate(SMALL)
    result = validate(data.events)
    assert result.rejected == []
    counts = Counter(data.events.column("event_type").to_pylist())
    assert counts["item_view"] > counts["click"] > counts["add_to_cart"] > counts["purchase"] > 0
    assert set(pc.unique(data.events.column("item_id").drop_null()).to_pylist()) <= set(
        data.items.column("item_id").to_pylist()
    )


def test_session_intent_predicts_the_next_click_better_than_long_term_taste():
    data = generate(SMALL)
    items = dict(
        zip(
            data.items.column("item_id").to_pylist(),
            data.items.column("category").to_pylist(),
            strict=True,
        )
    )
    taste = dict(
        zip(
            data.users.column("user_id").to_pylist(),
            data.users.column("true_top_categories").to_pylist(),
            strict=True,
        )
    )
    clicks = data.events.filter(pc.equal(data.events.column("event_type"), "click")).sort_by(
        [("session_id", "ascending"), ("timestamp", "ascending")]
    )
    sessions = clicks.column("session_id").to_pylist()
    users = clicks.column("user_id").to_pylist()
    cats = [items[i] for i in clicks.column("item_id").to_pylist()]
    same_as_session = same_as_taste = pairs = 0
    for k in range(1, len(cats)):
        if sessions[k] != sessions[k - 1]:
            continue
        pairs += 1
        same_as_session += cats[k] == cats[k - 1]
        same_as_taste += cats[k] == taste[users[k]][0]
    assert pairs > 500
    # The previous click in the session says far more than the user's favourite category.
    assert same_as_session / pairs > 1.5 * same_as_taste / pairs


@pytest.mark.parametrize("field", ["users", "items", "sessions", "days", "categories"])
def test_sizes_must_be_positive(field):
    with pytest.raises(ValueError, match=field):
        GeneratorConfig(**{field: 0})
