"""The AdminService adapter (`ForgetUser`), hosted by the ingest process.

A forget (`inkling.erasure.forget_user`) blocks on Redis and rewrites Parquet files, so
it runs on a thread, one at a time; the event loop keeps serving TrackEvents meanwhile.
The service refuses every call unless the allow-list has a rule for it
(`AdminServicer.enabled`): a destructive method has no open default, even on the
plaintext loopback default where every other method is open.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import yaml

from inkling.config import Settings
from inkling.erasure import ForgetReport, forget_user
from inkling.events.bus import sync_client
from inkling.pseudonym import Pseudonymizer
from inkling.serving.validation import validate
from inkling.v1 import admin_service_pb2, admin_service_pb2_grpc

log = logging.getLogger("inkling.admin")
SERVICE_DESCRIPTOR = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"]
SERVICE = SERVICE_DESCRIPTOR.full_name


def admin_allowed(allow: dict[str, str]) -> bool:
    """Whether an allow rule names the admin service or one of its methods ("*" alone
    does not: it is too easy to write for the other services)."""
    return any(method.startswith(f"{SERVICE}/") for method in allow)


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        settings: Settings,
        enabled: bool,
        pseudonyms: Pseudonymizer | None = None,
        redis_address: str | None = None,
    ) -> None:
        """`redis_address`: where a forget connects (with ACLs on, as the ``eraser``
        role); None: ``settings.redis_address``."""
        self._settings = settings
        self._redis_address = redis_address or settings.redis_address
        self.enabled = enabled
        self._pseudonyms = pseudonyms
        self._lock = asyncio.Lock()

    async def ForgetUser(
        self,
        request: admin_service_pb2.ForgetUserRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_service_pb2.ForgetUserResponse:
        if not self.enabled:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "permission denied")
        validate(request)
        stored = (
            self._pseudonyms.every_version(request.user_id)
            if self._pseudonyms is not None
            else [request.user_id]
        )
        async with self._lock:
            reports = await asyncio.to_thread(self._forget, stored)
        response = admin_service_pb2.ForgetUserResponse(
            first_time=any(r.new for r in reports),
            sessions=sum(r.sessions for r in reports),
            files_rewritten=sum(r.files_rewritten for r in reports),
        )
        for report in reports:
            for where, count in report.removed.items():
                response.removed[where] = response.removed[where] + count
            response.models_flagged.extend(
                m for m in report.models_flagged if m not in response.models_flagged
            )
            response.incomplete.extend(report.incomplete)
        log.info(
            "forgot a user: %d sessions, %d files rewritten, %s",
            response.sessions,
            response.files_rewritten,
            "complete" if not response.incomplete else "INCOMPLETE",
        )
        return response

    def _forget(self, stored: list[str]) -> list[ForgetReport]:
        address = self._redis_address
        if not address:
            raise RuntimeError("the events server runs without a Redis address")
        client = sync_client(address, timeout_s=30.0)
        yaml_file = self._settings.feature_store_yaml
        project = (
            str(yaml.safe_load(yaml_file.read_text())["project"])
            if yaml_file.exists()
            else "inkling"
        )
        try:
            return [
                forget_user(self._settings, client, user_id, project=project) for user_id in stored
            ]
        finally:
            client.close()
