"""The request log: every HTTP request recorded, injected failures (rate limits, errors), JSON answers."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .records import RecordedRequest, UploadedFile


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py only parses JSON when Content-Type is exactly "application/json";
    # web.json_response appends "; charset=utf-8", which makes it see plain text.
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return web.Response(status=status, body=json.dumps(body).encode(), headers=all_headers)


@dataclass
class InjectedFailure:
    method: str
    pattern: re.Pattern[str]
    status: int
    retry_after: float
    is_global: bool
    remaining: int


@dataclass
class Outage:
    """Every request with uploaded files (multipart) answered `status` until `until`
    (time.monotonic()), as Discord's upload path does when it is down."""

    status: int
    until: float
    answered: int = 0


class RequestLog:
    """What the client asked the fake over HTTP, and the failures waiting for its next requests."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._failures: list[InjectedFailure] = []
        self.upload_outage: Outage | None = None
        self._holds: list[InjectedFailure] = []
        self.held: list[RecordedRequest] = []  # requests held unanswered (see hold_next)
        self.released = asyncio.Event()  # set when the fake stops: held requests then get a 503

    def record(self, request: web.Request, path: str, body: Any, files: list[UploadedFile]) -> RecordedRequest:
        record = RecordedRequest(
            method=request.method,
            path=path,
            query=dict(request.query),
            headers=dict(request.headers),
            json=body,
            files=files,
            time=time.monotonic(),
        )
        self.requests.append(record)
        return record

    @property
    def unhandled_requests(self) -> list[RecordedRequest]:
        """Requests no route of the fake knew (answered 404): what the fake is missing."""
        return [r for r in self.requests if r.route is None and r.status == 404]

    def requests_matching(self, method: str, path_pattern: str) -> list[RecordedRequest]:
        """Recorded requests with this method ("*" for any) whose path fully matches the regex."""
        pattern = re.compile(path_pattern)
        return [r for r in self.requests if method in ("*", r.method) and pattern.fullmatch(r.path)]

    def fail_next(
        self,
        method: str,
        path_pattern: str,
        *,
        status: int = 429,
        retry_after: float = 0.1,
        times: int = 1,
        is_global: bool = False,
    ) -> None:
        """Answer the next `times` matching requests with `status` (429s carry `retry_after`).

        `path_pattern` is a regex matched in full against the path below the API base,
        e.g. r"/webhooks/\\d+/[^/]+" for interaction followups.
        """
        self._failures.append(
            InjectedFailure(method.upper(), re.compile(path_pattern), status, retry_after, is_global, times)
        )

    def fail_uploads_for(self, seconds: float, *, status: int = 503) -> Outage:
        """Answer every request that uploads files (a message or edit with attachments)
        with `status` for the next `seconds`; other requests go through."""
        self.upload_outage = Outage(status, time.monotonic() + seconds)
        return self.upload_outage

    def hold_next(self, method: str, path_pattern: str, *, times: int = 1) -> None:
        """Hold the next `times` matching requests unanswered and never act on them: as if
        they never reached Discord (a client killed while sending them). `held` lists them."""
        self._holds.append(InjectedFailure(method.upper(), re.compile(path_pattern), 503, 0.0, False, times))

    async def hold_if_due(self, record: RecordedRequest) -> web.Response | None:
        """For a request a hold is due for: wait until the fake stops, then answer 503 (by then
        nobody listens). None for any other request."""
        for hold in self._holds:
            if hold.remaining > 0 and hold.method in ("*", record.method) and hold.pattern.fullmatch(record.path):
                hold.remaining -= 1
                if hold.remaining == 0:
                    self._holds.remove(hold)
                self.held.append(record)
                await self.released.wait()
                record.status, record.response = 503, {"message": "held by the test", "code": 0}
                return json_response(record.response, 503)
        return None

    def answer_injected_failure(self, record: RecordedRequest) -> web.Response | None:
        """The injected failure's answer if one is due for this request (recorded on it), else None."""
        outage = self.upload_outage
        if outage is not None and record.files and time.monotonic() < outage.until:
            outage.answered += 1
            failure = InjectedFailure(record.method, re.compile(".*"), outage.status, 0.0, False, 1)
            record.status, record.response, response = self._failure_response(failure)
            return response
        failure = self._take_failure(record.method, record.path)
        if failure is None:
            return None
        record.status, record.response, response = self._failure_response(failure)
        return response

    def _take_failure(self, method: str, path: str) -> InjectedFailure | None:
        for failure in self._failures:
            if failure.remaining > 0 and failure.method in ("*", method) and failure.pattern.fullmatch(path):
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._failures.remove(failure)
                return failure
        return None

    @staticmethod
    def _failure_response(failure: InjectedFailure) -> tuple[int, dict[str, Any], web.Response]:
        if failure.status == 429:
            body = {
                "message": "You are being rate limited.",
                "retry_after": failure.retry_after,
                "global": failure.is_global,
                "code": 0,
            }
            # Without a Via header discord.py takes a 429 for a Cloudflare ban and gives up.
            headers = {
                "Via": "1.1 google",
                "Retry-After": str(max(1, int(failure.retry_after + 0.999))),
                "X-RateLimit-Scope": "global" if failure.is_global else "user",
            }
            if failure.is_global:
                headers["X-RateLimit-Global"] = "true"
            return 429, body, json_response(body, 429, headers)
        body = {"message": f"{failure.status}: injected failure", "code": 0}
        return failure.status, body, json_response(body, failure.status)
