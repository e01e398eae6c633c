"""Backup targets: `NAME=s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]` and a small object store
client on boto3 (path-style addressing, retries with backoff including 503 SlowDown, a thread-safe
client shared by the transfer pool) that speaks domain errors.

GET, the restore's hot path, first tries one request signed with botocore's SigV4 signer and sent
on botocore's urllib3 session, which costs about half the client CPU of a boto3 call (no
parameter validation, event hooks or response parsing). Only a 200 with the whole body is taken
from it; anything else (an error status, a short body, a connection error) repeats the GET
through boto3, so retries, backoff and the error mapping stay boto3's.

Credentials come only from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if
set) and are handed to boto3 explicitly, so no ~/.aws file or instance profile is consulted. No
message built here contains a credential.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, quote, urlsplit

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.httpsession
import botocore.utils

from driver import errors

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_PART = re.compile(r"^[A-Za-z0-9._-]+$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+$|^\[[0-9A-Fa-f:.]+\]$")

_DENIED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403", "Forbidden",
           "InvalidToken", "ExpiredToken", "AllAccessDisabled", "AccountProblem"}
_FULL = {"EntityTooLarge", "QuotaExceeded", "InsufficientStorage", "XMinioStorageFull",
         "507", "StorageFull", "QuotaExceededError"}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class Target:
    """A parsed backup target. `spec` is what the operator wrote (it holds no secret)."""

    name: str
    bucket: str
    prefix: str
    endpoint: str
    region: str
    spec: str

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


def parse_target(spec: str) -> Target:
    """Parse `NAME=s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]`; InvalidArgument saying what is
    wrong and what the form is for every malformed spec."""
    form = "the form is NAME=s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]"

    def bad(what: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"backup target {spec!r}: {what}; {form}")

    if not isinstance(spec, str) or "=" not in spec:
        raise bad("no NAME=")
    name, _, url = spec.partition("=")
    if not _NAME.fullmatch(name):
        raise bad("NAME must be 1-63 lowercase letters, digits or '-'")
    if not url.startswith("s3://"):
        raise bad("the URL must start with s3://")
    rest = url[len("s3://") :]
    path, sep, query = rest.partition("?")
    if not sep or not query:
        raise bad("endpoint=URL is required")
    bucket, _, prefix = path.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise bad("BUCKET must be 3-63 lowercase letters, digits, '.' or '-'")
    prefix = prefix.rstrip("/")
    if prefix:
        parts = prefix.split("/")
        if any(p in ("", ".", "..") or not _PREFIX_PART.fullmatch(p) for p in parts):
            raise bad("PREFIX must be '/'-separated parts of letters, digits, '.', '_' or '-'")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise bad("the query is malformed") from None
    params: dict[str, str] = {}
    for k, v in pairs:
        if k not in ("endpoint", "region"):
            raise bad(f"unknown parameter {k!r} (known: endpoint, region)")
        if k in params:
            raise bad(f"parameter {k!r} given twice")
        params[k] = v
    endpoint = params.get("endpoint", "")
    parts_ = urlsplit(endpoint)
    try:
        port = parts_.port
        port_ok = port is None or 0 < port < 65536
    except ValueError:  # not a number, or out of range
        port, port_ok = None, False
    host = parts_.netloc.rsplit(":", 1)[0] if port is not None else parts_.netloc
    if (
        parts_.scheme not in ("http", "https")
        or not port_ok
        or not parts_.hostname
        or not _HOST.fullmatch(host)
        or parts_.path not in ("", "/")
        or parts_.query
        or parts_.fragment
        or "@" in parts_.netloc
    ):
        raise bad("endpoint must be http(s)://HOST[:PORT] (no user, path or query)")
    region = params.get("region", "us-east-1")
    if not _REGION.fullmatch(region):
        raise bad("region must be lowercase letters, digits or '-'")
    return Target(name, bucket, prefix, endpoint.rstrip("/"), region, spec)


def parse_targets(specs: list[str]) -> dict[str, Target]:
    out: dict[str, Target] = {}
    for s in specs:
        t = parse_target(s)
        if t.name in out:
            raise errors.InvalidArgument(f"backup target name {t.name!r} is given twice")
        out[t.name] = t
    return out


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Credentials:
        e = os.environ if env is None else env
        ak, sk = e.get("AWS_ACCESS_KEY_ID", ""), e.get("AWS_SECRET_ACCESS_KEY", "")
        if not ak or not sk:
            raise errors.FailedPrecondition(
                "backup targets need AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
                "environment (chart: from a Secret)"
            )
        return cls(ak, sk, e.get("AWS_SESSION_TOKEN") or None)


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the target prefix
    size: int
    modified: float  # server time, seconds since the epoch


class RateLimiter:
    """A token bucket shared by every transfer thread: at most `rate` bytes per second."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)


