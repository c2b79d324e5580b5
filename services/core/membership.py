"""Static group membership: a stage process keeps one ``group.instance.id`` across
restarts, so a restarted process takes its partitions straight back instead of waiting
for its dead predecessor's session to time out.

A static member does not leave its group when it closes (neither aiokafka nor the Java
client sends LeaveGroup for one): the coordinator keeps its partitions for the session
timeout, waiting for it to come back. That is right after a crash, wrong after a
graceful shutdown (a Kubernetes rollout names the new pods differently): so at shutdown
the stage removes its own instance from the group, as the admin API's
``removeMembersFromConsumerGroup`` does (LeaveGroup v3 by instance id), and the group
rebalances at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.errors import for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int16, Int32, Schema, String

from .config import Settings
from .kafka import make_admin
from .topics import group_id

log = logging.getLogger(__name__)

UNKNOWN_MEMBER_ID = 25  # the instance is not (or no longer) in the group: nothing to do


class _LeaveGroupResponseV3(Response):  # type: ignore[misc]
    API_KEY = 13
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        (
            "members",
            Array(
                ("member_id", String("utf-8")),
                ("group_instance_id", String("utf-8")),
                ("error_code", Int16),
            ),
        ),
    )


class _LeaveGroupRequestV3(RequestStruct):  # type: ignore[misc]
    API_KEY = 13
    API_VERSION = 3
    RESPONSE_TYPE = _LeaveGroupResponseV3
    SCHEMA = Schema(
        ("group_id", String("utf-8")),
        ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))),
    )


class RemoveStaticMember(Request[_LeaveGroupRequestV3]):  # type: ignore[misc]
    """LeaveGroup v3 for one static member, named by its instance id (the member id is
    left empty: the coordinator looks the instance up, as for the admin API)."""

    API_KEY = 13

    def __init__(self, group: str, instance_id: str) -> None:
        self._group = group
        self._instance_id = instance_id

    def build(self, request_struct_class: type[_LeaveGroupRequestV3]) -> _LeaveGroupRequestV3:
        return request_struct_class(self._group, [("", self._instance_id)])


def consumer_options(settings: Settings) -> dict[str, Any]:
    """Consumer options for the stage's group: static when an instance id is set."""
    return {"group_instance_id": settings.instance_id} if settings.instance_id else {}


def _error_codes(response: Any) -> list[int]:
    return [response.error_code, *(member[2] for member in response.members)]


async def remove_static_member(settings: Settings, group: str, timeout: float) -> None:
    """Take this process's static instance out of ``group`` so its partitions move now.

    Best effort within ``timeout``: if it fails (the broker is down), the partitions move
    after the session timeout, as a crashed member's do; nothing is lost either way.
    """
    if not settings.instance_id:
        return
    try:
        await asyncio.wait_for(_remove(settings, group), timeout)
    except Exception as exc:  # best effort at exit: never let it skip the closing steps
        # (a broker older than 2.4 has no LeaveGroup v3: aiokafka raises a plain error)
        log.warning(
            "%s: could not leave group %s (%r); its partitions move after the session timeout",
            settings.instance_id,
            group,
            exc,
        )


async def _remove(settings: Settings, stage_group: str) -> None:
    group = group_id(settings.topic_prefix, stage_group)
    admin = make_admin(settings)
    await admin.start()
    try:
        coordinator = await admin.find_coordinator(group)
        response = await admin._send_request_to_node(  # no public API for LeaveGroup
            coordinator, RemoveStaticMember(group, settings.instance_id)
        )
    finally:
        await admin.close()
    failures = [code for code in _error_codes(response) if code not in (0, UNKNOWN_MEMBER_ID)]
    if failures:
        raise for_code(failures[0])(f"LeaveGroup for instance {settings.instance_id}")
    log.info("%s: left group %s; its partitions move now", settings.instance_id, group)
