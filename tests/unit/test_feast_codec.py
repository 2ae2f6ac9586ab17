from datetime import UTC, datetime

import pyarrow as pa
from feast.infra.online_stores.helpers import _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from inkling.feature_store import feast_codec

TEXT = st.text(max_size=12)
INT = st.integers(-(2**63), 2**63 - 1)
FLOAT = st.floats(allow_nan=True, allow_infinity=True)

CASES = [
    (ValueType.STRING, pa.string(), st.one_of(st.none(), TEXT)),
    (ValueType.INT64, pa.int64(), st.one_of(st.none(), INT)),
    (ValueType.DOUBLE, pa.float64(), st.one_of(st.none(), FLOAT)),
    (
        ValueType.STRING_LIST,
        pa.list_(pa.string()),
        st.one_of(st.none(), st.lists(TEXT, max_size=5)),
    ),
    (ValueType.INT64_LIST, pa.list_(pa.int64()), st.one_of(st.none(), st.lists(INT, max_size=5))),
    (
        ValueType.DOUBLE_LIST,
        pa.list_(pa.float64()),
        st.one_of(st.none(), st.lists(st.floats(allow_nan=False), max_size=5)),
    ),
]


def _feast_bytes(values, value_type):
    return [v.SerializeToString() for v in python_values_to_proto_values(values, value_type)]


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_value_encoders_match_feast_byte_for_byte(data):
    for value_type, arrow_type, strategy in CASES:
        values = data.draw(st.lists(strategy, min_size=1, max_size=8))
        ours = feast_codec.value_encoder(value_type)(pa.array(values, type=arrow_type))
        assert ours == _feast_bytes(values, value_type), value_type


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.datetimes(
            min_value=datetime(1990, 1, 1), max_value=datetime(2099, 1, 1), timezones=st.just(UTC)
        ),
        min_size=1,
        max_size=8,
    )
)
def test_timestamps_match_feast(values):
    ours, nanos = feast_codec.timestamps(pa.array(values, type=pa.timestamp("us", tz="UTC")))
    for value, encoded, n in zip(values, ours, nanos, strict=True):
        ts = Timestamp()
        ts.FromDatetime(value)
        assert encoded == ts.SerializeToString()
        assert feast_codec.decode_timestamp_nanos(encoded) == n == ts.seconds * 10**9 + ts.nanos
    unix = feast_codec.value_encoder(ValueType.UNIX_TIMESTAMP)(
        pa.array(values, type=pa.timestamp("us", tz="UTC"))
    )
    assert unix == _feast_bytes(values, ValueType.UNIX_TIMESTAMP)
    from_python = feast_codec.row_encoder(ValueType.UNIX_TIMESTAMP)
    assert from_python is not None and from_python(values) == unix
    naive = [v.replace(tzinfo=None) for v in values]  # read as UTC, as Arrow does
    assert from_python(naive) == unix


@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5))
def test_entity_keys_match_feast(ids):
    expected = [
        _redis_key("inkling", EntityKey(join_keys=["item_id"], entity_values=[Value(string_val=i)]))
        for i in ids
    ]
    assert feast_codec.entity_keys("item_id", ids, "inkling") == expected
