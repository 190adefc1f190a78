"""How the Redis queue (runners/front/redis_queue.py) reaches Redis and what it keeps there: the
client (a plain URL, or Sentinel), the scripts with their declared keys and named arguments, and a
request's record as the fields of its hash.

``FLUX_QUEUE_URL`` is ``redis://`` or ``rediss://`` for one primary, or
``redis+sentinel://[:password@]host:port[,host:port...]/<master name>[/db]`` (``rediss+sentinel://``
for TLS to the primary) for a primary that Redis Sentinel watches: redis-py's Sentinel client asks
the sentinels for the primary, and after a failover its connections find the new one (a demoted
primary's READONLY answer makes it ask again: redis-py's ``SentinelManagedConnection``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from runners.config import QueueSettings
from runners.errors import InpaintError, ReportedError
from runners.front.queue import Outcome, Record, Status
from runners.front.redis_scripts import FIXED_KEYS, SCRIPTS
from runners.protocol.progress import LogLine
from runners.protocol.schema import InpaintRequest

SNAPSHOT_FIELDS = (
    "status",
    "base_url",
    "webhook_url",
    "deadline",
    "submitted_ms",
    "front_logs",
    "worker_logs",
    "end_log",
    "outcome",
    "error",
)


def sentinel_address(url: str) -> tuple[list[tuple[str, int]], str, int, str | None, bool]:
    """(sentinels, master name, db, password, tls) of a ``redis+sentinel://`` URL."""
    parts = urlsplit(url)
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[1]) if ":" in credentials else unquote(credentials)
    sentinels = []
    for address in netloc.split(","):
        host, _, port = address.rpartition(":")
        sentinels.append((host or address, int(port) if host else 26379))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path:
        raise ValueError("a redis+sentinel:// URL names the master after the hosts: /<master name>[/db]")
    return sentinels, path[0], int(path[1]) if len(path) > 1 else 0, password or None, parts.scheme.startswith("rediss")


def connect(settings: QueueSettings) -> aioredis.Redis:
    """redis-py's asyncio client for ``FLUX_QUEUE_URL`` (TLS for ``rediss``); a password in the URL
    wins over ``FLUX_QUEUE_REDIS_PASSWORD(_FILE)``. redis-py retries a call that lost its connection
    by itself (its default ``Retry``: 3 tries with backoff); the queue's loops retry what is left."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 15,
    }
    if password := settings.redis_password_value():
        options["password"] = password
    if settings.url.startswith("rediss") and settings.redis_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_ca_file)
    if "+sentinel://" not in settings.url:
        return aioredis.from_url(settings.url, **options)
    sentinels, master, db, url_password, tls = sentinel_address(settings.url)
    if url_password:
        options["password"] = url_password
    if tls:
        options["ssl"] = True
    else:
        options.pop("ssl_ca_certs", None)
    # The sentinels themselves: the same timeouts; a password of their own is not supported here
    # (Sentinel's requirepass is separate from the primary's).
    watchers = {key: value for key, value in options.items() if key.startswith("socket_")}
    return Sentinel(sentinels, sentinel_kwargs=watchers, **options).master_for(master, db=db, **options)


def where(client: aioredis.Redis) -> str:
    pool = client.connection_pool
    if service := getattr(pool, "service_name", None):
        return f"Sentinel master {service!r}"
    kwargs = pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


class Scripts:
    """The Lua scripts (runners/front/redis_scripts.py), registered with redis-py (EVALSHA, loaded
    again by redis-py when a restarted Redis has lost them), called with their keys declared and
    their arguments named."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.prefix = prefix
        self.fixed = [prefix + name for name in FIXED_KEYS]
        self.registered = {name: client.register_script(body) for name, body in SCRIPTS.items()}

    def key(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"

    async def __call__(self, name: str, ids: list[str] = (), **named: Any) -> Any:
        ids = list(dict.fromkeys(ids))
        keys = [*self.fixed, *(self.key(i) for i in ids)]
        return await self.registered[name](keys=keys, args=[json.dumps({**named, "ids": ids})])


def error_json(error: InpaintError) -> str:
    return json.dumps({"status": error.status, "error_type": error.error_type, "detail": error.detail()})


def logs_from(text: str | None) -> list[LogLine]:
    return [LogLine.model_validate(line) for line in json.loads(text or "[]")]


def logs_json(lines: list[LogLine]) -> str:
    return json.dumps([line.model_dump() for line in lines])


def outcome_fields(outcome: Outcome | None, error: InpaintError | None) -> dict[str, str]:
    """The hash fields that hold how a request ended."""
    fields: dict[str, str] = {}
    if outcome is not None:
        fields["outcome"] = json.dumps(
            {
                "output": outcome.output,
                "logs": [line.model_dump() for line in outcome.logs],
                "time": outcome.inference_time,
            }
        )
        fields["worker_logs"] = logs_json(outcome.logs)
    if error is not None:
        fields["error"] = error_json(error)
    return fields


def request_fields(record: Record) -> dict[str, str]:
    """The hash fields of a new request."""
    return {
        "request": record.request.model_dump_json(),
        "base_url": record.base_url,
        "webhook_url": record.webhook_url or "",
        "deadline": repr(record.deadline) if record.deadline is not None else "",
    }


def record_from(request_id: str, fields: dict[str, str | None], position: int | None = None) -> Record:
    """A record as Redis holds it (with its inputs when ``fields`` has the request)."""
    outcome = error = None
    if fields.get("outcome"):
        data = json.loads(fields["outcome"])
        outcome = Outcome(output=data["output"], logs=logs_from(json.dumps(data["logs"])), inference_time=data["time"])
    if fields.get("error"):
        data = json.loads(fields["error"])
        error = ReportedError(data["status"], data["error_type"], data["detail"])
    return Record(
        request=InpaintRequest.model_validate_json(fields["request"]) if fields.get("request") else None,
        base_url=fields.get("base_url") or "",
        webhook_url=fields.get("webhook_url") or None,
        deadline=float(fields["deadline"]) if fields.get("deadline") else None,
        id=request_id,
        submitted_at=int(fields.get("submitted_ms") or 0) / 1000,
        status=Status(fields["status"]),
        front_logs=logs_from(fields.get("front_logs")),
        worker_logs=logs_from(fields.get("worker_logs")),
        end_log=LogLine.model_validate_json(fields["end_log"]) if fields.get("end_log") else None,
        outcome=outcome,
        error=error,
        position=position,
    )
