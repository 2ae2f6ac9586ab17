"""The ranking server's model input: history then session, with same-session-next flags."""

from types import SimpleNamespace

import numpy as np
import pytest

from inkling.models import SasRecConfig, SasRecRecommender
from inkling.models.sasrec import SasRecNet
from ranking_server.scoring import SequenceScorer


@pytest.fixture(scope="module")
def scorer() -> SequenceScorer:
    model = SasRecRecommender(SasRecConfig(max_len=8, hidden=8))
    model.item_ids = ["<pad>", "a", "b", "c", "d", "e"]
    model.net = SasRecNet(model.n_items, model.config).eval()
    return SequenceScorer(model, "test")


def rows(history=None, session=None) -> SimpleNamespace:
    return SimpleNamespace(
        user=None if history is None else {"user_last_items": history},
        session=None if session is None else {"session_recent_items": session},
    )


@pytest.mark.parametrize(
    ("history", "session", "items", "flags"),
    [
        # Mid-session: the boundary flag is 0, the newest 1 (the next item continues it).
        (["a", "b"], ["c", "d"], [1, 2, 3, 4], [1, 0, 1, 1]),
        # No session yet: the next item opens one, so the newest flag is 0.
        (["a", "b"], [], [1, 2], [1, 0]),
        (None, ["c"], [3], [1]),
        # The user row already ends with the session's first items: counted once.
        (["a", "c", "d"], ["c", "d", "e"], [1, 3, 4, 5], [0, 1, 1, 1]),
        # Unknown items are dropped; consecutive repeats collapse to the first.
        (["a", "zz", "a"], ["b", "b", "zz"], [1, 2], [0, 1]),
        (None, None, [], []),
    ],
)
def test_sequence_and_flags(scorer, history, session, items, flags) -> None:
    got_items, got_flags = scorer.sequence(rows(history, session))
    assert got_items.tolist() == items and got_flags.tolist() == flags
    assert got_items.dtype == got_flags.dtype == np.int64


def test_scores_agree_with_the_model(scorer) -> None:
    items, flags = scorer.sequence(rows(["a", "b"], ["c"]))
    np.testing.assert_allclose(
        scorer._catalogue_scores(items, flags)[1:],
        scorer.model.score([items], [flags])[0][1:],
        atol=1e-5,
    )
    # The flags reach the model: the same items mid-session and not score differently.
    other = scorer._catalogue_scores(*scorer.sequence(rows(["a", "b", "c"], [])))
    assert not np.allclose(other[1:], scorer._catalogue_scores(items, flags)[1:])
