"""Who may call what: transport security, caller identity and a per-method allow-list for
the gRPC servers, and the matching client side (ranking to retrieval).

Settings: the `[security]` table of the config file (or `INKLING_SECURITY_<FIELD>`),
shared by every server of a deployment. With none of it set, servers listen in
plaintext and admit every caller: the embedded default for one machine's loopback,
which each server says at start.

- **TLS**: `cert_file` and `key_file` (PEM). **Mutual TLS**: `client_ca_file` too; a
  client must then present a certificate that CA signed. The files are read again on
  the first handshake after they change (`grpc.dynamic_ssl_server_credentials`): a
  renewed certificate needs no restart, and a broken file keeps the last good one.
- **Identity** of a caller: each DNS name or URI in its client certificate's subject
  alternative names, or the name a bearer token maps to (`authorization: Bearer <t>`,
  `tokens_file`: one `name token` pair per line, re-read when it changes).
- **Allow-list** (`allow`): full method name -> the names that may call it, e.g.
  `allow = {"inkling.v1.EventService/TrackEvents" = "ingest", "*" = "admin"}`;
  `inkling.v1.EventService/*` covers a service, `*` every method. Once any rule is
  set, a method no rule covers is refused to everyone (deny by default). The health
  service stays open (probes carry no identity). A rule naming a service or method
  the servers do not answer is refused at start, with the names they do answer.
- **Refusals**: no identity where one is needed is UNAUTHENTICATED, an identity the
  rule does not list is PERMISSION_DENIED; neither says what exists or why. Each is
  counted in ``inkling.rpc.refused{reason}`` and logged in bounded volume with the
  caller's name, never a token.
- **Redis** (`redis_acl`): every process connects to Redis as the ACL user of its role
  and the embedded Redis starts with those users (`inkling.redis_acl`).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from inkling.errors import ConfigurationError
from inkling.telemetry.instruments import RPC_REFUSED
from inkling.telemetry.sampled_log import SampledLog

log = logging.getLogger("inkling.security")

OPEN_SERVICES = ("grpc.health.v1.Health",)
"""Services every caller may use, rules or not."""


@dataclass(frozen=True)
class SecuritySettings:
    """Server and client security; every field empty is the plaintext default."""

    cert_file: Path | None = None
    """This server's certificate chain (PEM); with `key_file`, the server speaks TLS."""
    key_file: Path | None = None
    """This server's private key (PEM)."""
    client_ca_file: Path | None = None
    """CA certificates (PEM) that sign clients' certificates: mutual TLS, required."""
    tokens_file: Path | None = None
    """Bearer tokens a server accepts: one `name token` pair per line."""
    allow: dict[str, str] = field(default_factory=dict)
    """Method -> the callers (space-separated names) that may call it; see the module."""
    ca_file: Path | None = None
    """As a client: CA certificates (PEM) that sign the servers' certificates; set, the
    client speaks TLS."""
    client_cert_file: Path | None = None
    """As a client: this process's certificate chain (PEM), for mutual TLS."""
    client_key_file: Path | None = None
    """As a client: this process's private key (PEM)."""
    token_file: Path | None = None
    """As a client: a file holding the bearer token this process sends."""
    pseudonymise: bool | None = None
    """Replace user ids by keyed hashes at ingest and ranking (`inkling.pseudonym`); unset:
    on whenever TLS or allow rules are set."""
    pseudonym_keys_file: Path | None = None
    """The HMAC keys (`inkling.pseudonym`); unset: `<data_dir>/secrets/pseudonym.keys`,
    created with a random key when absent."""
    redis_acl: bool = False
    """Least privilege on Redis: each process connects as its role's ACL user (the
    passwords in `<data_dir>/redis/acl-secrets`, unless its Redis address names a user),
    and the embedded Redis starts with those users (`inkling.redis_acl`)."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigurationError("security: cert_file and key_file go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ConfigurationError("security: client_ca_file (mutual TLS) needs cert_file")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ConfigurationError("security: client_cert_file and client_key_file go together")
        for name in ("cert_file", "key_file", "client_ca_file", "tokens_file", "ca_file",
                     "client_cert_file", "client_key_file", "token_file"):  # fmt: skip
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigurationError(f"security: {name} {path} is not a readable file")
        for method, callers in self.allow.items():
            if not _valid_rule(method):
                raise ConfigurationError(
                    f"security: allow rule {method!r} is not '*', 'package.Service/*' or "
                    "'package.Service/Method'"
                )
            if not callers.split():
                raise ConfigurationError(f"security: allow rule {method!r} names no caller")
            why = _unknown_rule(method)
            if why is not None:  # a typo would silently deny the method it meant
                raise ConfigurationError(f"security: allow rule {method!r}: {why}")

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    @property
    def identifies(self) -> bool:
        """Whether a server checks callers (any rule set)."""
        return bool(self.allow)

    @property
    def pseudonymising(self) -> bool:
        if self.pseudonymise is not None:
            return self.pseudonymise
        return self.tls or self.identifies

    def describe(self) -> str:
        """One line for the server's start-up log."""
        if not self.tls and not self.identifies:
            return "plaintext, every caller admitted (the loopback default: set [security])"
        transport = "plaintext"
        if self.tls:
            transport = "mutual TLS" if self.client_ca_file is not None else "TLS"
        rules = f"{len(self.allow)} allow rules" if self.identifies else "every caller admitted"
        return f"{transport}, {rules}"


