"""Transport security and callers: a real ingest server on loopback with TLS, mutual TLS,
bearer tokens and an allow-list, its certificates made by a throw-away CA per run."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from events_server.app import EventsApp
from events_server.settings import EventsSettings
from inkling.config import Settings
from inkling.errors import ConfigurationError
from inkling.events import bus
from inkling.serving.certs import Authority
from inkling.serving.runtime import start_server
from inkling.serving.security import SecuritySettings, channel_credentials, open_channel
from inkling.v1 import event_service_pb2, event_service_pb2_grpc
from tests.integration.test_events_server import event

pytestmark = pytest.mark.redis

DB = 14  # a database of the shared test Redis of its own
TRACK = "inkling.v1.EventService/TrackEvents"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pki")
    ca = Authority.create(root / "ca")
    other = Authority.create(root / "other", name="someone else's CA")
    return {
        "ca": ca,
        "server": ca.issue(root / "server", "events.inkling.internal"),
        "ingest": ca.issue(root / "ingest", "ingest"),
        "ranking": ca.issue(root / "ranking", "ranking"),
        "stranger": other.issue(root / "stranger", "ingest"),  # the right name, wrong CA
        "root": root,
    }


@pytest.fixture
def shared(redis_server):
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB)
    client.flushdb()
    yield f"{redis_server.address},db={DB}", client
    client.close()


Scenario = Callable[[int], Awaitable[Any]]


def serve(address: str, security: SecuritySettings, scenario: Scenario) -> Any:
    async def main() -> Any:
        running = await start_server(
            EventsApp(Settings(redis_address=address), EventsSettings(partitions=2)),
            port=0, grace_s=1, security=security,
        )  # fmt: skip
        try:
            return await scenario(running.port)
        finally:
            await running.stop()

    return asyncio.run(main())


def client(pki: dict[str, Any], who: str | None = None, token: str | None = None) -> Any:
    """Client credentials trusting the test CA, with `who`'s certificate and a token."""
    token_file = None
    if token is not None:
        token_file = pki["root"] / f"token-{abs(hash(token))}"
        token_file.write_text(token)
    return channel_credentials(
        SecuritySettings(
            ca_file=pki["ca"].cert_file,
            client_cert_file=pki[who].cert_file if who else None,
            client_key_file=pki[who].key_file if who else None,
            token_file=token_file,
        )
    )


async def track_code(port: int, credentials: Any) -> str:
    """TrackEvents' status code over a channel with `credentials` (None: plaintext)."""
    async with open_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        try:
            request = event_service_pb2.TrackEventsRequest(events=[event(f"e{time.time_ns()}")])
            await stub.TrackEvents(request, timeout=5)
            return "OK"
        except grpc.aio.AioRpcError as e:
            return e.code().name


def test_tls_admits_trusting_clients_and_refuses_plaintext(shared, pki):
    address, _ = shared
    security = SecuritySettings(cert_file=pki["server"].cert_file, key_file=pki["server"].key_file)

    async def scenario(port: int) -> list[str]:
        return [await track_code(port, client(pki)), await track_code(port, None)]

    assert serve(address, security, scenario) == ["OK", "UNAVAILABLE"]


def test_mutual_tls_identifies_callers_by_certificate_and_applies_the_allow_list(
    shared, pki, caplog
):
    address, r = shared
    security = SecuritySettings(
        cert_file=pki["server"].cert_file,
        key_file=pki["server"].key_file,
        client_ca_file=pki["ca"].cert_file,
        allow={TRACK: "ingest"},
    )
    caplog.set_level(logging.WARNING, logger="inkling.security")

    async def scenario(port: int) -> dict[str, str]:
        codes = {
            "ingest": await track_code(port, client(pki, "ingest")),
            "ranking": await track_code(port, client(pki, "ranking")),
            "no certificate": await track_code(port, client(pki)),
            "another CA's": await track_code(port, client(pki, "stranger")),
        }
        for _ in range(20):  # a refused caller that insists: one log line, not twenty
            await track_code(port, client(pki, "ranking"))
        # Health stays open to probes; reflection (what exists) does not.
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", client(pki, "ranking")) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            codes["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
            try:
                stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
                async for _ in stream:
                    pass
                codes["reflection"] = "OK"
            except grpc.aio.AioRpcError as e:
                codes["reflection"] = e.code().name
        return codes

    codes = serve(address, security, scenario)
    assert codes == {
        "ingest": "OK",
        "ranking": "PERMISSION_DENIED",
        "no certificate": "UNAVAILABLE",  # the handshake itself fails
        "another CA's": "UNAVAILABLE",
        "health": "SERVING",
        "reflection": "PERMISSION_DENIED",
    }
    assert len(bus.read_partition(r, 0)) + len(bus.read_partition(r, 1)) == 1  # ingest's only
    refusals = [rec.getMessage() for rec in caplog.records if "refused" in rec.getMessage()]
    assert 1 <= len(refusals) <= 3, refusals  # TrackEvents once, reflection once
    assert any("ranking" in line for line in refusals)


