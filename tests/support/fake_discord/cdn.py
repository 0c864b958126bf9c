"""The attachment CDN: the URL each stored file gets, and the handler that serves its bytes."""

from __future__ import annotations

import urllib.parse

from aiohttp import web

from .recording import RequestLog
from .state import DiscordState


def attachment_url(base_url: str, attachment_id: int, filename: str) -> str:
    return f"{base_url}/cdn/attachments/{attachment_id}/{urllib.parse.quote(filename)}"


class Cdn:
    """Serves the fake's stored attachments; requests are recorded and can be made to fail."""

    route = "/cdn/attachments/{attachment_id}/{filename}"  # aiohttp's pattern for `attachment_url`

    def __init__(self, state: DiscordState, log: RequestLog) -> None:
        self.state = state
        self.log = log

    async def handle(self, request: web.Request) -> web.StreamResponse:
        record = self.log.record(request, request.path, None, [])
        record.route = "cdn_attachment"
        failure = self.log.answer_injected_failure(record)
        if failure is not None:
            return failure
        attachment_id = request.match_info["attachment_id"]
        attachment = self.state.attachments.get(int(attachment_id)) if attachment_id.isdigit() else None
        if attachment is None:
            record.status = 404
            return web.Response(status=404, text="Not Found")
        record.status = 200
        return web.Response(body=attachment.data, content_type=attachment.content_type or "application/octet-stream")
