"""The Redis queue (runners/front/redis_queue.py) against a real ``redis-server``: two queues in one
process play two replicas sharing one line, each with a fake model tier that runs a request until
the test releases it. The served fleet (two ``bentoml serve`` processes) is tests/test_fleet.py."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest
from redis.exceptions import ResponseError

from runners.config import QueueSettings
from runners.errors import QueueFull, QueueUnavailable, ServerDraining, StorageUnavailable, WorkerUnavailable
from runners.front.queue import Status
from runners.front.redis_queue import RedisQueue
from tests.conftest import redis_server
from tests.test_queue import REQUEST, FakeWorker


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(shared_redis):
    """The module's Redis, emptied for each test: one ``redis-server`` start for the whole module."""
    import redis

    redis.Redis.from_url(shared_redis.url).flushall()
    return shared_redis.url


@pytest.fixture
def restartable_redis(tmp_path):
    with redis_server(tmp_path) as server:
        yield server


def run(coroutine, timeout=60):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


class Replica:
    """One queue with its fake worker and what it reported (its on_finish calls, ended). With
    ``report_gate``, a report (a webhook delivery) goes on until the test sets it."""

    def __init__(self, url: str, concurrency: int = 1, **settings) -> None:
        self.worker = FakeWorker()
        self.reporting: list[str] = []
        self.reported: list[str] = []
        self.report_gate: asyncio.Event | None = None
        self.queue = RedisQueue(
            QueueSettings(url=url, **{"lease_s": 2.0, "redis_timeout_s": 1.0, **settings}),
            concurrency,
            self.worker,
            on_finish=self.report,
        )
        self.queue.POLL_INTERVAL_S = 0.05
        self.beats: list[float] = []  # when each of its heartbeats that ended began (time.time())
        heartbeat = self.queue._heartbeat_once

        async def counted_heartbeat() -> None:
            began = time.time()
            await heartbeat()
            self.beats.append(began)

        self.queue._heartbeat_once = counted_heartbeat

    async def report(self, record) -> None:
        self.reporting.append(record.id)
        if self.report_gate is not None:
            await self.report_gate.wait()
        self.reported.append(record.id)

    def holds(self) -> list[str]:
        return list(self.queue._held)

    async def die(self) -> None:
        """As SIGKILL would: no hand-back, no finish, its lease simply stops being renewed."""
        self.queue._let_go_done = True
        for task in [*self.queue._tasks, *self.queue._after_finish.tasks]:
            while not task.done():  # as LifeCycle.stop: redis-py may swallow one cancellation (redis/redis-py#2028)
                task.cancel()
                await asyncio.wait([task], timeout=0.5)
        self.queue._tasks = []


async def until(predicate, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def past_a_lease(granted_by: float, *replicas: Replica) -> None:
    """Until one of ``replicas`` has run a whole heartbeat begun after a lease (or a report claim)
    granted by ``granted_by`` (time.time()) ran out, had nobody renewed it: that beat would have put
    the request back in the line, or taken its report over. A sleep past the lease hoped for as much;
    on a stalled machine it could end before any beat had looked."""
    expiry = granted_by + replicas[0].queue.settings.lease_s
    await until(lambda: any(began > expiry for replica in replicas for began in replica.beats))


async def status(queue: RedisQueue, request_id: str) -> Status:
    return (await queue.get(request_id)).status


def test_one_line_for_two_replicas_with_global_positions_and_a_fleet_wide_bound(redis_url):
    async def scenario():
        a, b = Replica(redis_url, max_length=2), Replica(redis_url, max_length=2)
        a.queue.ensure_started(), b.queue.ensure_started()
        first, second = await a.queue.submit(REQUEST, "http://a/"), await b.queue.submit(REQUEST, "http://b/")
        await until(lambda: len(a.holds()) + len(b.holds()) == 2)  # each replica's one feeder took one
        assert len(a.holds()) == len(b.holds()) == 1
        third, fourth = await a.queue.submit(REQUEST, "http://a/"), await a.queue.submit(REQUEST, "http://a/")
        assert [await b.queue.position(await b.queue.get(r.id)) for r in (third, fourth)] == [0, 1]
        with pytest.raises(QueueFull):  # two wait, fleet-wide: the bound holds on either replica
            await b.queue.submit(REQUEST, "http://b/")
        await until(lambda: b.queue.waiting == 2 and a.queue.replicas == 2)
        for replica in (a, b):
            for request_id in replica.holds():
                replica.worker.release.setdefault(request_id, asyncio.Event()).set()
        await until(lambda: set(a.holds()) | set(b.holds()) == {third.id, fourth.id})
        done = await b.queue.get(first.id)
        assert done.status == Status.COMPLETED and done.outcome.output["seed"] == 1 and done.base_url == "http://a/"
        assert [line["message"] for line in done.logs] == ["queued", "step 1/1", "completed"]  # docs/api.md's order
        assert sorted(a.reported + b.reported) == sorted([first.id, second.id])
        await a.queue.stop(), await b.queue.stop()

    run(scenario())


def test_a_claimed_request_is_in_progress_on_every_replica_before_any_progress(redis_url):
    async def scenario():
        a, b = Replica(redis_url), Replica(redis_url)
        a.worker.progress = lambda request_ids: asyncio.sleep(0, result={})  # a worker with nothing to say yet
        a.queue.ensure_started()
        first, second = await a.queue.submit(REQUEST, "http://a/"), await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [first.id])
        assert (await status(b.queue, first.id), await status(b.queue, second.id)) == (
            Status.IN_PROGRESS,
            Status.IN_QUEUE,
        )
        await a.queue.stop(), await b.queue.stop()

    run(scenario())


