"""A fleet on Redis (docs/fleet.md), as real processes: two ``bentoml serve`` replicas sharing one
``redis-server`` and one S3 bucket (moto's server), each with its own model worker. Any replica answers any
request; a replica killed with SIGKILL leaves its work to the other; SIGTERM hands back what it
cannot finish; Redis stopped (or killed) and started again costs 503s, then nothing; a bucket that
refuses fails each affected request once.

The tests share one fleet, in any order: each starts with both replicas and Redis up (the ``fleet``
fixture starts again whatever an earlier test stopped). Those that stop a replica come last, so that
in this order a replica is started again three times, not four. The requests that must last a while sleep in
their steps (tests/faults), so they last as long on any CPU and take next to none of it.
"""

from __future__ import annotations

import collections
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress

import fal_client
import fal_client.client
import httpx
import psutil
import pytest
import redis as redis_client

from tests.conftest import (
    FAULT_PATH,
    REPO,
    SLOW_PROMPT,
    LocalHandler,
    bentoml_server,
    local_http_server,
    moto_s3_server,
    redis_server,
    wait_for,
)
from tests.test_s3_store import AWS_ENV

APP = "fal-ai/flux-lora/inpainting"
REQUESTS = "queue/fal-ai/flux-lora/requests"
EXAMPLE = json.loads((REPO / "examples" / "request.json").read_text())
QUICK = {**EXAMPLE, "num_inference_steps": 4, "image_size": {"width": 64, "height": 64}, "enable_safety_checker": False}
STORED = {**QUICK, "sync_mode": False}  # its image goes to the bucket


def stepped(steps: int) -> dict:
    """A request of ``steps`` steps that sleep 0.3 s or more each (tests/faults): 0.3 * ``steps`` s or
    more on any CPU, with next to no compute."""
    return {**STORED, "prompt": f"please {SLOW_PROMPT}", "num_inference_steps": steps, "strength": 1.0}


RUNNING = stepped(5)  # 1.5 s or more: still running a few polls after it started
LONG = stepped(50)  # 15 s or more: cancelled long before its end
# FLUX_DRAIN_TIMEOUT_S of the fleet: long enough for a test to see a replica draining before it exits
DRAIN_S = 4


class Hooks(LocalHandler):
    received: list[dict] = []  # the deliveries answered 200
    refused: list[dict] = []  # those answered 503 while ``refuse`` is set (the sender retries them)
    refuse = threading.Event()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Hooks.refuse.is_set():
            Hooks.refused.append(body)
            self.send(503, b"", "text/plain")
            return
        Hooks.received.append(body)
        self.send(200, b"", "text/plain")