class Store:
    """One target's bucket, addressed relative to its prefix. Thread-safe."""

    def __init__(
        self,
        target: Target,
        credentials: Credentials,
        max_connections: int = 16,
        max_attempts: int = 6,
        retry_mode: Literal["standard", "adaptive", "legacy"] = "standard",
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        rate_limit: int | None = None,
    ) -> None:
        self.target = target
        self.limiter = RateLimiter(rate_limit)
        config = botocore.config.Config(
            region_name=target.region,
            s3={"addressing_style": "path"},
            # total_max_attempts counts the first try too; "standard" and "adaptive" both back
            # off exponentially with jitter and retry throttling (503 SlowDown) and 5xx.
            retries={"mode": retry_mode, "total_max_attempts": max_attempts},
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            signature_version="s3v4",
            # Plain checksums: rclone and older S3 servers reject the CRC trailers newer boto3
            # sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(
            aws_access_key_id=credentials.access_key,
            aws_secret_access_key=credentials.secret_key,
            aws_session_token=credentials.session_token,
            region_name=target.region,
        )
        self._c: Any = session.client("s3", endpoint_url=target.endpoint, config=config)
        # The fast GET path: the same credentials, proxies (environment) and CA bundle as the
        # client above, its own connection pool of the same size.
        self._signer = botocore.auth.S3SigV4Auth(
            botocore.credentials.Credentials(
                credentials.access_key, credentials.secret_key, credentials.session_token
            ),
            "s3",
            target.region,
        )
        # (botocore takes a CA bundle path for verify and a (connect, read) timeout pair; its
        # type stubs say bool and int)
        self._http = botocore.httpsession.URLLib3Session(
            verify=cast(bool, os.environ.get("AWS_CA_BUNDLE") or True),
            proxies=botocore.utils.get_environ_proxies(target.endpoint),
            timeout=cast(int, (connect_timeout, read_timeout)),
            max_pool_connections=max_connections,
        )
        self._base_url = f"{target.endpoint}/{target.bucket}/"

    def _where(self, key: str | None) -> str:
        t = self.target
        obj = f"/{t.key(key)}" if key is not None else ""
        return f"target {t.name} (s3://{t.bucket}{obj} at {t.endpoint})"

    def _map(self, exc: Exception, key: str | None, op: str) -> errors.StowageError:
        where = self._where(key)
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            msg = str(err.get("Message", ""))[:200]
            detail = f"{op} {where}: {code} {msg}".strip()
            if code == "NoSuchBucket":
                return errors.FailedPrecondition(f"{detail}: the bucket does not exist")
            if code in _FULL or status in (413, 507):
                return errors.ResourceExhausted(f"{detail}: the object store is full")
            if code in _DENIED or status == 403:
                return errors.PermissionDenied(f"{detail}: check the target's credentials")
            if code in _MISSING_KEY or status == 404:
                return errors.NotFound(detail)
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                return errors.Unavailable(f"{detail} (retried)")
            return errors.Internal(detail)
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return errors.FailedPrecondition(f"{op} {where}: no credentials")
        if isinstance(
            exc,
            botocore.exceptions.EndpointConnectionError
            | botocore.exceptions.ConnectionError
            | botocore.exceptions.HTTPClientError
            | botocore.exceptions.ConnectionClosedError
            | botocore.exceptions.ReadTimeoutError
            | botocore.exceptions.ConnectTimeoutError
            | ConnectionError
            | TimeoutError,
        ):
            return errors.Unavailable(
                f"{op} {where}: object store unreachable: {type(exc).__name__}"
            )
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return errors.Unavailable(f"{op} {where}: {type(exc).__name__}")
        return errors.Internal(f"{op} {where}: {type(exc).__name__}")

    def put(self, key: str, body: bytes) -> None:
        self.limiter.take(len(body))
        try:
            self._c.put_object(Bucket=self.target.bucket, Key=self.target.key(key), Body=body)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._map(exc, key, "upload to") from exc

    def _fast_get(self, key: str) -> bytes | None:
        """The object's body from one signed GET, or None when that GET did not answer 200 with
        the whole body (the caller then asks boto3, which retries and maps the error)."""
        req = botocore.awsrequest.AWSRequest(
            method="GET", url=self._base_url + quote(self.target.key(key), safe="/~")
        )
        self._signer.add_auth(req)
        try:
            resp = self._http.send(req.prepare())
        except botocore.exceptions.BotoCoreError:
            return None
        body: bytes = resp.content
        length = resp.headers.get("Content-Length")
        if resp.status_code != 200 or length != str(len(body)):
            return None
        return body

    # A body cut off mid-stream (the server dropped the connection, or replaced the object while
    # it was being read: rclone's file backend does) is not retried by botocore, which retries
    # only until the response headers: the whole GET is tried again, a few times.
    STREAM_ATTEMPTS = 4

    def _get(self, key: str) -> tuple[bytes, float]:
        for attempt in range(1, self.STREAM_ATTEMPTS + 1):
            try:
                resp = self._c.get_object(Bucket=self.target.bucket, Key=self.target.key(key))
                body: bytes = resp["Body"].read()
            except botocore.exceptions.ResponseStreamingError as exc:
                if attempt < self.STREAM_ATTEMPTS:
                    time.sleep(0.05 * 2**attempt)
                    continue
                raise self._map(exc, key, "download from") from exc
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                raise self._map(exc, key, "download from") from exc
            modified: datetime = resp["LastModified"]
            return body, modified.timestamp()
        raise AssertionError("unreachable")

    def get(self, key: str) -> bytes:
        body = self._fast_get(key)
        if body is None:
            body, _ = self._get(key)
        self.limiter.take(len(body))
        return body

    def get_with_time(self, key: str) -> tuple[bytes, float]:
        """The object's body and its server modification time, from one GET."""
        return self._get(key)

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and modification time, None when it does not exist."""
        try:
            r = self._c.head_object(Bucket=self.target.bucket, Key=self.target.key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            mapped = self._map(exc, key, "look up")
            if isinstance(mapped, errors.NotFound):
                return None
            raise mapped from exc
        modified: datetime = r["LastModified"]
        return ObjectInfo(key, int(r["ContentLength"]), modified.timestamp())

    def delete(self, key: str) -> None:
        try:
            self._c.delete_object(Bucket=self.target.bucket, Key=self.target.key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            mapped = self._map(exc, key, "delete from")
            if isinstance(mapped, errors.NotFound):
                return
            raise mapped from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose relative key starts with `prefix`."""
        full = self.target.key(prefix)
        cut = len(self.target.prefix) + 1 if self.target.prefix else 0
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.target.bucket, "Prefix": full, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            try:
                r = self._c.list_objects_v2(**kw)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                raise self._map(exc, prefix, "list") from exc
            for o in r.get("Contents", []):
                yield ObjectInfo(o["Key"][cut:], int(o["Size"]), o["LastModified"].timestamp())
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")
            if not token:
                return

    def check(self) -> None:
        """Fail early, with the right error, when the bucket is missing or access is denied."""
        try:
            self._c.list_objects_v2(
                Bucket=self.target.bucket, Prefix=self.target.key("manifests/"), MaxKeys=1
            )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._map(exc, None, "list") from exc