def test_a_cancel_on_one_replica_stops_the_request_running_on_the_other(redis_url):
    async def scenario():
        a, b = Replica(redis_url), Replica(redis_url)
        a.queue.ensure_started()
        record = await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.holds() == [record.id] and a.worker.started == [record.id])
        claimed = time.time()
        await until(lambda: a.queue._reported_logs.get(record.id) is not None)  # progress written
        assert await status(b.queue, record.id) == Status.IN_PROGRESS
        await past_a_lease(claimed, a)  # A renews it while it runs, so nobody re-runs it
        assert "queued again" not in str((await b.queue.get(record.id)).logs) and a.worker.started == [record.id]
        assert await b.queue.cancel(record.id) == "CANCELLATION_REQUESTED"
        await until(lambda: a.worker.cancelled == [record.id])  # A saw it at its next poll
        await until(lambda: not a.holds())
        snapshot = await a.queue.get(record.id)
        assert snapshot.error.error_type == "request_cancelled" and snapshot.error.status == 400
        assert await a.queue.cancel(record.id) == "ALREADY_COMPLETED" and await b.queue.cancel("nope") == "NOT_FOUND"
        assert b.reported == [record.id] and a.reported == []  # reported once, by the replica that ended it
        await a.queue.stop(), await b.queue.stop()

    run(scenario())


def test_a_dead_replicas_request_runs_again_elsewhere_same_id_reported_once(redis_url):
    async def scenario():
        a = Replica(redis_url)
        a.queue.ensure_started()
        record = await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [record.id])
        await a.die()
        b = Replica(redis_url)
        b.queue.ensure_started()
        await until(lambda: b.worker.started == [record.id])  # the lease ran out: B claimed it
        assert (a.worker.attempts, b.worker.attempts) == ([1], [2])  # the model tier knows it as a new attempt
        snapshot = await b.queue.get(record.id)
        assert "queued again" in " ".join(line["message"] for line in snapshot.logs)
        b.worker.finish(record)
        await until(lambda: b.reported == [record.id])
        assert (await b.queue.get(record.id)).error is None and a.reported == []
        await b.queue.stop()

    run(scenario())


def test_a_model_tier_slow_to_answer_progress_does_not_let_the_lease_run_out(redis_url):
    async def scenario():
        a, b = Replica(redis_url), Replica(redis_url)
        asked: list[float] = []

        async def slow_progress(request_ids):
            asked.append(time.time())
            await asyncio.sleep(3.0)  # longer than a lease (2 s)
            return {}

        a.worker.progress = slow_progress
        a.queue.ensure_started()
        record = await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [record.id])
        b.queue.ensure_started()
        await until(lambda: asked)
        await past_a_lease(asked[0], b)  # a renewal that waited for this answer would be a lease too late
        assert b.worker.started == [] and "queued again" not in str((await b.queue.get(record.id)).logs)
        a.worker.finish(record)
        await until(lambda: a.reported == [record.id])
        await a.queue.stop(), await b.queue.stop()

    run(scenario())