class Fleet:
    """Replicas by name; each can be killed and started again (on a new port)."""

    def __init__(self, tmp, redis_url: str, bucket_url: str, s3_endpoint: str) -> None:
        self.tmp, self.stack = tmp, ExitStack()
        self.env = {
            **AWS_ENV,
            "FLUX_QUEUE_URL": redis_url,
            "FLUX_STORE_URL": bucket_url,  # one bucket for the fleet (moto's S3 server)
            "FLUX_STORE_ENDPOINT_URL": s3_endpoint,
            "FLUX_QUEUE_LEASE_S": "4",
            "FLUX_QUEUE_CONCURRENCY": "2",
            "FLUX_BATCH_MAX_SIZE": "2",
            # A loaded 2-core runner was seen to stall answers past 2 s; the lease must outlast it by 1 s.
            "FLUX_QUEUE_REDIS_TIMEOUT_S": "3",
            "PYTHONPATH": FAULT_PATH,  # tests/faults: requests whose steps sleep, as slow on any CPU
            "FLUX_DRAIN_TIMEOUT_S": str(DRAIN_S),
            "XDG_CACHE_HOME": str(tmp / "cache"),  # one tiny model on disk for both
            "FLUX_ALLOW_PRIVATE_HOSTS": "127.0.0.1",
        }
        self.served: dict[str, object] = {}
        self.starts = collections.Counter()

    def start(self, *names: str) -> None:
        def one(name: str):
            self.starts[name] += 1
            directory = self.tmp / f"{name}-{self.starts[name]}"
            directory.mkdir()
            return name, self.stack.enter_context(bentoml_server(directory, **self.env))

        with ThreadPoolExecutor(len(names)) as pool:
            self.served.update(pool.map(one, names))

    def ensure_running(self, redis) -> None:
        """Start again whatever an earlier test stopped: Redis, and each replica whose process ended."""
        if redis.process is None or redis.process.poll() is not None:
            redis.start()
        stopped = [name for name, served in self.served.items() if served.process.poll() is not None]
        if stopped:
            self.start(*stopped)

    def url(self, name: str) -> str:
        return self.served[name][0]

    def log(self, name: str) -> str:
        return self.served[name][1].read_text()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.served[name].process
        if sig == signal.SIGKILL:  # the front and its model worker too (BentoML starts them in sessions of their own)
            members = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
            for member in members:
                with suppress(psutil.NoSuchProcess):
                    member.kill()
            wait_for(lambda: all(map(gone, members)), 30, 0.02)  # dead when this returns
        else:
            process.send_signal(sig)  # as Kubernetes does: the main process only


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server with one bucket: (endpoint, s3:// URL of the fleet's outputs)."""
    import boto3

    with moto_s3_server(tmp_path_factory.mktemp("moto")) as endpoint:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket="fleet")
        yield endpoint, "s3://fleet/outputs"


@pytest.fixture(scope="module")
def started_fleet(tmp_path_factory, redis, s3):
    endpoint, bucket_url = s3
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), redis.url, bucket_url, endpoint)
    with fleet.stack:
        fleet.start("a", "b")
        yield fleet


@pytest.fixture
def fleet(started_fleet, redis):
    """The module's fleet, both replicas and Redis up, whatever ran before."""
    started_fleet.ensure_running(redis)
    return started_fleet


@pytest.fixture(scope="module")
def hooks():
    with local_http_server(Hooks) as url:
        yield f"{url}/hook"


