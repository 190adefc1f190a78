"""The S3 output store (FLUX_STORE_URL) against a real S3 API: moto's standalone server, over HTTP
on a free loopback port, started and stopped here.

Unit tests of ``S3Store`` (round trips through presigned GETs, the URL's lifetime, a public base
URL, sweeping, and each way of failing: no bucket, refused credentials, no endpoint), then one real
``bentoml serve`` whose outputs go to the bucket.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from runners.config import PRESIGNED_URL_MAX_S, Settings, StoreSettings
from runners.errors import StorageUnavailable
from runners.front.s3_store import S3Store, split_url
from runners.front.store import NAME_PATTERN, OutputStore, make_store
from runners.protocol.images import SUFFIX_CONTENT_TYPES
from tests.conftest import REPO, bentoml_server, moto_s3_server
from tests.test_webhooks import closed_port

ACCESS_KEY, SECRET_KEY = "AKIAFLUXTESTS0000001", "flux-tests-secret"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_REGION": "us-east-1",
    # Nothing from this machine's own AWS set-up, and no instance-metadata probe.
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}
APP = "fal-ai/flux-lora/inpainting"
EXAMPLE = json.loads((REPO / "examples" / "request.json").read_text())
STORED = {**EXAMPLE, "num_inference_steps": 3, "sync_mode": False}  # the example asks for sync_mode


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    with moto_s3_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


def admin(endpoint: str, **keys):
    keys = keys or {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)


@pytest.fixture
def bucket(endpoint) -> str:
    name = f"flux-{uuid.uuid4().hex[:12]}"
    admin(endpoint).create_bucket(Bucket=name)
    return name


def s3_store(endpoint: str, bucket: str, prefix: str = "outputs/run-1", **settings) -> S3Store:
    return S3Store(StoreSettings(url=f"s3://{bucket}/{prefix}", endpoint_url=endpoint, **settings))


def test_put_then_the_presigned_get_returns_the_bytes_and_content_type(endpoint, bucket):
    store = s3_store(endpoint, bucket)
    assert isinstance(store, OutputStore)
    for suffix, content_type in SUFFIX_CONTENT_TYPES.items():
        data = os.urandom(2000)
        name = store.put(data, suffix)
        assert NAME_PATTERN.fullmatch(name) and name.endswith("." + suffix)
        url = store.url(name, "http://ignored/")
        assert url.startswith(f"{endpoint}/{bucket}/outputs/run-1/{name}?")
        fetched = httpx.get(url, timeout=30)  # no credentials: the signature in the URL is the access
        assert fetched.status_code == 200
        assert fetched.content == data
        assert fetched.headers["content-type"] == content_type
    listed = admin(endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    assert len(listed) == len(SUFFIX_CONTENT_TYPES) and all(item["Key"].startswith("outputs/run-1/") for item in listed)
    assert store.open(name) is None  # the bucket serves the files, not GET /files/...


def test_presigned_url_lives_as_long_as_the_retention(endpoint, bucket):
    for ttl_s in (60, 3600, PRESIGNED_URL_MAX_S):
        store = s3_store(endpoint, bucket, ttl_s=ttl_s)
        before = datetime.now(UTC).replace(microsecond=0)
        query = parse_qs(urlsplit(store.url(store.put(b"x", "png"), "http://ignored/")).query)
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        assert query["X-Amz-Expires"] == [str(ttl_s)]
        # Signed now (generous bounds: a loaded machine), with our key: valid from now for ttl_s.
        signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert before <= signed <= before + timedelta(minutes=5)
        assert query["X-Amz-Credential"][0].startswith(f"{ACCESS_KEY}/")


def test_presigned_urls_can_name_the_endpoint_clients_reach(endpoint, bucket):
    """An in-cluster store behind an ingress: the server puts through one address, clients fetch from
    another (here the same moto under the name localhost)."""
    outside = endpoint.replace("127.0.0.1", "localhost")
    store = s3_store(endpoint, bucket, presign_endpoint_url=outside)
    data = os.urandom(300)
    url = store.url(store.put(data, "png"), "http://ignored/")
    assert url.startswith(f"{outside}/{bucket}/outputs/run-1/")
    assert httpx.get(url, timeout=30).content == data


def test_retention_past_what_a_presigned_url_can_live_is_refused(monkeypatch):
    monkeypatch.setenv("FLUX_STORE_URL", "s3://bucket-name/outputs")
    monkeypatch.setenv("FLUX_STORE_TTL_S", str(PRESIGNED_URL_MAX_S + 1))
    with pytest.raises(ValidationError, match="FLUX_STORE_TTL_S"):
        Settings()
    monkeypatch.setenv("FLUX_STORE_PUBLIC_BASE_URL", "https://cdn.example.com")  # no signature: no limit
    assert Settings().store.ttl_s == PRESIGNED_URL_MAX_S + 1
    monkeypatch.delenv("FLUX_STORE_URL")  # the directory store has no such limit either
    monkeypatch.delenv("FLUX_STORE_PUBLIC_BASE_URL")
    assert Settings().store.ttl_s == PRESIGNED_URL_MAX_S + 1


@pytest.mark.parametrize(
    "url",
    ["s3://", "s3://ab", "s3://Upper-Case/x", "http://bucket-name/x", "s3://bucket-name/../x y", "bucket-name"],
)
def test_bad_store_urls_are_refused(monkeypatch, url):
    monkeypatch.setenv("FLUX_STORE_URL", url)
    with pytest.raises(ValidationError, match="url"):
        Settings()


def test_split_url():
    assert split_url("s3://bucket-name") == ("bucket-name", "")
    assert split_url("s3://bucket-name/") == ("bucket-name", "")
    assert split_url("s3://bucket-name/a/b/") == ("bucket-name", "a/b/")
    assert split_url("s3://bucket-name/a") == ("bucket-name", "a/")


def test_public_base_url(endpoint, bucket):
    """With a public base URL the image URL is that base plus the key, unsigned; here the bucket is
    made public-read by a policy, as a CDN or public bucket would be."""
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
        ],
    }
    admin(endpoint).put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    store = s3_store(endpoint, bucket, prefix="public", public_base_url=f"{endpoint}/{bucket}/")
    data = os.urandom(500)
    name = store.put(data, "png")
    url = store.url(name, "http://ignored/")
    assert url == f"{endpoint}/{bucket}/public/{name}"
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.content == data
    assert fetched.headers["content-type"] == "image/png"


def assert_clear_failure(exc: StorageUnavailable, reason: str, bucket: str) -> None:
    assert exc.status == 503 and exc.error_type == "storage_unavailable"
    assert exc.to_body() == {"detail": exc.message, "error_type": "storage_unavailable"}
    assert reason in exc.message and "could not store the output image" in exc.message
    assert bucket not in exc.message and "127.0.0.1" not in exc.message  # no internals for the caller


def test_a_missing_bucket_fails_the_put_clearly(endpoint):
    store = s3_store(endpoint, "no-such-bucket-here")
    with pytest.raises(StorageUnavailable) as raised:
        store.put(b"x", "png")
    assert_clear_failure(raised.value, "NoSuchBucket", "no-such-bucket-here")
    with pytest.raises(StorageUnavailable):
        store.sweep()


def test_an_unreachable_endpoint_fails_the_put_clearly():
    with closed_port() as port:
        store = s3_store(f"http://127.0.0.1:{port}", "bucket-name", timeout_s=1)
        with pytest.raises(StorageUnavailable) as raised:
            store.put(b"x", "png")
    assert_clear_failure(raised.value, "not reachable", "bucket-name")


def test_missing_credentials_fail_the_put_clearly(endpoint, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageUnavailable) as raised:
        s3_store(endpoint, bucket).put(b"x", "png")
    assert_clear_failure(raised.value, "no credentials", bucket)


@pytest.fixture(scope="module")
def checking_endpoint(tmp_path_factory):
    """A moto server that checks signatures against its IAM users, with one user allowed s3:*: its
    first three calls (create the user, its key, its policy) go unchecked."""
    with moto_s3_server(tmp_path_factory.mktemp("moto-auth"), INITIAL_NO_AUTH_ACTION_COUNT="3") as url:
        iam = boto3.client(
            "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
        )
        iam.create_user(UserName="flux")
        key = iam.create_access_key(UserName="flux")["AccessKey"]
        allow = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="flux", PolicyName="s3", PolicyDocument=json.dumps(allow))
        keys = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        admin(url, **keys).create_bucket(Bucket="checked-bucket")
        yield url, keys


def test_credentials_from_a_mounted_file_are_used(checking_endpoint, tmp_path, monkeypatch):
    """A Kubernetes Secret mounted as an AWS shared credentials file (AWS_SHARED_CREDENTIALS_FILE)."""
    url, keys = checking_endpoint
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {keys['aws_access_key_id']}\n"
        f"aws_secret_access_key = {keys['aws_secret_access_key']}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    store = s3_store(url, "checked-bucket")
    name = store.put(b"signed with the file's key", "png")  # moto checked the signature
    body = admin(url, **keys).get_object(Bucket="checked-bucket", Key=f"outputs/run-1/{name}")["Body"].read()
    assert body == b"signed with the file's key"
    assert f"X-Amz-Credential={keys['aws_access_key_id']}" in store.url(name, "http://ignored/")


@pytest.mark.parametrize("wrong", ["access key", "secret"])
def test_refused_credentials_fail_the_put_clearly(checking_endpoint, monkeypatch, wrong):
    url, keys = checking_endpoint
    if wrong == "access key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
        code = "InvalidAccessKeyId"
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["aws_access_key_id"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        code = "SignatureDoesNotMatch"
    with pytest.raises(StorageUnavailable) as raised:
        s3_store(url, "checked-bucket").put(b"x", "png")
    assert_clear_failure(raised.value, code, "checked-bucket")


def test_sweep_deletes_our_expired_objects_only(endpoint, bucket):
    offset = [0.0]
    settings = StoreSettings(url=f"s3://{bucket}/outputs", endpoint_url=endpoint, ttl_s=600)
    store = S3Store(settings, clock=lambda: time.time() + offset[0])
    ours = [store.put(b"o" * 10, "jpg") for _ in range(3)]
    s3 = admin(endpoint)
    foreign = ["outputs/notes.txt", "outputs/nested/" + ours[0], "elsewhere/" + ours[1]]
    for key in foreign:
        s3.put_object(Bucket=bucket, Key=key, Body=b"not ours")
    assert store.sweep() == 0  # nothing is older than the retention yet
    offset[0] = 600 + 120  # a loaded machine's clock skew between us and moto is well under 2 minutes
    assert store.sweep() == 3
    remaining = sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert remaining == sorted(foreign)
    assert store.sweep() == 0


def test_make_store_picks_the_bucket_when_a_url_is_set(endpoint, bucket, tmp_path):
    store = make_store(StoreSettings(url=f"s3://{bucket}/x", endpoint_url=endpoint), tmp_path)
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == (bucket, "x/")
    assert not (tmp_path / "outputs").exists()  # no directory store made beside it


# --- a real server whose outputs go to the bucket ------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, endpoint):
    bucket = "served-outputs"
    admin(endpoint).create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("s3-serve")
    env = {
        **AWS_ENV,
        "FLUX_STORE_URL": f"s3://{bucket}/flux/outputs",
        "FLUX_STORE_ENDPOINT_URL": endpoint,
        "FLUX_STORE_TTL_S": "7200",
    }
    with bentoml_server(tmp, **env) as (base, log_path):
        yield base, bucket, log_path


def fetch_image(url: str) -> tuple[bytes, str]:
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200, fetched.text
    return fetched.content, fetched.headers["content-type"]


def test_served_outputs_are_presigned_s3_urls(served, endpoint):
    base, bucket, _ = served
    body = httpx.post(f"{base}/{APP}", json={**STORED, "num_images": 2}, timeout=120).json()
    for image in body["images"]:
        url = urlsplit(image["url"])
        assert f"{url.scheme}://{url.netloc}" == endpoint
        assert url.path.startswith(f"/{bucket}/flux/outputs/") and url.path.endswith(".jpg")
        assert parse_qs(url.query)["X-Amz-Expires"] == ["7200"]
        data, content_type = fetch_image(image["url"])
        assert content_type == image["content_type"] == "image/jpeg"
        assert len(data) == image["file_size"]
        assert Image.open(io.BytesIO(data)).size == (image["width"], image["height"])
        # the bytes are the image the server made: the bucket holds the same object
        assert admin(endpoint).get_object(Bucket=bucket, Key=url.path.split("/", 2)[2])["Body"].read() == data

    # The queue routes hand out the same kind of URL, and sync_mode still answers data URIs.
    submitted = httpx.post(f"{base}/queue/{APP}", json={**STORED, "output_format": "png"}, timeout=30).json()
    deadline = time.monotonic() + 120
    while httpx.get(submitted["status_url"], timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the queued request did not finish"
        time.sleep(0.5)
    (image,) = httpx.get(submitted["response_url"], timeout=10).json()["images"]
    assert image["url"].startswith(f"{endpoint}/{bucket}/flux/outputs/")
    assert fetch_image(image["url"])[1] == "image/png"
    inline = httpx.post(f"{base}/{APP}", json={**STORED, "sync_mode": True}, timeout=120).json()
    assert inline["images"][0]["url"].startswith("data:image/jpeg;base64,")


def test_a_store_outage_fails_that_request_alone(served, endpoint):
    """The bucket gone: a request that needs it fails with a fal-shaped 503 naming the cause; one with
    sync_mode still succeeds on the same server; and once the bucket is back, so are stored outputs."""
    base, bucket, log_path = served
    s3 = admin(endpoint)
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=bucket)
    try:
        failed = httpx.post(f"{base}/{APP}", json=STORED, timeout=120)
        assert failed.status_code == 503
        assert failed.headers["x-fal-error-type"] == "storage_unavailable"
        assert failed.json() == {
            "detail": "could not store the output image: object storage answered NoSuchBucket",
            "error_type": "storage_unavailable",
        }
        queued = httpx.post(f"{base}/queue/{APP}", json=STORED, timeout=30).json()
        inline = httpx.post(f"{base}/{APP}", json={**STORED, "sync_mode": True}, timeout=120)
        assert inline.status_code == 200 and inline.json()["images"][0]["url"].startswith("data:")
        deadline = time.monotonic() + 120
        while (status := httpx.get(queued["status_url"], timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, "the queued request did not finish"
            time.sleep(0.5)
        assert status.json()["error_type"] == "storage_unavailable"
        assert httpx.get(queued["response_url"], timeout=10).status_code == 503
        assert "NoSuchBucket" in log_path.read_text()  # the operator's log line has the details
    finally:
        s3.create_bucket(Bucket=bucket)
    again = httpx.post(f"{base}/{APP}", json=STORED, timeout=120).json()
    fetch_image(again["images"][0]["url"])
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
