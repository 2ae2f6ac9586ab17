"""The demo's secured round: both servers again, now with mutual TLS and an allow-list.

A throw-away CA (`inkling.serving.certs`, under the demo's data directory, made anew each
run and never committed) signs a certificate for each party: the servers, the ranking
server as retrieval's client, the demo's caller ``storefront``, and ``intruder``. The
allow-list lets ``storefront`` call Recommend and only ``ranking`` call retrieval. The
demo then calls Recommend as each kind of caller and shows what each got.

User ids are not pseudonymised here (`pseudonyms` left out), so the demo's users keep
their histories; `inkling serve` turns pseudonyms on by default once security is on.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from inkling.config import Settings
from inkling.serving.certs import Authority
from inkling.serving.runtime import start_server
from inkling.serving.security import SecuritySettings, channel_credentials, open_channel
from inkling.serving.settings import RankingSettings, RetrievalSettings
from inkling.v1 import ranking_service_pb2, ranking_service_pb2_grpc
from ranking_server.app import RankingApp
from retrieval_server.app import RetrievalApp

RECOMMEND = "inkling.v1.RankingService/Recommend"
RETRIEVAL = "inkling.v1.RetrievalService/*"


@dataclass(frozen=True)
class SecuredCall:
    caller: str
    """Who called, in words."""
    status: str
    """The gRPC status name, or UNAVAILABLE for a refused handshake."""
    items: int
    degraded: bool
    """The answer says a part failed (e.g. retrieval refused the ranking server)."""
    millis: float


async def _secured(
    settings: Settings, who: tuple[str, str], directory: Path, enforce_ttl: bool
) -> list[SecuredCall]:
    ca = Authority.create(directory / "ca", name="inkling demo CA", days=1)
    stranger_ca = Authority.create(directory / "other-ca", name="someone else's CA", days=1)
    certs = {
        name: ca.issue(directory / name, name, days=1)
        for name in ("retrieval", "ranking", "storefront", "intruder")
    }
    forged = stranger_ca.issue(directory / "forged", "storefront", days=1)

    retrieval_security = SecuritySettings(
        cert_file=certs["retrieval"].cert_file,
        key_file=certs["retrieval"].key_file,
        client_ca_file=ca.cert_file,
        allow={RETRIEVAL: "ranking"},
    )
    ranking_security = SecuritySettings(
        cert_file=certs["ranking"].cert_file,
        key_file=certs["ranking"].key_file,
        client_ca_file=ca.cert_file,
        allow={RECOMMEND: "storefront"},
        # as retrieval's client
        ca_file=ca.cert_file,
        client_cert_file=certs["ranking"].cert_file,
        client_key_file=certs["ranking"].key_file,
    )
    retrieval = await start_server(
        RetrievalApp(settings, RetrievalSettings(port=0, enforce_ttl=enforce_ttl)),
        port=0, grace_s=2, security=retrieval_security,
    )  # fmt: skip
    rs = RankingSettings(
        port=0, retrieval_address=f"127.0.0.1:{retrieval.port}", enforce_ttl=enforce_ttl
    )
    ranking = await start_server(
        RankingApp(settings, rs, ranking_security), port=0, grace_s=2, security=ranking_security
    )
    callers = {
        "storefront (certificate from the demo CA, allowed)": (
            certs["storefront"].cert_file,
            certs["storefront"].key_file,
        ),
        "intruder (certificate from the demo CA, not allowed)": (
            certs["intruder"].cert_file,
            certs["intruder"].key_file,
        ),
        "storefront (certificate from another CA)": (forged.cert_file, forged.key_file),
        "no client certificate": (None, None),
    }
    calls = []
    try:
        for caller, (cert_file, key_file) in callers.items():
            credentials = channel_credentials(
                SecuritySettings(
                    ca_file=ca.cert_file, client_cert_file=cert_file, client_key_file=key_file
                )
            )
            async with open_channel(f"127.0.0.1:{ranking.port}", credentials) as channel:
                stub = ranking_service_pb2_grpc.RankingServiceStub(channel)
                began = time.perf_counter()
                try:
                    response = await stub.Recommend(
                        ranking_service_pb2.RecommendRequest(
                            user_id=who[0], session_id=who[1], num_results=10
                        ),
                        timeout=5.0,
                    )
                    status, items = "OK", len(response.items)
                    degraded = response.degradation.degraded
                except grpc.aio.AioRpcError as e:
                    status, items, degraded = e.code().name, 0, False
                millis = (time.perf_counter() - began) * 1000
            calls.append(SecuredCall(caller, status, items, degraded, millis))
    finally:
        await ranking.stop()
        await retrieval.stop()
    return calls


def secured_demo(
    settings: Settings, who: tuple[str, str], directory: Path, enforce_ttl: bool = True
) -> list[SecuredCall]:
    """Serve both servers with mutual TLS and an allow-list (certificates made under
    `directory`), call Recommend for `who` (user, session) as four kinds of caller; what
    each got."""
    return asyncio.run(_secured(settings, who, directory, enforce_ttl))


def render_secured(calls: list[SecuredCall]) -> str:
    width = max(len(c.caller) for c in calls)
    lines = [
        "mutual TLS + allow-list (Recommend: storefront; retrieval: the ranking server only),",
        "certificates from a throw-away CA made for this run:",
    ]
    for c in calls:
        got = f"{c.items} items" if c.status == "OK" else "refused"
        got += " (degraded)" if c.degraded else ""
        lines.append(f"  {c.caller.ljust(width)}  {c.status:17s} {got} ({c.millis:.0f} ms)")
    return "\n".join(lines)