async def finished_and_reporting(replica: Replica):
    """A request that ``replica`` runs and finishes, and whose report it has begun (and holds)."""
    replica.report_gate = asyncio.Event()
    replica.queue.ensure_started()
    record = await replica.queue.submit(REQUEST, "http://a/")
    await until(lambda: replica.worker.started == [record.id])
    replica.worker.finish(record)
    await until(lambda: replica.reporting == [record.id])
    return record


def test_a_webhook_cut_short_by_its_replicas_death_is_delivered_once_by_another(redis_url):
    async def scenario():
        a, b = Replica(redis_url), Replica(redis_url)
        record = await finished_and_reporting(a)
        await a.die()  # killed mid-delivery: its report claim stops being renewed
        b.queue.ensure_started()
        await until(lambda: b.reported == [record.id])  # B's poller took the lapsed claim over
        await past_a_lease(time.time(), b)  # B's claim went with its delivery: nobody takes it again
        assert (a.reported, b.reported) == ([], [record.id])
        assert await b.queue.redis.zcard(b.queue.p + "unreported") == 0
        await b.queue.stop()

    run(scenario())


def test_a_report_longer_than_the_lease_stays_with_its_live_replica(redis_url):
    async def scenario():
        a, b = Replica(redis_url), Replica(redis_url)
        record = await finished_and_reporting(a)
        b.queue.ensure_started()
        await past_a_lease(time.time(), b)  # a webhook retried past a lease: A's heartbeat renews the claim
        a.report_gate.set()
        await until(lambda: a.reported == [record.id])
        async with asyncio.timeout(20):  # A drops its claim once delivered: nothing left to take over
            while await b.queue.redis.zcard(b.queue.p + "unreported"):
                await asyncio.sleep(0.02)
        assert (a.reported, b.reporting) == ([record.id], [])  # nor was it taken over before
        await a.queue.stop(), await b.queue.stop()

    run(scenario())


def test_a_report_cut_short_on_every_attempt_is_dropped_with_an_error(redis_url, caplog):
    async def scenario():
        a, b = Replica(redis_url, max_attempts=1), Replica(redis_url, max_attempts=1)
        record = await finished_and_reporting(a)
        await a.die()
        b.queue.ensure_started()
        await until(lambda: f"request {record.id}: its report (webhook) was cut short" in caplog.text)
        assert b.reporting == [] and await b.queue.redis.zcard(b.queue.p + "unreported") == 0
        assert (await b.queue.get(record.id)).status == Status.COMPLETED  # the result itself stays
        await b.queue.stop()

    run(scenario())


def test_a_waiting_request_ends_at_its_deadline_while_every_feeder_is_busy(redis_url):
    async def scenario():
        reported = []

        async def report(record):
            reported.append((record.id, record.error.error_type if record.error else None))

        worker = FakeWorker()
        settings = QueueSettings(url=redis_url, lease_s=2.0, redis_timeout_s=1.0)
        queue = RedisQueue(settings, 1, worker, on_finish=report, request_timeout_s=1.0)
        queue.POLL_INTERVAL_S = 0.05
        busy = await queue.submit(REQUEST, "http://a/")
        await until(lambda: worker.started == [busy.id])
        worker.release.setdefault(busy.id, asyncio.Event())  # held past the deadline (the feeder is busy)
        waiting = await queue.submit(REQUEST, "http://a/")
        await until(lambda: (waiting.id, "request_timeout") in reported, timeout=10)
        ended = await queue.get(waiting.id)
        assert ended.status == Status.COMPLETED and ended.error.status == 504
        assert worker.started == [busy.id] and await queue.redis.zcard(queue.p + "waiting") == 0  # never ran
        await queue.stop()

    run(scenario())


def test_past_the_attempts_a_request_fails_with_a_clear_error(redis_url):
    async def scenario():
        a = Replica(redis_url, max_attempts=1)
        a.queue.ensure_started()
        record = await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [record.id])
        await a.die()
        b = Replica(redis_url, max_attempts=1)
        b.queue.ensure_started()
        await until(lambda: b.reported == [record.id])
        snapshot = await b.queue.get(record.id)
        assert (
            snapshot.error.error_type == "attempts_exhausted" and "FLUX_QUEUE_MAX_ATTEMPTS=1" in snapshot.error.message
        )
        assert b.worker.started == []  # not run a second time
        await b.queue.stop()

    run(scenario())


