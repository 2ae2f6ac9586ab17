import pytest

from inkling.config import load_settings
from inkling.errors import ConfigurationError


def test_flags_beat_environment_beat_file(tmp_path):
    cfg = tmp_path / "inkling.toml"
    cfg.write_text('spark_master = "spark://file:7077"\nonline_store = "sqlite"\n')
    env = {"INKLING_SPARK_MASTER": "spark://env:7077", "INKLING_SPARK_CONF": "a=1, b=2"}
    s = load_settings(cfg, {"spark_master": "local[1]"}, env)
    assert s.spark_master == "local[1]"
    assert s.online_store == "sqlite"
    assert s.spark_conf == {"a": "1", "b": "2"}
    assert s.feature_store_yaml.name == "feature_store.sqlite.yaml"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"online_store": "dynamo"}, "online_store must be one of"),
        ({"colour": "red"}, "unknown settings: colour"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ConfigurationError, match=message):
        load_settings(None, overrides, {})


def test_bad_spark_conf_and_missing_file(tmp_path):
    with pytest.raises(ConfigurationError, match="not key=value"):
        load_settings(None, {"spark_conf": "nonsense"}, {})
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", None, {})


def test_one_file_holds_every_process_table_beside_the_shared_settings(tmp_path):
    from inkling.serving.security import SecuritySettings
    from inkling.serving.settings import RankingSettings, load_server_settings
    from inkling.telemetry.settings import load_telemetry_settings

    tokens = tmp_path / "tokens"
    tokens.write_text("ingest t0k3n\n")
    cfg = tmp_path / "inkling.toml"
    cfg.write_text(
        'online_store = "redis"\n'
        "[ranking]\nport = 50100\n"
        "[worker]\npartitions = 8\n"
        "[telemetry]\ntrace_ratio = 0.5\n"
        f'[security]\ntokens_file = "{tokens}"\n'
        'allow = { "inkling.v1.EventService/TrackEvents" = "ingest", "*" = "admin ops" }\n'
    )
    assert load_settings(cfg, environ={}).online_store == "redis"
    assert load_server_settings(RankingSettings, "ranking", cfg, environ={}).port == 50100
    assert load_telemetry_settings(cfg, environ={}).trace_ratio == 0.5
    security = load_server_settings(SecuritySettings, "security", cfg, environ={})
    assert security.tokens_file == tokens
    assert security.allow == {"inkling.v1.EventService/TrackEvents": "ingest", "*": "admin ops"}
