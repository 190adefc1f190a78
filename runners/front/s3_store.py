"""Output images in an S3-compatible bucket (FLUX_STORE_URL=s3://bucket/prefix), through boto3.

Every replica of a fleet writes to the same bucket, and a client fetches the image from the bucket
itself, so an output outlives the replica that made it and any replica's URL works everywhere:

* Objects are ``<prefix>/<name>``, with the directory store's unguessable names and the image's
  content type, so the bucket answers the GET with the right ``Content-Type``.
* URLs are presigned GETs valid for the retention (FLUX_STORE_TTL_S), signed once at ``put``:
  a result fetched later carries the same URL, valid until its object expires. They name
  FLUX_STORE_PRESIGN_ENDPOINT_URL when clients reach the store at another address. Or, with
  FLUX_STORE_PUBLIC_BASE_URL (a CDN, a public-read bucket), that base plus the key.
* Expiry belongs to the bucket: a lifecycle rule on the prefix (docs/storage.md). ``sweep`` also
  deletes our expired objects (names we write, nothing else under the prefix), so a bucket without
  a rule stays bounded too; FLUX_STORE_SWEEP=0 leaves it to the rule.
* Any failure to store fails that request alone, with a 503 ``storage_unavailable`` that names the
  cause (S3's error code), never the bucket or the endpoint; the log line has the details.

boto3 reads credentials from its usual chain (AWS_* variables, AWS_SHARED_CREDENTIALS_FILE for a
mounted Secret, a workload identity). A boto3 client is thread-safe: the front's worker threads
share one.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from runners.config import StoreSettings
from runners.errors import StorageUnavailable
from runners.front.store import NAME_PATTERN, new_name
from runners.protocol.images import SUFFIX_CONTENT_TYPES

log = logging.getLogger(__name__)
DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix/``); the prefix is empty or ends in /."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def s3_client(settings: StoreSettings, endpoint_url: str | None):
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=settings.timeout_s,
        read_timeout=settings.timeout_s,
        retries={"mode": "standard"},
        # One connection per thread that may put at once (anyio's default thread limit), so busy
        # replicas reuse connections instead of opening and dropping extra ones.
        max_pool_connections=40,
        # SigV4 everywhere: the only signature R2 and newer S3 regions take, and presigned URLs
        # in it carry their lifetime (X-Amz-Expires).
        signature_version="s3v4",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def failure_reason(exc: Exception) -> str:
    """What went wrong, in words safe to show a caller: S3's error code, or the kind of failure."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        return f"object storage answered {exc.response.get('Error', {}).get('Code', 'an error')}"
    if isinstance(exc, NoCredentialsError):
        return "no credentials for object storage are configured"
    if isinstance(exc, EndpointConnectionError):
        return "object storage is not reachable"
    return f"object storage call failed ({type(exc).__name__})"


class S3Store:
    def __init__(self, settings: StoreSettings, clock=time.time) -> None:
        self.bucket, self.prefix = split_url(settings.url)
        self.ttl_s = settings.ttl_s
        self.public_base_url = settings.public_base_url.rstrip("/") + "/" if settings.public_base_url else None
        self._clock = clock
        self.client = s3_client(settings, settings.endpoint_url)
        # Presigned URLs name the host they are signed for: the one clients reach, if it differs.
        self.signer = (
            s3_client(settings, settings.presign_endpoint_url) if settings.presign_endpoint_url else self.client
        )
        log.info(
            "outputs go to s3://%s/%s at %s; URLs: %s",
            self.bucket,
            self.prefix,
            settings.endpoint_url or "AWS S3",
            self.public_base_url or f"presigned, valid {self.ttl_s} s",
        )

    def _fail(self, action: str, key: str | None, exc: Exception) -> StorageUnavailable:
        log.warning("could not %s s3://%s/%s: %s", action, self.bucket, key or self.prefix, exc)
        return StorageUnavailable(f"could not store the output image: {failure_reason(exc)}")

    def put(self, data: bytes, suffix: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        name = new_name(suffix)
        key = self.prefix + name
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=SUFFIX_CONTENT_TYPES[suffix])
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("put", key, exc) from None
        return name

    def url(self, name: str, base_url: str) -> str:
        from botocore.exceptions import BotoCoreError

        key = self.prefix + name
        if self.public_base_url:
            return self.public_base_url + quote(key)
        try:  # signing is local (no call to S3), but needs credentials
            return self.signer.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.ttl_s
            )
        except BotoCoreError as exc:
            raise self._fail("sign a URL for", key, exc) from None

    def open(self, name: str) -> Path | None:
        return None  # the bucket serves the files; GET /files/... answers 404

    def sweep(self) -> int:
        """Delete our objects under the prefix older than the retention; raises StorageUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError

        cutoff = datetime.fromtimestamp(self._clock() - self.ttl_s, UTC)
        deleted = 0
        try:
            expired = [
                {"Key": item["Key"]}
                for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
                )
                for item in page.get("Contents", [])
                if NAME_PATTERN.fullmatch(item["Key"][len(self.prefix) :]) and item["LastModified"] < cutoff
            ]
            for start in range(0, len(expired), DELETE_BATCH):
                batch = expired[start : start + DELETE_BATCH]
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                deleted += len(batch) - len(answer.get("Errors", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("sweep", None, exc) from None
        return deleted