def test_a_draining_replica_hands_back_what_it_holds_and_leaves_the_line_to_the_others(redis_url):
    async def scenario():
        a = Replica(redis_url)
        a.queue.ensure_started()
        held, waiting = await a.queue.submit(REQUEST, "http://a/"), await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [held.id])
        drain = asyncio.create_task(a.queue.drain(timeout_s=0.3))
        await until(lambda: a.queue.draining)
        with pytest.raises(ServerDraining):
            await a.queue.submit(REQUEST, "http://a/")
        await drain
        assert a.worker.cancelled == [held.id]  # its model tier was told to drop it
        assert [await status(a.queue, r.id) for r in (held, waiting)] == [Status.IN_QUEUE] * 2
        assert (await a.queue.get(held.id)).position == 0  # back at the head of the line, not the end
        await a.queue.stop()
        b = Replica(redis_url, concurrency=2)
        b.queue.ensure_started()
        await until(lambda: sorted(b.worker.started) == sorted([held.id, waiting.id]))
        b.worker.finish(held), b.worker.finish(waiting)
        await until(lambda: len(b.reported) == 2)
        assert [(await b.queue.get(r.id)).error for r in (held, waiting)] == [None, None]
        await b.queue.stop()

    run(scenario())


def test_a_replica_whose_model_is_not_ready_hands_the_request_to_one_that_is(redis_url):
    class Loading(FakeWorker):
        async def run(self, record):
            self.started.append(record.id)
            raise WorkerUnavailable("the model worker is overloaded or restarting; retry shortly")

    async def scenario():
        a = Replica(redis_url)
        a.worker = a.queue.executor = Loading()
        a.queue.ensure_started()
        record = await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [record.id])
        b = Replica(redis_url)
        b.queue.ensure_started()
        await until(lambda: b.worker.started == [record.id])  # A paused pulling; B took it
        b.worker.finish(record)
        await until(lambda: b.reported == [record.id])
        snapshot = await b.queue.get(record.id)
        assert snapshot.error is None and "model is not ready" in str(snapshot.logs) and a.reported == []
        await a.queue.stop(), await b.queue.stop()

    run(scenario())


def test_a_sync_caller_on_one_replica_gets_the_answer_of_a_run_on_the_other(redis_url):
    async def scenario():
        a, b = Replica(redis_url), Replica(redis_url)
        a.queue.ensure_started()
        busy = await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [busy.id])  # A's one feeder is taken
        b.queue.ensure_started()
        record = await a.queue.submit(REQUEST, "http://a/")
        a.queue.WAIT_READ_EVERY_S = 120  # no fallback read in time: only the done channel can wake it
        waiting = asyncio.create_task(a.queue.wait(record))  # as the sync route on A waits
        await until(lambda: b.worker.started == [record.id])
        b.worker.finish(record)
        finished = await waiting  # woken by the done channel
        assert finished.status == Status.COMPLETED and finished.outcome.output["seed"] == 1
        a.worker.finish(busy)
        await a.queue.stop(), await b.queue.stop()

    run(scenario())


def test_redis_down_refuses_new_work_keeps_running_work_and_recovers_with_what_it_held(restartable_redis):
    async def scenario():
        a = Replica(restartable_redis.url, redis_timeout_s=1.0)
        a.queue.ensure_started()
        running, queued = await a.queue.submit(REQUEST, "http://a/"), await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [running.id])
        restartable_redis.stop()
        with pytest.raises(QueueUnavailable) as refused:
            await a.queue.submit(REQUEST, "http://a/")
        assert refused.value.status == 503 and refused.value.error_type == "queue_unavailable"
        with pytest.raises(QueueUnavailable):
            await a.queue.get(running.id)
        finishes_failed = redis_errors("finish")
        a.worker.finish(running)  # it finishes while Redis is away: its result waits to be written
        await until(lambda: redis_errors("finish") > finishes_failed)
        assert a.holds() == [running.id]
        restartable_redis.start()  # same port, same AOF
        await until(lambda: a.reported == [running.id])
        assert (await a.queue.get(running.id)).status == Status.COMPLETED
        await until(lambda: a.worker.started == [running.id, queued.id])  # the queued one survived
        a.worker.finish(queued)
        await until(lambda: len(a.reported) == 2)
        assert (await a.queue.submit(REQUEST, "http://a/")).status == Status.IN_QUEUE  # recovered by itself
        await a.queue.stop()

    run(scenario(), timeout=120)