def _valid_rule(method: str) -> bool:
    if method == "*":
        return True
    service, sep, name = method.partition("/")
    return bool(sep) and "." in service and bool(name) and "/" not in name


def _known_methods() -> dict[str, set[str]]:
    """Service -> method names the servers answer: inkling's contract and reflection
    (health is open to all and takes no rule)."""
    from inkling.v1 import (
        admin_service_pb2,
        event_service_pb2,
        ranking_service_pb2,
        retrieval_service_pb2,
    )

    known = {
        service.full_name: {m.name for m in service.methods}
        for module in (
            admin_service_pb2,
            event_service_pb2,
            ranking_service_pb2,
            retrieval_service_pb2,
        )
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    known["grpc.reflection.v1alpha.ServerReflection"] = {"ServerReflectionInfo"}
    return known


def _unknown_rule(method: str) -> str | None:
    """Why a well-formed rule names nothing the servers answer; None when it does."""
    if method == "*":
        return None
    service, _, name = method.partition("/")
    known = _known_methods()
    if service not in known:
        return f"no service {service} (services: {', '.join(sorted(known))})"
    if name != "*" and name not in known[service]:
        return f"{service} has no method {name} (methods: {', '.join(sorted(known[service]))})"
    return None


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _mtimes(paths: list[Path | None]) -> tuple[float, ...]:
    return tuple(os.stat(p).st_mtime_ns if p is not None else 0 for p in paths)


def server_credentials(settings: SecuritySettings) -> grpc.ServerCredentials:
    """TLS (or mutual TLS) credentials that re-read their files when they change."""
    files = [settings.cert_file, settings.key_file, settings.client_ca_file]

    def load() -> Any:
        key, chain, ca = (
            _read(settings.key_file),
            _read(settings.cert_file),
            _read(settings.client_ca_file),
        )
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    state = {"mtimes": _mtimes(files)}
    sampled = SampledLog(log)  # fetch runs on every handshake: a broken file logs once a minute

    def fetch() -> Any:
        try:
            now = _mtimes(files)
            if now == state["mtimes"]:
                return None  # unchanged: keep the configuration in use
            config = load()
            state["mtimes"] = now
            log.warning("security: certificate files changed: reloaded")
            return config
        except Exception as e:  # a half-written or broken file: keep the last good one
            sampled.log(
                "certificates",
                logging.ERROR,
                f"security: certificate files unreadable, keeping the last ones: {e}",
            )
            return None

    return grpc.dynamic_ssl_server_credentials(
        load(), fetch, require_client_authentication=settings.client_ca_file is not None
    )


def channel_credentials(settings: SecuritySettings) -> grpc.ChannelCredentials | None:
    """A client's TLS credentials (with its certificate, for mutual TLS, and its bearer
    token as call credentials); None for plaintext."""
    if settings.ca_file is None:
        if settings.client_cert_file is not None or settings.token_file is not None:
            raise ConfigurationError(
                "security: a client certificate or token needs ca_file (tokens travel over "
                "TLS only)"
            )
        return None
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(settings.ca_file),
        private_key=_read(settings.client_key_file),
        certificate_chain=_read(settings.client_cert_file),
    )
    if settings.token_file is not None:
        token = Path(settings.token_file).read_text().strip()
        if not token:
            raise ConfigurationError(f"security: token_file {settings.token_file} is empty")
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `target`: over TLS with `credentials`, plaintext without."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, interceptors=interceptors)


