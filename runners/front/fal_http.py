"""fal's HTTP routes over the request queue, as fal's clients expect them (docs/fal-contract.md).

One ``FalApi`` builds the Starlette app that service.py mounts on the BentoML front: auth, body
parsing and validation, the sync and queue routes, status bodies and the status stream, results,
cancellation and stored files, with every error in fal's shape. It reaches the running service's
queue and store through ``context()``, so the routes exist before BentoML creates the service.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
from collections.abc import Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from runners.config import Settings
from runners.errors import (
    ClientDisconnected,
    InpaintError,
    InvalidField,
    RequestInvalid,
    RequestNotFound,
    RequestTooLarge,
)
from runners.fetch import UrlRefused
from runners.front import playground
from runners.front.openapi import openapi_document
from runners.front.queue import Record, Status
from runners.protocol.images import SUFFIX_CONTENT_TYPES
from runners.protocol.schema import InpaintRequest

log = logging.getLogger(__name__)
APP_ID = "fal-ai/flux-lora/inpainting"
REQUESTS_PATH = "queue/fal-ai/flux-lora/requests"  # fal: status/result/cancel under owner/alias only


def error_response(status: int, body: dict, request_id: str | None = None) -> JSONResponse:
    """Every error answer: fal's body, its error-type header, and a retry hint on 429/503."""
    headers = {"x-fal-error-type": body["error_type"]}
    if request_id:
        headers["x-fal-request-id"] = request_id
    if status in (429, 503):
        headers["Retry-After"] = "5"
    return JSONResponse(body, status_code=status, headers=headers)