def test_a_password_from_a_mounted_secret_file_is_used(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    with redis_server(tmp_path) as server:
        import redis

        redis.Redis.from_url(server.url).config_set("requirepass", "s3cret")

        async def scenario():
            queue = RedisQueue(QueueSettings(url=server.url, redis_password_file=secret), 1, FakeWorker())
            record = await queue.submit(REQUEST, "http://a/")
            assert (await queue.get(record.id)).id == record.id  # written and read back with the password
            await queue.stop()
            wrong = RedisQueue(QueueSettings(url=server.url, redis_password="nope"), 1, FakeWorker())
            with pytest.raises(QueueUnavailable):  # redis-py's AuthenticationError is a connection error
                await wrong.submit(REQUEST, "http://a/")
            await wrong.stop()

        run(scenario())


def certificates(directory) -> tuple:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with openssl."""
    import subprocess

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "san.ext", "-out", "server.pem",
    )  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def test_rediss_with_tls_and_a_password_from_a_secret_file(tmp_path):
    """``rediss://`` against a redis-server that speaks only TLS and wants a password: with the CA
    file the queue works; without it (the system's CAs do not know ours) it is unavailable (503),
    never an unencrypted fallback."""
    import subprocess

    from tests.conftest import free_port

    ca, cert, key = certificates(tmp_path)
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
        + ["--tls-auth-clients", "no", "--requirepass", "s3cret", "--dir", str(tmp_path)],
        stdout=open(tmp_path / "redis.log", "ab"),  # noqa: SIM115 (the child keeps it)
        stderr=subprocess.STDOUT,
    )
    url = f"rediss://127.0.0.1:{port}/0"
    try:

        async def scenario():
            worker = FakeWorker()
            queue = RedisQueue(QueueSettings(url=url, redis_password_file=secret, redis_ca_file=ca), 1, worker)
            async with asyncio.timeout(30):
                while True:  # the server is up once it answers over TLS
                    try:
                        record = await queue.submit(REQUEST, "http://a/")
                        break
                    except QueueUnavailable:
                        await asyncio.sleep(0.2)
            await until(lambda: worker.started == [record.id])  # claimed over TLS, run
            worker.finish(record)
            await until(lambda: not queue._held)
            done = await queue.get(record.id)
            assert done.status == Status.COMPLETED and done.outcome.output["seed"] == 1
            await queue.stop()
            unverified = RedisQueue(QueueSettings(url=url, redis_password_file=secret), 1, FakeWorker())
            with pytest.raises(QueueUnavailable):  # certificate verify failed
                await unverified.submit(REQUEST, "http://a/")
            await unverified.stop()
            plain = RedisQueue(
                QueueSettings(url=f"redis://127.0.0.1:{port}/0", redis_password_file=secret), 1, FakeWorker()
            )
            with pytest.raises(QueueUnavailable):  # a TLS port does not speak plain Redis
                await plain.submit(REQUEST, "http://a/")
            await plain.stop()

        run(scenario())
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_queue_overhead_benchmark_smoke(redis_url, tmp_path):
    from benchmarks.queue import main

    rows = main(["--redis-url", redis_url, "--requests", "10", "--concurrency", "1,2", "--out", str(tmp_path)])["rows"]
    assert {(r["queue"], r["concurrency"]) for r in rows} == {("memory", 1), ("memory", 2), ("redis", 1), ("redis", 2)}
    assert all(r["requests"] == 10 and r["p50_ms"] > 0 for r in rows)
    assert "added at the median" in (tmp_path / "queue-overhead.md").read_text()


def loop_errors(loop: str) -> float:
    import prometheus_client

    return prometheus_client.REGISTRY.get_sample_value("flux_queue_loop_errors_total", {"loop": loop}) or 0.0


def redis_errors(operation: str) -> float:
    import prometheus_client

    return prometheus_client.REGISTRY.get_sample_value("flux_queue_redis_errors_total", {"operation": operation}) or 0.0


class StorageDown(FakeWorker):
    """A model tier whose outputs cannot be stored (the bucket refuses): a 503 that is not the replica's."""

    async def run(self, record):
        self.started.append(record.id)
        raise StorageUnavailable("could not store the output image: the endpoint refused the connection")


def test_a_storage_outage_ends_the_request_once_and_is_not_handed_to_another_replica(redis_url):
    async def scenario():
        a, b = Replica(redis_url), Replica(redis_url)
        a.worker = a.queue.executor = StorageDown()
        b.worker = b.queue.executor = StorageDown()
        a.queue.ensure_started(), b.queue.ensure_started()
        records = [await a.queue.submit(REQUEST, "http://a/") for _ in range(3)]
        await until(lambda: len(a.reported) + len(b.reported) == 3)
        for record in records:
            ended = await b.queue.get(record.id)
            assert ended.error.status == 503 and ended.error.error_type == "storage_unavailable"
            assert [line["message"].split(":")[0] for line in ended.logs] == ["queued", "failed"]  # never queued again
        assert sorted(a.worker.started + b.worker.started) == sorted(r.id for r in records)  # each ran once
        await a.queue.stop(), await b.queue.stop()

    run(scenario())


class FailingScripts:
    """The queue's scripts, each failing ``fail[name]`` times with a Redis error that is not a lost
    connection (as a script error, OOM or READONLY answer)."""

    def __init__(self, scripts, **fail: int) -> None:
        self.inner, self.fixed, self.key, self.fail = scripts, scripts.fixed, scripts.key, fail

    async def __call__(self, name, ids=(), **named):
        if self.fail.get(name):
            self.fail[name] -= 1
            raise ResponseError(f"ERR injected failure of {name}")
        return await self.inner(name, ids, **named)


def test_an_error_in_each_background_loop_is_counted_and_the_loop_goes_on(redis_url):
    """One non-connection failure injected into each loop: the feeders' claim, the heartbeat, the
    progress write, the pub/sub listener (Redis errors), the worker's progress and the deadline
    sweep (plain exceptions: a bug in one pass). Every loop survives, the metric counts each, and
    the work goes on."""
    from redis.exceptions import ResponseError as RedisResponseError

    async def scenario():
        a = Replica(redis_url)
        a.queue.scripts = FailingScripts(a.queue.scripts, claim=1, heartbeat=2, progress=1)
        progress, sweep, subscribe = a.worker.progress, a.queue._deadlines_once, a.queue.redis.pubsub
        failed: set[str] = set()

        def once(name, call):
            def wrapped(*args, **kwargs):
                if name not in failed:
                    failed.add(name)
                    raise (RedisResponseError if name == "listener" else RuntimeError)(f"injected {name} error")
                return call(*args, **kwargs)

            return wrapped

        a.worker.progress = once("worker progress", progress)
        a.queue._deadlines_once = once("deadlines", sweep)
        a.queue.redis.pubsub = once("listener", subscribe)
        before = {loop: loop_errors(loop) for loop in ("feeder", "heartbeat", "progress", "deadlines", "listener")}
        a.queue.ensure_started()
        record = await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [record.id])  # claimed after the claim's failure
        await until(lambda: a.queue._reported_logs.get(record.id) is not None)  # progress written after two failures
        assert "step 1/2" in str((await a.queue.get(record.id)).logs)
        await until(
            lambda: failed == {"worker progress", "deadlines", "listener"} and a.queue.scripts.fail["heartbeat"] == 0
        )
        after = {loop: loop_errors(loop) - before[loop] for loop in before}
        assert after == {"feeder": 1, "heartbeat": 2, "progress": 2, "deadlines": 1, "listener": 1}, after
        assert all(not task.done() for task in a.queue._tasks)  # every loop still runs
        waiter = asyncio.create_task(a.queue.wait(record))
        a.worker.finish(record)
        assert (await waiter).status == Status.COMPLETED
        second = await a.queue.submit(REQUEST, "http://a/")  # the feeder goes on pulling
        await until(lambda: a.worker.started == [record.id, second.id])
        a.worker.finish(second)
        await until(lambda: len(a.reported) == 2)
        await a.queue.stop()

    run(scenario())


def test_a_full_redis_answers_503_while_accepted_work_goes_on_and_recovers_when_memory_is_freed(redis_url):
    """Redis at its maxmemory (noeviction, as the shipped manifest): a submit is refused with 503
    ``queue_unavailable`` (never a 500); what was accepted is claimed, renewed, finished and reported
    (those scripts may run out of memory: they free it); once memory is freed, new requests are taken
    with no restart, and a dead replica's lease runs out and its work runs elsewhere again."""
    import redis as sync_redis

    async def scenario():
        a, b = Replica(redis_url), Replica(redis_url)
        a.queue.ensure_started()
        running, waiting = await a.queue.submit(REQUEST, "http://a/"), await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [running.id])
        admin = sync_redis.Redis.from_url(redis_url)
        # What the line, the results and the inputs filled, in small writes (a large one's query
        # buffer would count until the server frees it, then leave Redis under its limit again).
        admin.mset({f"ballast:{i}": b"x" * 32 * 1024 for i in range(128)})
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) - 1024**2)  # over it from here
        try:
            with pytest.raises(QueueUnavailable) as refused:
                await a.queue.submit(REQUEST, "http://a/")
            assert refused.value.status == 503 and refused.value.error_type == "queue_unavailable"
            b.queue.ensure_started()
            await until(lambda: b.worker.started == [waiting.id])  # claimed though Redis is full
            await past_a_lease(time.time(), a, b)  # A's heartbeat renews its claim though Redis is full
            assert running.id not in b.worker.started and "queued again" not in str(
                (await b.queue.get(running.id)).logs
            )
            a.worker.finish(running), b.worker.finish(waiting)  # their finishes are written (freeing the inputs)
            await until(lambda: (a.reported, b.reported) == ([running.id], [waiting.id]))
            with pytest.raises(QueueUnavailable):  # still full all along
                await a.queue.submit(REQUEST, "http://a/")
        finally:
            admin.delete(*(f"ballast:{i}" for i in range(128)))
            admin.config_set("maxmemory", 0)
        record = await a.queue.submit(REQUEST, "http://a/")  # recovered by itself, no restart
        await until(lambda: record.id in a.worker.started + b.worker.started)
        holder, survivor = (a, b) if record.id in a.worker.started else (b, a)
        await holder.die()  # the leases work again: its claim runs out and the other replica runs it
        await until(lambda: record.id in survivor.worker.started)
        survivor.worker.finish(record)
        await until(lambda: record.id in survivor.reported)
        assert (await survivor.queue.get(record.id)).error is None
        await survivor.queue.stop()

    run(scenario())