class Tokens:
    """Bearer token -> caller name, from `tokens_file`, re-read (at most once a second)
    when the file changes; a broken file keeps the last good table."""

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._checked = float("-inf")
        self._mtime = -1
        self._table: list[tuple[bytes, str]] = []
        if path is not None:
            self._table = self._parse(Path(path).read_text())
            self._mtime = os.stat(path).st_mtime_ns

    def _parse(self, text: str) -> list[tuple[bytes, str]]:
        table = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ConfigurationError(f"security: {self.path} line {number} is not 'name token'")
            table.append((parts[1].encode(), parts[0]))
        return table

    def caller(self, token: str) -> str | None:
        """The name `token` maps to; every entry is compared, in constant time each."""
        if self.path is None:
            return None
        now = self._clock()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                mtime = os.stat(self.path).st_mtime_ns
                if mtime != self._mtime:
                    self._table = self._parse(Path(self.path).read_text())
                    self._mtime = mtime
            except (OSError, ConfigurationError) as e:
                log.error("security: tokens file unreadable, keeping the last one: %s", e)
        given = token.encode()
        found = None
        for secret, name in self._table:
            if hmac.compare_digest(secret, given):
                found = name
        return found


def identities(context: grpc.aio.ServicerContext, tokens: Tokens) -> set[str]:
    """The names the caller proves: its certificate's SANs, and its token's name."""
    names: set[str] = set()
    auth = context.auth_context() or {}
    for value in auth.get("x509_subject_alternative_name", ()):
        names.add(value.decode() if isinstance(value, bytes) else str(value))
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            name = tokens.caller(value[len("Bearer ") :].strip())
            if name is not None:
                names.add(name)
    return names


class Rules:
    """The allow-list: who may call a method."""

    def __init__(self, allow: Mapping[str, str]) -> None:
        self._rules = {m: frozenset(c.split()) for m, c in allow.items()}

    def __bool__(self) -> bool:
        return bool(self._rules)

    def callers(self, method: str) -> frozenset[str]:
        """Who may call `method` (`/package.Service/Method`): its own rule, else its
        service's, else `*`'s; nobody where none applies."""
        name = method.lstrip("/")
        service = name.partition("/")[0]
        for key in (name, f"{service}/*", "*"):
            if key in self._rules:
                return self._rules[key]
        return frozenset()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call (unary and streaming) against the rules, before the request
    is decoded or handled; admits everything when no rule is set."""

    def __init__(self, settings: SecuritySettings, every_s: float = 60.0) -> None:
        self.rules = Rules(settings.allow)
        self.tokens = Tokens(settings.tokens_file)
        self._log = SampledLog(log, every_s)

    async def _refuse(
        self, context: grpc.aio.ServicerContext, method: str, names: set[str]
    ) -> None:
        if names:
            reason, code, text = "permission_denied", grpc.StatusCode.PERMISSION_DENIED, "denied"
        else:
            reason, code, text = (
                "unauthenticated",
                grpc.StatusCode.UNAUTHENTICATED,
                "authentication required",
            )
        RPC_REFUSED.add(1, {"rpc.method": method, "reason": reason})
        who = ", ".join(sorted(names)) or "no identity"
        self._log.log(f"{reason} {method}", logging.WARNING, f"refused {method} ({reason}): {who}")
        await context.abort(code, text)

    def _check(self, method: str) -> Callable[[grpc.aio.ServicerContext], Any]:
        allowed = self.rules.callers(method)

        async def check(context: grpc.aio.ServicerContext) -> None:
            names = identities(context, self.tokens)
            if not names & allowed:
                await self._refuse(context, method, names)

        return check

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.rules or method.lstrip("/").startswith(OPEN_SERVICES):
            return handler
        check = self._check(method)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            streamed = handler.stream_stream

            async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                async for reply in streamed(requests, context):
                    yield reply

            return grpc.stream_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        refuse = self._refuse  # the contract has no other kind: refuse what cannot be checked

        async def unsupported(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await refuse(context, method, set())

        return grpc.unary_unary_rpc_method_handler(unsupported)
