"""The S3 store's error mapping, throttling retries and bandwidth limit, without a real server:
botocore errors built by hand and a tiny HTTP server that answers 503 SlowDown."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import botocore.exceptions
import grpc
import pytest

from driver import errors
from driver.backup import Credentials, Store, parse_target
from driver.backup import s3 as s3mod
from driver.csi import status

SECRET = "very-secret-value-xyz"


def store(endpoint: str = "http://127.0.0.1:9", attempts: int = 1, **kw: object) -> Store:
    t = parse_target(f"t=s3://bucket/p?endpoint={endpoint}")
    return Store(t, Credentials("AKID", SECRET), max_attempts=attempts, connect_timeout=1,
                 read_timeout=5, **kw)  # type: ignore[arg-type]


def client_error(code: str, status_code: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"},
         "ResponseMetadata": {"HTTPStatusCode": status_code}}, "PutObject")


@pytest.mark.parametrize(("code", "http", "expected"), [
    ("AccessDenied", 403, errors.PermissionDenied),
    ("SignatureDoesNotMatch", 403, errors.PermissionDenied),
    ("InvalidAccessKeyId", 403, errors.PermissionDenied),
    ("NoSuchBucket", 404, errors.FailedPrecondition),
    ("NoSuchKey", 404, errors.NotFound),
    ("EntityTooLarge", 400, errors.ResourceExhausted),
    ("QuotaExceeded", 403, errors.ResourceExhausted),
    ("XMinioStorageFull", 507, errors.ResourceExhausted),
    ("InsufficientStorage", 507, errors.ResourceExhausted),
    ("SlowDown", 503, errors.Unavailable),
    ("InternalError", 500, errors.Unavailable),
    ("InvalidRequest", 400, errors.Internal),
])
def test_client_errors_map_to_domain_errors(code: str, http: int, expected: type) -> None:
    mapped = store()._map(client_error(code, http), "chunks/x", "upload to")
    assert type(mapped) is expected, mapped
    assert SECRET not in str(mapped) and "AKID" not in str(mapped)
    assert "s3://bucket/p/chunks/x" in str(mapped)


def test_quota_is_not_mistaken_for_denial() -> None:
    # QuotaExceeded comes with 403 on some servers: the code decides, not the status
    assert isinstance(store()._map(client_error("QuotaExceeded", 403), None, "x"),
                      errors.ResourceExhausted)


def test_grpc_codes_for_new_errors() -> None:
    assert status.code_for(errors.DataLoss("x")) == grpc.StatusCode.DATA_LOSS
    assert status.code_for(errors.PermissionDenied("x")) == grpc.StatusCode.PERMISSION_DENIED


def test_unreachable_is_unavailable() -> None:
    with pytest.raises(errors.Unavailable, match="unreachable"):
        store().put("k", b"x")  # port 9 (discard) is closed on loopback


class _SlowDown(BaseHTTPRequestHandler):
    fails_left = 0
    puts = 0

    def do_PUT(self) -> None:
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        cls = type(self)
        cls.puts += 1
        if cls.fails_left > 0:
            cls.fails_left -= 1
            body = (b"<?xml version='1.0'?><Error><Code>SlowDown</Code>"
                    b"<Message>Please reduce your request rate.</Message></Error>")
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("ETag", '"abc"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    # GET: the body is cut off (headers promise more than is sent, the connection closes) while
    # cuts_left > 0, as when a server drops a connection or replaces the object mid-read.
    cuts_left = 0
    gets = 0
    BODY = b"the whole object"

    def do_GET(self) -> None:
        cls = type(self)
        cls.gets += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(cls.BODY)))
        self.send_header("Last-Modified", "Thu, 03 Dec 2026 04:00:00 GMT")
        self.end_headers()
        if cls.cuts_left > 0:
            cls.cuts_left -= 1
            self.wfile.write(cls.BODY[:4])
            self.close_connection = True
            return
        self.wfile.write(cls.BODY)

    def log_message(self, *args: object) -> None:
        pass


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on loopback answering with `handler`, stopped and joined afterwards."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        t.join()


@pytest.fixture
def slowdown_server() -> Iterator[str]:
    yield from _serve(_SlowDown)


def test_slowdown_is_retried_with_backoff(slowdown_server: str) -> None:
    _SlowDown.fails_left, _SlowDown.puts = 2, 0
    store(slowdown_server, attempts=4).put("k", b"data")
    assert _SlowDown.puts == 3
    _SlowDown.fails_left, _SlowDown.puts = 5, 0
    with pytest.raises(errors.Unavailable, match="SlowDown"):
        store(slowdown_server, attempts=2).put("k", b"data")
    assert _SlowDown.puts == 2


def test_a_body_cut_off_is_fetched_again(slowdown_server: str) -> None:
    """botocore retries only until the headers; the store retries a GET whose body broke off,
    and after its attempts answers UNAVAILABLE (retryable), never a short object."""
    s = store(slowdown_server)
    _SlowDown.cuts_left, _SlowDown.gets = 2, 0
    assert s.get("k") == _SlowDown.BODY
    assert _SlowDown.gets == 3
    _SlowDown.cuts_left, _SlowDown.gets = 99, 0
    with pytest.raises(errors.Unavailable):
        s.get_with_time("k")
    assert _SlowDown.gets == s.STREAM_ATTEMPTS


def test_rate_limiter_spaces_transfers(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(s3mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(s3mod.time, "sleep", lambda s: slept.append(s))
    lim = s3mod.RateLimiter(1000)
    lim.take(500)  # first transfer starts at once
    lim.take(500)  # the second waits for the first's share: 0.5 s
    lim.take(1000)  # and the third for both: 1.0 s from now
    assert slept == [0.5, 1.0]
    s3mod.RateLimiter(None).take(10**9)
    assert slept == [0.5, 1.0]


class _Objects(BaseHTTPRequestHandler):
    """GET: answers `fails_left` times 503 SlowDown, then the object (or 404 NoSuchKey)."""

    body = b""
    fails_left = 0
    gets: ClassVar[list[tuple[str, str, str]]] = []

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", "Thu, 03 Dec 2026 04:00:00 GMT")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        cls = type(self)
        cls.gets.append((self.path, self.headers.get("Authorization", ""),
                         self.headers.get("User-Agent", "")))
        if cls.fails_left > 0:
            cls.fails_left -= 1
            self._send(503, b"<?xml version='1.0'?><Error><Code>SlowDown</Code>"
                            b"<Message>Please reduce your request rate.</Message></Error>")
        elif not cls.body:
            self._send(404, b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code>"
                            b"<Message>The specified key does not exist.</Message></Error>")
        else:
            self._send(200, cls.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def objects_server() -> Iterator[str]:
    yield from _serve(_Objects)


def test_get_is_one_signed_request(objects_server: str) -> None:
    _Objects.body, _Objects.fails_left, _Objects.gets = b"x" * 70000, 0, []
    assert store(objects_server).get("manifests/snap:1") == b"x" * 70000
    assert len(_Objects.gets) == 1
    path, auth, agent = _Objects.gets[0]
    assert "Boto3" not in agent  # the fast path answered, not boto3
    assert path == "/bucket/p/manifests/snap%3A1"
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKID/")
    assert SECRET not in auth


def test_get_falls_back_to_boto3_retries(objects_server: str) -> None:
    # the fast GET gets a 503, boto3 a second 503 and retries with backoff
    _Objects.body, _Objects.fails_left, _Objects.gets = b"data", 2, []
    assert store(objects_server, attempts=4).get("chunks/ab/abc") == b"data"
    assert ["Boto3" in agent for _, _, agent in _Objects.gets] == [False, True, True]
    _Objects.fails_left, _Objects.gets = 10, []
    with pytest.raises(errors.Unavailable, match="SlowDown"):
        store(objects_server, attempts=2).get("chunks/ab/abc")
    assert len(_Objects.gets) == 3


def test_get_missing_object_is_not_found(objects_server: str) -> None:
    _Objects.body, _Objects.fails_left, _Objects.gets = b"", 0, []
    with pytest.raises(errors.NotFound, match="s3://bucket/p/chunks/ab/abc"):
        store(objects_server).get("chunks/ab/abc")


def test_get_unreachable_is_unavailable() -> None:
    with pytest.raises(errors.Unavailable, match="unreachable"):
        store().get("k")