def test_the_redis_side_limits_hold_on_redis(redis_url):
    """Waiting bytes (inputs held by unfinished requests), the retention of a finished record, the
    most finished records kept, and key-prefix isolation, checked on Redis itself."""

    async def scenario():
        big = REQUEST.model_copy(update={"image_url": "data:image/png;base64," + "A" * 600_000})
        a = Replica(redis_url, max_waiting_bytes=1024**2, max_retained=10, result_retention_s=60)
        a.queue.ensure_started()
        first = await a.queue.submit(big, "http://a/")
        await until(lambda: a.worker.started == [first.id])
        with pytest.raises(QueueFull):  # the running one's inputs still count: a re-run needs them
            await a.queue.submit(big, "http://a/")
        a.worker.finish(first)
        await until(lambda: a.reported == [first.id])
        assert await a.queue.redis.hget(a.queue.scripts.key(first.id), "request") is None  # inputs dropped
        assert 0 < await a.queue.redis.ttl(a.queue.scripts.key(first.id)) <= 60  # kept for the retention
        records = [first]
        for _ in range(11):
            record = await a.queue.submit(REQUEST, "http://a/")
            await until(lambda record=record: record.id in a.worker.started)
            a.worker.finish(record)
            await until(lambda record=record: record.id in a.reported)
            records.append(record)
        assert [await a.queue.get(r.id) for r in records[:2]] == [None, None]  # the oldest two forgotten
        assert (await a.queue.get(records[2].id)).status == Status.COMPLETED
        other = Replica(redis_url, key_prefix="other:")
        other.queue.ensure_started()
        assert await other.queue.get(records[-1].id) is None  # another fleet's prefix sees none of it
        theirs = await other.queue.submit(REQUEST, "http://o/")
        await until(lambda: other.worker.started == [theirs.id])
        assert theirs.id not in a.worker.started and await a.queue.get(theirs.id) is None
        other.worker.finish(theirs)
        await until(lambda: other.reported == [theirs.id])
        await a.queue.stop(), await other.queue.stop()

    run(scenario())


