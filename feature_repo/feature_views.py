"""Feature views: named groups of features, each read from one source by one entity.

Feature names carry their entity's prefix (item_, user_, session_, covisit_), so a
feature service can mix views without name clashes.
"""

from datetime import timedelta

from data_sources import (
    item_covisitation_source,
    item_source,
    item_stream_push,
    session_push,
    user_source,
)
from entities import item, session, user
from feast import FeatureView, Field
from feast.types import Array, Bool, Float64, Int64, String, UnixTimestamp

item_features = FeatureView(
    name="item_features",
    entities=[item],
    # Daily snapshots: a week of slack covers a missed run without serving stale rates forever.
    ttl=timedelta(days=7),
    schema=[
        Field(name="item_pop_1d", dtype=Int64, description="Interactions on the snapshot's day."),
        Field(name="item_pop_7d", dtype=Int64, description="Interactions over the last 7 days."),
        Field(name="item_pop_30d", dtype=Int64, description="Interactions over the last 30 days."),
        Field(name="item_ctr_30d", dtype=Float64, description="Clicks / impressions, 30 days."),
        Field(
            name="item_atc_rate_30d", dtype=Float64, description="Add-to-carts / clicks, 30 days."
        ),
        Field(name="item_cvr_30d", dtype=Float64, description="Purchases / clicks, 30 days."),
        Field(name="item_category", dtype=String),
        Field(name="item_price", dtype=Float64, description="Null when the source has no price."),
        Field(name="item_age_days", dtype=Float64, description="Days in the catalogue."),
        Field(name="item_in_stock", dtype=Bool),
        Field(name="item_blocked", dtype=Bool, description="Never recommended when true."),
    ],
    source=item_source,
    online=True,
)

user_features = FeatureView(
    name="user_features",
    entities=[user],
    # A snapshot is written only on days the user was active, so it must outlive quiet months.
    ttl=timedelta(days=365),
    schema=[
        Field(name="user_page_views", dtype=Int64),
        Field(name="user_item_views", dtype=Int64),
        Field(name="user_clicks", dtype=Int64),
        Field(name="user_carts", dtype=Int64),
        Field(name="user_purchases", dtype=Int64),
        Field(
            name="user_top_categories", dtype=Array(String), description="Heaviest 3 categories."
        ),
        Field(name="user_top_category_weights", dtype=Array(Float64), description="Their shares."),
        Field(name="user_price_affinity", dtype=Float64, description="Weighted mean price."),
        Field(name="user_last_event_timestamp", dtype=UnixTimestamp),
        Field(
            name="user_last_items", dtype=Array(String), description="Last 20 items, newest last."
        ),
        Field(
            name="user_purchased_items",
            dtype=Array(String),
            description="Last 100 distinct items bought, newest last.",
        ),
    ],
    source=user_source,
    online=True,
)

session_features = FeatureView(
    name="session_features",
    entities=[session],
    # A session idle for a day is over.
    ttl=timedelta(days=1),
    schema=[
        Field(
            name="session_recent_items", dtype=Array(String), description="Last 10, newest last."
        ),
        Field(name="session_page_views", dtype=Int64),
        Field(name="session_item_views", dtype=Int64),
        Field(name="session_clicks", dtype=Int64),
        Field(name="session_carts", dtype=Int64),
        Field(name="session_purchases", dtype=Int64),
        Field(name="session_intent_category", dtype=String, description="Dwell-weighted."),
        Field(name="session_last_event_timestamp", dtype=UnixTimestamp),
    ],
    source=session_push,
    online=True,
)

item_covisitation = FeatureView(
    name="item_covisitation",
    entities=[item],
    ttl=timedelta(days=30),
    schema=[
        Field(name="covisit_items", dtype=Array(String), description="Top 20 co-visited items."),
        Field(name="covisit_counts", dtype=Array(Int64), description="Sessions per pair."),
    ],
    source=item_covisitation_source,
    online=True,
)

# Written only by the stream worker (through item_stream_push): per item, the views and
# clicks received in the current minute and the 4 before it. The worker rewrites a row
# while its window holds events, so a row older than the TTL has no events in it.
item_stream_features = FeatureView(
    name="item_stream_features",
    entities=[item],
    ttl=timedelta(minutes=5),
    schema=[
        Field(name="item_views_5m", dtype=Int64, description="Impressions, last 5 minutes."),
        Field(name="item_clicks_5m", dtype=Int64, description="Clicks, last 5 minutes."),
    ],
    source=item_stream_push,
    online=True,
    tags={"inkling.written_by": "stream_worker"},
)