def test_bearer_tokens_identify_callers_and_say_nothing_of_what_exists(shared, pki, caplog):
    address, _ = shared
    tokens = pki["root"] / "tokens"
    tokens.write_text("# name token\ningest s3cret-ingest-token\nranking s3cret-ranking-token\n")
    security = SecuritySettings(
        cert_file=pki["server"].cert_file,
        key_file=pki["server"].key_file,
        tokens_file=tokens,
        allow={"inkling.v1.EventService/*": "ingest"},
    )
    caplog.set_level(logging.WARNING, logger="inkling.security")

    async def scenario(port: int) -> list[tuple[str, str]]:
        out = []
        for token in ("s3cret-ingest-token", "s3cret-ranking-token", "guess", None):
            credentials = client(pki, token=token)
            target = f"127.0.0.1:{port}"
            async with grpc.aio.secure_channel(target, credentials) as channel:
                stub = event_service_pb2_grpc.EventServiceStub(channel)
                try:
                    request = event_service_pb2.TrackEventsRequest(events=[event("t1")])
                    await stub.TrackEvents(request, timeout=5)
                    out.append(("OK", ""))
                except grpc.aio.AioRpcError as e:
                    out.append((e.code().name, e.details() or ""))
        return out

    (ok, _), denied, guessed, missing = serve(address, security, scenario)
    assert ok == "OK"
    assert denied == ("PERMISSION_DENIED", "denied")
    assert guessed == missing == ("UNAUTHENTICATED", "authentication required")
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "s3cret" not in logged and "guess" not in logged  # names, never tokens


def test_a_renewed_certificate_is_served_without_a_restart(shared, pki, tmp_path):
    address, _ = shared
    first = Authority.create(tmp_path / "first", name="first CA")
    second = Authority.create(tmp_path / "second", name="second CA")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.crt", live / "server.key"

    def install(ca: Authority) -> None:
        issued = ca.issue(tmp_path / ca.cert_file.stem, "events.inkling.internal")
        key.write_bytes(issued.key_file.read_bytes())
        cert.write_bytes(issued.cert_file.read_bytes())

    install(first)
    security = SecuritySettings(cert_file=cert, key_file=key)

    def trusting(ca: Authority) -> Any:
        return channel_credentials(SecuritySettings(ca_file=ca.cert_file))

    async def scenario(port: int) -> list[str]:
        codes = [await track_code(port, trusting(first)), await track_code(port, trusting(second))]
        install(second)  # renewed in place, by another CA
        time.sleep(0.01)  # a later modification time
        codes += [await track_code(port, trusting(second)), await track_code(port, trusting(first))]
        return codes

    assert serve(address, security, scenario) == ["OK", "UNAVAILABLE", "OK", "UNAVAILABLE"]


def test_inconsistent_security_settings_are_refused_by_name(pki, tmp_path):
    with pytest.raises(ConfigurationError, match="cert_file and key_file go together"):
        SecuritySettings(cert_file=pki["server"].cert_file)
    with pytest.raises(ConfigurationError, match=r"client_ca_file .* needs cert_file"):
        SecuritySettings(client_ca_file=pki["ca"].cert_file)
    with pytest.raises(ConfigurationError, match="is not a readable file"):
        SecuritySettings(cert_file=tmp_path / "nope.crt", key_file=tmp_path / "nope.key")
    with pytest.raises(ConfigurationError, match="allow rule 'TrackEvents'"):
        SecuritySettings(allow={"TrackEvents": "ingest"})
    with pytest.raises(ConfigurationError, match="names no caller"):
        SecuritySettings(allow={TRACK: " "})
    with pytest.raises(ConfigurationError, match=r"has no method TrackEvent .*TrackEvents"):
        SecuritySettings(allow={"inkling.v1.EventService/TrackEvent": "ingest"})
    with pytest.raises(ConfigurationError, match=r"no service inkling\.v1\.EventsService"):
        SecuritySettings(allow={"inkling.v1.EventsService/*": "ingest"})
    with pytest.raises(ConfigurationError, match="needs ca_file"):
        channel_credentials(SecuritySettings(token_file=Path(pki["ca"].cert_file)))