def test_after_a_sentinel_failover_the_queue_follows_the_new_primary_and_accepted_requests_complete(tmp_path):
    """A real ``redis-sentinel`` watching a primary and its replica; the queue names the master
    through ``redis+sentinel://``. The primary is killed while a request runs and another waits:
    Sentinel promotes the replica, the queue's connections find it, and both requests complete
    (the running one's finish waited for it); new requests are taken with no restart."""
    import subprocess

    import redis as sync_redis

    from tests.conftest import RedisServer, free_port

    (tmp_path / "primary").mkdir(), (tmp_path / "replica").mkdir()
    # Its replica synced at once: by default a primary waits 5 s for more replicas to share the transfer.
    primary = RedisServer(tmp_path / "primary", extra=["--repl-diskless-sync-delay", "0"])
    primary.start()
    replica = RedisServer(tmp_path / "replica", extra=["--replicaof", "127.0.0.1", str(primary.port)])
    replica.start()
    port = free_port()
    (tmp_path / "sentinel.conf").write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor flux 127.0.0.1 {primary.port} 1\n"
        "sentinel down-after-milliseconds flux 1000\nsentinel failover-timeout flux 10000\n"
    )
    sentinel = subprocess.Popen(
        ["redis-sentinel", str(tmp_path / "sentinel.conf")],
        stdout=open(tmp_path / "sentinel.log", "ab"),  # noqa: SIM115 (the child keeps it)
        stderr=subprocess.STDOUT,
    )
    try:

        async def scenario():
            watcher = sync_redis.Redis(port=port, decode_responses=True)
            async with asyncio.timeout(30):  # the sentinel is up, and has found the replica
                while True:
                    with contextlib.suppress(sync_redis.RedisError):
                        if watcher.sentinel_slaves("flux") and "up" in str(
                            sync_redis.Redis(port=replica.port).info("replication")
                        ):
                            break
                    await asyncio.sleep(0.1)
            a = Replica(f"redis+sentinel://127.0.0.1:{port}/flux/0")
            a.queue.ensure_started()
            running, waiting = await a.queue.submit(REQUEST, "http://a/"), await a.queue.submit(REQUEST, "http://a/")
            await until(lambda: a.worker.started == [running.id])
            assert sync_redis.Redis(port=primary.port).wait(1, 5000) == 1  # replicated, as a live replica is
            primary.stop(signal.SIGKILL)
            async with asyncio.timeout(60):  # Sentinel's failover: down after 1 s, then the promotion
                while sync_redis.Redis(port=replica.port).info("replication")["role"] != "master":
                    await asyncio.sleep(0.1)
            a.worker.finish(running)  # its finish reaches the new primary
            await until(lambda: a.reported == [running.id], timeout=60)
            await until(lambda: a.worker.started == [running.id, waiting.id], timeout=60)  # the line survived
            a.worker.finish(waiting)
            await until(lambda: len(a.reported) == 2)
            record = await a.queue.submit(REQUEST, "http://a/")  # on the new primary, no restart
            await until(lambda: a.worker.started[-1] == record.id)
            a.worker.finish(record)
            await until(lambda: len(a.reported) == 3)
            for request_id in (running.id, waiting.id, record.id):
                assert (await a.queue.get(request_id)).error is None
            assert sync_redis.Redis(port=replica.port).exists(a.queue.scripts.key(record.id))
            await a.queue.stop()

        run(scenario(), timeout=180)
    finally:
        sentinel.terminate()
        sentinel.wait(timeout=30)
        replica.stop(), primary.stop()