class FalApi:
    """The routes; ``context()`` returns the running front (its ``queue`` and ``store``). ``reject``
    counts a request refused at the door, by reason (the error type), for metrics; requests that
    are accepted are counted when they finish, by the queue's owner."""

    def __init__(self, context: Callable, settings: Settings, reject: Callable[[str], None], model_label: str):
        self.context, self.settings, self.reject, self.model_label = context, settings, reject, model_label

    def app(self) -> Starlette:
        requests = f"/{REQUESTS_PATH}/{{request_id}}"
        self.routes = [
            Route(f"/{APP_ID}", self.guarded(self.run_sync, admits=True), methods=["POST"]),
            Route(f"/queue/{APP_ID}", self.guarded(self.submit, admits=True), methods=["POST"]),
            Route(f"{requests}/status", self.guarded(self.status), methods=["GET"]),
            Route(f"{requests}/status/stream", self.guarded(self.status_stream), methods=["GET"]),
            Route(requests, self.guarded(self.result), methods=["GET"]),
            Route(f"{requests}/cancel", self.guarded(self.cancel), methods=["PUT"]),
            Route("/files/{name}", self.stored_file, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/", playground.index, methods=["GET"]),  # the playground page (playground.py), open
            Route("/playground/{name}", playground.asset, methods=["GET"]),
        ]
        # BentoML's mount only takes paths one of our routes matches; other paths under fal's prefixes
        # (a request id holding '/', say) would get its plain-text 404. These answer in fal's shape.
        unknown = [Route(f"/{prefix}/{{rest:path}}", self.no_route) for prefix in ("fal-ai", "queue", "files")]
        return Starlette(routes=self.routes + unknown, exception_handlers={HTTPException: self.routing_error})

    async def no_route(self, request: Request) -> Response:
        allowed = {
            m for route in self.routes if route.matches(request.scope)[0] == Match.PARTIAL for m in route.methods
        }
        if allowed:
            raise HTTPException(405, headers={"Allow": ", ".join(sorted(allowed))})
        raise HTTPException(404)

    async def routing_error(self, request: Request, exc: HTTPException) -> Response:
        """No such route or method: fal's error shape, like every answer."""
        kinds = {404: "not_found", 405: "method_not_allowed"}
        response = error_response(
            exc.status_code, {"detail": exc.detail, "error_type": kinds.get(exc.status_code, "http_error")}
        )
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    def guarded(self, handler, admits: bool = False):
        """Auth, fal-shaped errors and no leaked internals for every fal route. On the routes that
        admit requests (``admits``), an error raised is a refusal, counted by its reason."""

        @functools.wraps(handler)
        async def route(request: Request) -> Response:
            if not self.authorized(request):
                self.reject("unauthorized")
                return error_response(401, {"detail": "Unauthorized", "error_type": "unauthorized"})
            try:
                return await handler(request)
            except InpaintError as exc:
                if admits:
                    self.reject(exc.error_type)
                log.info("%s %s answered %s %s", request.method, request.url.path, exc.status, exc.error_type)
                return error_response(exc.status, exc.to_body())
            except Exception:
                if admits:
                    self.reject("internal_error")
                log.exception("%s %s failed unexpectedly", request.method, request.url.path)
                return error_response(500, InpaintError("internal server error").to_body())

        return route

    def authorized(self, request: Request) -> bool:
        keys = self.settings.server.api_keys
        if not keys:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip().encode() if scheme.lower() == "key" else b""
        # Compare against every key, in constant time, whatever matches.
        matches = [hmac.compare_digest(key.encode(), given) for key in keys]
        return any(matches)

    async def parse_request(self, request: Request) -> InpaintRequest:
        limit = self.settings.images.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"request body is over this server's limit of {limit} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestTooLarge(f"request body is over this server's limit of {limit} bytes")
        except ClientDisconnect:  # hung up while uploading: nothing to do, nobody to answer
            raise ClientDisconnected() from None
        try:
            fal_request = InpaintRequest.model_validate_json(bytes(body))
        except ValidationError as exc:
            raise RequestInvalid(exc.errors()) from None
        # The one check of the LoRA count: here, so that a queued request over it is refused at submit.
        if len(fal_request.loras) > self.settings.lora.max_per_request:
            raise InvalidField(
                "loras", f"at most {self.settings.lora.max_per_request} LoRAs per request on this server"
            )
        return fal_request

    def base_url(self, request: Request) -> str:
        configured = self.settings.server.public_url
        return (configured.rstrip("/") + "/") if configured else str(request.base_url)

    def request_urls(self, record: Record) -> dict[str, str]:
        response_url = f"{record.base_url}{REQUESTS_PATH}/{record.id}"
        return {
            "response_url": response_url,
            "status_url": f"{response_url}/status",
            "cancel_url": f"{response_url}/cancel",
        }

    async def status_body(self, record: Record, with_logs: bool) -> dict:
        queue = self.context().queue
        body = {"status": record.status.value, "request_id": record.id, **self.request_urls(record)}
        if record.status == Status.IN_QUEUE:
            body["queue_position"] = await queue.position(record)
        else:
            body["logs"] = record.logs if with_logs else None
        if record.status == Status.COMPLETED:
            body["metrics"] = {"inference_time": record.outcome.inference_time} if record.outcome else {}
            if record.error is not None:
                body["error"], body["error_type"] = record.error.message, record.error.error_type
        return body

    def flag(self, request: Request, name: str) -> bool:
        value = request.query_params.get(name, "0").lower()
        if value not in ("0", "1", "true", "false"):
            raise InvalidField(name, "must be 0, 1, true or false")
        return value in ("1", "true")

    async def find_record(self, request: Request) -> Record:
        record = await self.context().queue.get(request.path_params["request_id"])
        if record is None:
            raise RequestNotFound()
        return record

    async def run_sync(self, request: Request) -> Response:
        fal_request = await self.parse_request(request)
        queue = self.context().queue
        record = await queue.submit(fal_request, self.base_url(request))
        record = await self.answered_before_hang_up(request, record)
        if record.status != Status.COMPLETED:
            log.info(
                "request %s: the client disconnected; stopping its work", record.id, extra={"request_id": record.id}
            )
            await queue.end(record, ClientDisconnected())
            return Response(status_code=499)  # nobody reads it; uvicorn needs an answer all the same
        headers = {"x-fal-request-id": record.id, "x-flux-model": self.model_label}
        if record.error is not None:
            return error_response(record.error.status, record.error.to_body(), record.id)
        return JSONResponse(record.outcome.output, headers=headers)

    async def answered_before_hang_up(self, request: Request, record: Record) -> Record:
        """Wait for the record to finish; the finished record, or the unfinished one if the client
        disconnects first. The body has been read, so the next ASGI message the server sends is
        ``http.disconnect``, and only on a hang-up."""

        async def hang_up() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        done, watch = asyncio.create_task(self.context().queue.wait(record)), asyncio.create_task(hang_up())
        try:
            await asyncio.wait({done, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (done, watch):
                task.cancel()
        return done.result() if done.done() and not done.cancelled() else record

    async def submit(self, request: Request) -> Response:
        fal_request = await self.parse_request(request)
        webhook = request.query_params.get("fal_webhook")
        if webhook is not None:
            if not webhook.lower().startswith(("http://", "https://")):
                raise InvalidField("fal_webhook", "must be an http(s) URL")
            try:  # refused now, not silently dropped after the work is done
                await self.context().fetcher.check(webhook)
            except UrlRefused as exc:
                raise InvalidField("fal_webhook", str(exc)) from None
        queue = self.context().queue
        record = await queue.submit(fal_request, self.base_url(request), webhook_url=webhook)
        body = {
            "request_id": record.id,
            **self.request_urls(record),
            "status": record.status.value,
            "queue_position": await queue.position(record),
        }
        return JSONResponse(body, status_code=202, headers={"x-fal-request-id": record.id})

    async def status(self, request: Request) -> Response:
        record = await self.find_record(request)
        return JSONResponse(
            await self.status_body(record, self.flag(request, "logs")),
            status_code=200 if record.status == Status.COMPLETED else 202,
        )

    async def status_stream(self, request: Request) -> Response:
        record, with_logs = await self.find_record(request), self.flag(request, "logs")
        queue = self.context().queue

        async def events():
            nonlocal record
            last, last_sent = None, time.monotonic()
            while True:
                data = json.dumps(await self.status_body(record, with_logs))
                if data != last:
                    yield f"data: {data}\n\n"
                    last, last_sent = data, time.monotonic()
                elif time.monotonic() - last_sent > 15:
                    yield ": keep-alive\n\n"  # proxies drop silent streams
                    last_sent = time.monotonic()
                if record.status == Status.COMPLETED:
                    return
                await asyncio.sleep(0.2)
                try:
                    fresh = await queue.get(record.id)  # a snapshot, on Redis: read it again
                except InpaintError:  # the queue is unreachable for now: keep the stream, try again
                    continue
                if fresh is None:  # forgotten (retention) while streaming: nothing more to tell
                    return
                record = fresh

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def result(self, request: Request) -> Response:
        record = await self.find_record(request)
        if record.status != Status.COMPLETED:
            return error_response(
                400, {"detail": "the request is still in progress", "error_type": "request_in_progress"}, record.id
            )
        if record.error is not None:
            return error_response(record.error.status, record.error.to_body(), record.id)
        return JSONResponse(record.outcome.output, headers={"x-fal-request-id": record.id})

    async def cancel(self, request: Request) -> Response:
        outcome = await self.context().queue.cancel(request.path_params["request_id"])
        code = {"CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400, "NOT_FOUND": 404}[outcome]
        return JSONResponse({"status": outcome}, status_code=code)

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI document of these routes (BentoML's /docs.json does not describe them); open,
        like fal's own schema page."""
        return JSONResponse(openapi_document(APP_ID, REQUESTS_PATH))

    async def stored_file(self, request: Request) -> Response:
        """Output images (no key needed: names are unguessable, like fal's CDN URLs)."""
        path = self.context().store.open(request.path_params["name"])
        if path is None:
            return error_response(404, {"detail": "no such file (unknown or expired)", "error_type": "file_not_found"})
        media_type = SUFFIX_CONTENT_TYPES.get(path.suffix.lstrip("."), "application/octet-stream")
        return FileResponse(path, media_type=media_type, headers={"cache-control": "private, max-age=3600"})
