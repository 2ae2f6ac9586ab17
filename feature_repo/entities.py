"""Entities: the keys every feature is looked up by. Ids are strings in the event log."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A logged-in user; anonymous sessions have no user.",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalogue item.",
)

session = Entity(
    name="session",
    join_keys=["session_id"],
    value_type=ValueType.STRING,
    description="One visit: the unit of short-term intent.",
)