def test_a_demoted_primary_answers_503_and_the_queue_goes_on_when_it_is_primary_again(redis_url):
    """With a plain ``redis://`` URL there is no failover to follow: a primary turned into a replica
    (``REPLICAOF``) answers READONLY to every write. A submit gets 503 (never 500), a script error
    too, running work keeps its result until it can be written, and all goes on once it is a
    primary again."""
    import redis as sync_redis

    from tests.conftest import free_port

    async def scenario():
        a = Replica(redis_url)
        a.queue.ensure_started()
        running = await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started == [running.id])
        admin = sync_redis.Redis.from_url(redis_url)
        beats_failed = loop_errors("heartbeat")
        admin.replicaof("127.0.0.1", free_port())  # a primary nobody runs: read-only from here
        try:
            with pytest.raises(QueueUnavailable) as refused:
                await a.queue.submit(REQUEST, "http://a/")
            assert refused.value.status == 503
            a.worker.finish(running)  # its finish waits for a primary
            await until(lambda: loop_errors("heartbeat") > beats_failed)  # READONLY: counted, the loop goes on
            assert a.reported == [] and running.id in a.queue._held
        finally:
            admin.replicaof("NO", "ONE")
        await until(lambda: a.reported == [running.id])
        assert (await a.queue.get(running.id)).status == Status.COMPLETED
        a.queue.scripts = FailingScripts(a.queue.scripts, submit=1)
        with pytest.raises(QueueUnavailable):  # a script error is a 503 too
            await a.queue.submit(REQUEST, "http://a/")
        record = await a.queue.submit(REQUEST, "http://a/")
        await until(lambda: a.worker.started[-1] == record.id)
        a.worker.finish(record)
        await until(lambda: len(a.reported) == 2)
        await a.queue.stop()

    run(scenario())
