"""Feature services: one per model version. A model records the service it was trained
on, and the servers resolve the feature columns from the registry through it.
"""

from feast import FeatureService
from feature_views import item_covisitation, item_features, session_features, user_features

ranker_v1 = FeatureService(
    name="ranker_v1",
    features=[user_features, session_features, item_features],
    description="L2 ranker: who the user is, what they are doing now, and the candidate item.",
)

retrieval_v1 = FeatureService(
    name="retrieval_v1",
    features=[
        user_features[
            [
                "user_top_categories",
                "user_top_category_weights",
                "user_last_items",
                "user_purchased_items",
            ]
        ],
        session_features[["session_recent_items", "session_intent_category"]],
        item_features[
            ["item_category", "item_price", "item_pop_7d", "item_in_stock", "item_blocked"]
        ],
        item_covisitation,
    ],
    description="L1 retrieval: query-side user and session context, item-tower attributes, co-visitation.",
)