def submit(base: str, body: dict, webhook: str | None = None) -> str:
    params = {"fal_webhook": webhook} if webhook else {}
    response = httpx.post(f"{base}/queue/{APP}", params=params, json=body, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["request_id"]


def status(base: str, request_id: str) -> dict:
    return httpx.get(f"{base}/{REQUESTS}/{request_id}/status", params={"logs": 1}, timeout=30).json()


def completed(bases: list[str], request_id: str) -> dict:
    """Poll, on whichever replica answers, until the request is COMPLETED."""

    last: list = []

    def done():
        for base in bases:
            try:
                body = status(base, request_id)
            except httpx.HTTPError:
                continue
            last[:] = [base, body]
            return body if body.get("status") == "COMPLETED" else None

    return wait_for(done, seen=lambda: f"for request {request_id}; last status seen: {last}")


def settled(redis_url: str) -> None:
    """Wait until the fleet has nothing left to run or to report: no request waiting, none leased,
    no report (webhook) claimed in Redis (the fleet's key prefix, ``flux:``). From then on no replica
    runs or delivers anything again, so a second delivery of a webhook would have come by now."""
    client = redis_client.Redis.from_url(redis_url, socket_timeout=10)

    def counts() -> dict[str, int]:
        return {key: client.zcard(f"flux:{key}") for key in ("waiting", "running", "unreported")}

    wait_for(lambda: not any(counts().values()), 120, 0.1, seen=lambda: f"in Redis: {counts()}")


def in_flight(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("flux_in_flight "):
            return float(line.split()[1])
    return 0.0


def metric(base: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def test_any_replica_answers_every_route_for_a_request_the_other_took(fleet):
    a, b = fleet.url("a"), fleet.url("b")
    request_id = submit(a, STORED)
    first = status(b, request_id)
    assert first["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED") and first["request_id"] == request_id
    assert first["status_url"].startswith(a)  # the URLs name the replica that took it; any serves them
    with httpx.stream("GET", f"{b}/{REQUESTS}/{request_id}/status/stream", params={"logs": 1}, timeout=120) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1]["status"] == "COMPLETED" and "error" not in events[-1]
    assert any(line["message"].startswith("step ") for line in events[-1]["logs"])
    result = httpx.get(f"{b}/{REQUESTS}/{request_id}", timeout=30)
    assert result.status_code == 200 and result.json()["images"][0]["width"] == 64
    image_url = result.json()["images"][0]["url"]
    assert image_url.startswith(fleet.env["FLUX_STORE_ENDPOINT_URL"] + "/fleet/outputs/")  # the bucket, not a replica
    image = httpx.get(image_url, timeout=30)  # a presigned GET, whichever replica answered
    assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"  # the JPEG A stored

    # A cancel sent to one replica stops the request where it runs, at a step boundary.
    slow = submit(a, LONG)
    runner = wait_for(lambda: next((n for n in ("a", "b") if in_flight(fleet.url(n)) >= 1), None))
    other = fleet.url("b" if runner == "a" else "a")
    wait_for(lambda: any(line["message"].startswith("step ") for line in status(other, slow).get("logs") or []))
    cancel = httpx.put(f"{other}/{REQUESTS}/{slow}/cancel", timeout=30)
    assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    assert status(fleet.url(runner), slow)["error_type"] == "request_cancelled"
    stopped = wait_for(lambda: f"request {slow} cancelled: left the batch after step" in fleet.log(runner), 60)
    assert stopped and f"request {slow} done" not in fleet.log(runner)
    assert httpx.get(f"{other}/{REQUESTS}/nope/status", timeout=10).status_code == 404


def test_the_official_client_against_the_replicas_in_turn(fleet, monkeypatch):
    a, b = fleet.url("a"), fleet.url("b")
    client = fal_client.SyncClient(key="any")

    def on(base: str) -> None:  # the client's two URL globals, read at each call
        monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", base + "/")
        monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", base + "/queue/")

    on(a)
    handle = client.submit(APP, arguments=QUICK)
    on(b)
    final = wait_for(
        lambda: isinstance(s := client.status(APP, handle.request_id, with_logs=True), fal_client.Completed) and s
    )
    assert [line["message"] for line in final.logs][0] == "queued"
    on(a)
    assert client.result(APP, handle.request_id)["images"][0]["width"] == 64
    on(b)
    assert client.run(APP, arguments=QUICK)["seed"] == 42  # the sync route, on the other replica
    on(a)
    waiting = client.submit(APP, arguments=LONG)
    on(b)
    client.cancel(APP, waiting.request_id)
    on(a)
    with pytest.raises(fal_client.client.FalClientHTTPError) as error:
        client.result(APP, waiting.request_id)
    assert "cancelled" in str(error.value)


FINISH_ERRORS = 'flux_queue_redis_errors_total{operation="finish"}'


def test_redis_stopped_and_started_again_costs_503s_then_nothing(fleet, redis):
    a, b = fleet.url("a"), fleet.url("b")
    accepted = [submit(a if i % 2 else b, RUNNING) for i in range(6)]  # more than the fleet runs at once
    wait_for(lambda: in_flight(a) + in_flight(b) >= 2)
    finishes_failed = sum(metric(base, FINISH_ERRORS) for base in (a, b))
    redis.stop()
    for base in (a, b):
        refused = httpx.post(f"{base}/queue/{APP}", json=QUICK, timeout=30)
        assert refused.status_code == 503 and refused.json()["error_type"] == "queue_unavailable"
        assert "retry-after" in refused.headers and "unreachable" in refused.json()["detail"]
        looked_up = httpx.get(f"{base}/{REQUESTS}/{accepted[0]}/status", timeout=30)
        assert looked_up.status_code == 503 and looked_up.json()["error_type"] == "queue_unavailable"
    assert httpx.get(f"{a}/readyz", timeout=10).status_code == 200  # the replicas stay up, running their work
    # Away until a running request has finished: its result waits for Redis (the finish is retried).
    wait_for(lambda: sum(metric(base, FINISH_ERRORS) for base in (a, b)) > finishes_failed, 60)
    redis.start()  # same port, same append-only file: the waiting requests are still there
    for request_id in accepted:
        assert "error" not in completed([a, b], request_id), request_id
    assert "error" not in completed([a], submit(a, QUICK))  # recovered, no server restarted
    assert metric(a, "flux_queue_redis_errors_total") + metric(b, "flux_queue_redis_errors_total") >= 2


def test_a_bucket_that_refuses_fails_each_affected_request_once_and_spares_the_rest(fleet, s3):
    """The outputs' bucket is gone (S3 answers NoSuchBucket): each request that needs it runs once on
    one replica and ends 503 ``storage_unavailable``; it is not handed from replica to replica until
    its deadline. A ``sync_mode`` request, which needs no store, is unaffected."""
    import boto3

    endpoint, _ = s3
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    a, b = fleet.url("a"), fleet.url("b")
    puts_before = sum(fleet.log(n).count("could not put s3://fleet/") for n in ("a", "b"))
    for item in client.list_objects_v2(Bucket="fleet").get("Contents", []):
        client.delete_object(Bucket="fleet", Key=item["Key"])
    client.delete_bucket(Bucket="fleet")
    try:
        ids = [submit(a if i % 2 else b, {**QUICK, "sync_mode": False, "seed": i}) for i in range(4)]
        spared = httpx.post(f"{b}/{APP}", json=QUICK, timeout=120)  # sync_mode: no store needed
        assert spared.status_code == 200 and spared.json()["images"][0]["url"].startswith("data:image/")
        for request_id in ids:
            body = completed([a, b], request_id)
            assert body.get("error_type") == "storage_unavailable", body
            messages = [line["message"] for line in body["logs"]]
            assert not any("queued again" in m for m in messages) and messages[-1].startswith("failed: "), messages
        puts = sum(fleet.log(n).count("could not put s3://fleet/") for n in ("a", "b")) - puts_before
        assert puts == len(ids), puts  # one try each (boto3's own retries are inside one put)
        # none of them was handed back to the line as if the model tier were away (a replica's log
        # covers its whole life: earlier tests' hand-backs, of other requests, may be in it)
        logs = fleet.log("a") + fleet.log("b")
        assert not any(f"request {request_id}: the model tier here is unavailable" in logs for request_id in ids)
    finally:
        client.create_bucket(Bucket="fleet")
    assert "error" not in completed([a], submit(a, STORED))  # the bucket back: stored again


def test_redis_killed_under_load_loses_no_accepted_request(fleet, redis):
    """SIGKILL of Redis (no shutdown, no AOF rewrite) while submits pour in: every request that got
    a 202 is still there after the restart, with the shipped manifest's appendfsync (conftest reads
    it): ``always`` writes and fsyncs a command before Redis answers it. With ``everysec`` this test
    failed (1 of 18 lost, on a busy disk): Redis holds back its AOF write while a background fsync
    is slow, for up to 2 s, and answers meanwhile."""
    a, b = fleet.url("a"), fleet.url("b")
    accepted: list[str] = []
    stop = threading.Event()

    def pour(base: str) -> None:
        while not stop.is_set():
            with suppress(httpx.HTTPError):
                response = httpx.post(f"{base}/queue/{APP}", json={**QUICK, "seed": len(accepted)}, timeout=30)
                if response.status_code == 202:
                    accepted.append(response.json()["request_id"])
                else:
                    assert response.status_code == 503, response.text  # never a 500
                    time.sleep(0.05)

    with ThreadPoolExecutor(4) as pool:
        pourers = [pool.submit(pour, base) for base in (a, b, a, b)]
        wait_for(lambda: len(accepted) >= 10, 120, 0.01)
        redis.stop(signal.SIGKILL)
        at_kill = len(accepted)
        redis.start()
        wait_for(lambda: len(accepted) >= at_kill + 4, 120, 0.05)  # taken again after the restart
        stop.set()
        for pourer in pourers:
            pourer.result(timeout=60)
    lost = [i for i in accepted if httpx.get(f"{a}/{REQUESTS}/{i}/status", timeout=30).status_code == 404]
    assert not lost, f"{len(lost)} of {len(accepted)} accepted requests lost with Redis's SIGKILL"
    for request_id in accepted:
        assert "error" not in completed([a, b], request_id), request_id


def test_a_replica_killed_while_running_leaves_every_request_to_the_other(fleet, hooks, redis):
    a, b = fleet.url("a"), fleet.url("b")
    Hooks.received.clear()
    ids = [submit(a if i % 2 else b, RUNNING, hooks) for i in range(6)]
    wait_for(lambda: in_flight(a) >= 1 and in_flight(b) >= 1)  # A holds requests, and some wait
    fleet.kill("a")
    bodies = {request_id: completed([b], request_id) for request_id in ids}  # its client, polling, sees them end
    assert all("error" not in body for body in bodies.values()), bodies
    rerun = [i for i, body in bodies.items() if any("queued again" in line["message"] for line in body["logs"])]
    assert rerun  # what A held ran again on B, under the same id
    assert metric(b, "flux_queue_reruns_total") >= len(rerun)
    wait_for(lambda: {hook["request_id"] for hook in Hooks.received} >= set(ids), 60)
    settled(redis.url)
    counts = collections.Counter(hook["request_id"] for hook in Hooks.received)
    assert all(counts[i] == 1 for i in ids), counts
    assert all(hook["status"] == "OK" for hook in Hooks.received)


def test_a_replica_killed_while_delivering_a_webhook_leaves_it_to_the_other(fleet, hooks, redis):
    Hooks.received.clear(), Hooks.refused.clear()
    Hooks.refuse.set()  # the receiver is down for now: the replica that finished it keeps retrying
    try:
        request_id = submit(fleet.url("a"), QUICK, hooks)
        wait_for(lambda: any(hook["request_id"] == request_id for hook in Hooks.refused), 120)
        retrying = f"webhook for {request_id} attempt 1 failed: HTTP 503"
        deliverer = wait_for(lambda: next((n for n in ("a", "b") if retrying in fleet.log(n)), None), 30)
        # Between two of its retries. Dead once kill returns: what the receiver accepts from now on
        # comes from the other replica.
        fleet.kill(deliverer)
    finally:
        Hooks.refuse.clear()
    other = "b" if deliverer == "a" else "a"
    wait_for(lambda: Hooks.received, 60)  # after the killed replica's report claim ran out (4 s here)
    settled(redis.url)
    assert [(hook["request_id"], hook["status"]) for hook in Hooks.received] == [(request_id, "OK")]
    assert Hooks.received[0]["payload"]["images"][0]["width"] == 64  # the stored result
    assert metric(fleet.url(other), "flux_queue_reports_taken_over_total") >= 1
    assert f"request {request_id}: its replica stopped before reporting it" in fleet.log(other)


def test_load_over_both_replicas_with_one_killed_and_restarted_loses_nothing(fleet, hooks, redis):
    Hooks.received.clear()
    outcomes: dict[int, str] = {}
    ids: dict[int, str] = {}
    refused: collections.Counter = collections.Counter()  # 503s at submit, each retried
    unanswered = []  # submits sent to A as it was killed: A may have taken them before it died
    lock = threading.Lock()
    total = 24

    def bases(n: int) -> list[str]:
        order = [fleet.url("a"), fleet.url("b")]
        return order if n % 2 else order[::-1]

    def one(n: int) -> None:
        request_id = None
        while request_id is None:  # a replica that is down refuses the connection: try the other
            for base in bases(n):
                try:
                    response = httpx.post(
                        f"{base}/queue/{APP}", params={"fal_webhook": hooks}, json={**QUICK, "seed": n}, timeout=30
                    )
                except httpx.ConnectError:  # nothing listened: nothing was taken
                    continue
                except httpx.HTTPError:  # sent, but the answer never came
                    with lock:
                        unanswered.append(base)
                    continue
                if response.status_code == 503:  # refused, so not accepted: what a client does is retry
                    assert response.json()["error_type"] in ("queue_unavailable", "server_draining"), response.text
                    assert response.headers["retry-after"]
                    with lock:
                        refused[response.json()["error_type"]] += 1
                    continue
                assert response.status_code == 202, response.text
                request_id = response.json()["request_id"]
                break
            else:
                time.sleep(0.5)
        with lock:
            ids[n] = request_id
        body = completed(bases(n), request_id)
        outcomes[n] = body.get("error_type", "ok")

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, n) for n in range(total)]
        wait_for(lambda: len(ids) >= total // 2, every=0.05)
        fleet.kill("a")  # half-way
        restart = pool.submit(fleet.start, "a")
        for future in futures:
            future.result(timeout=300)
        restart.result(timeout=300)
    counted = collections.Counter(outcomes.values())
    print(f"\nload over the fleet, replica A killed half-way: {dict(counted)}; 503s retried at submit: {dict(refused)}")
    # Nothing refused at submit counts: 24 requests are far under FLUX_QUEUE_MAX_LENGTH, so every
    # one is accepted (503s at submit retried) and completes without error.
    assert len(outcomes) == total and counted == {"ok": total}, counted
    accepted = [ids[n] for n in ids if outcomes[n] == "ok"]
    assert len(set(accepted)) == len(accepted)

    # A webhook A was delivering when it was killed is delivered by B (or A restarted) once A's
    # report claim runs out (FLUX_QUEUE_LEASE_S=4 here).
    def delivered() -> set[str]:
        return {hook["request_id"] for hook in Hooks.received}

    wait_for(lambda: delivered() >= set(accepted), 60, seen=lambda: f"no webhook for {set(accepted) - delivered()}")
    settled(redis.url)
    counts = collections.Counter(hook["request_id"] for hook in Hooks.received)
    assert all(counts[i] >= 1 for i in accepted), counts
    # Twice only if the kill fell in the milliseconds between the receiver's 2xx and A dropping its
    # claim (docs/fleet.md): at most one request, for the one kill.
    assert sum(n - 1 for n in counts.values()) <= 1, counts
    # A webhook for an id the client never got only for a submit whose answer died with A: A had
    # put it in the line, so it ran (docs/fleet.md); the client's retry made another request.
    assert len(set(counts) - set(accepted)) <= len(unanswered), (counts, accepted, unanswered)
    taken_over = sum(metric(fleet.url(n), "flux_queue_reports_taken_over_total") for n in ("a", "b"))
    print(f"webhooks taken over from the killed replica: {taken_over:.0f}; most delivered: {counts.most_common(1)}")


def test_sigterm_with_a_full_queue_hands_the_waiting_work_to_the_other_replica(fleet):
    a, b = fleet.url("a"), fleet.url("b")
    # Its 30 steps sleep 0.3 s each: 9 s or more on any CPU, past the drain (DRAIN_S), so the replica
    # running it must hand it back however fast the machine is; the other one then runs it all again.
    long = submit(a, stepped(30))
    wait_for(lambda: "step " in str(status(a, long).get("logs")), 120, 0.05)
    runner = "a" if in_flight(a) >= 1 else "b"
    if runner == "b":  # B took it: SIGTERM B instead (the names are only names)
        a, b = b, a
    ids = [long, *(submit(a, {**STORED, "seed": i}) for i in range(6))]  # more than the fleet's free feeders
    fleet.kill(runner, signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{a}/readyz", timeout=5).status_code == 503, 30, 0.05)
    refused = httpx.post(f"{a}/queue/{APP}", json=QUICK, timeout=10)
    assert refused.status_code == 503 and refused.json()["error_type"] == "server_draining"
    fleet.served[runner].process.wait(timeout=120)
    bodies = [completed([b], request_id) for request_id in ids]
    assert all("error" not in body for body in bodies), bodies  # nothing failed: what A could not finish, B ran
    messages = [line["message"] for line in bodies[0]["logs"]]
    assert "handed back by a replica shutting down; queued again" in messages, messages
    assert messages[0] == "queued" and messages[-1] == "completed"  # and in the order they happened
