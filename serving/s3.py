"""The S3 client: uploads checked before they are linked, retried, timed, and safe to report.

This module owns ``S3Storage`` (AWS S3, Cloudflare R2, MinIO, Backblaze B2, RunPod's S3 API):
uploads, presigned links and object reads, the retry loop, and what each storage error means.
The connections it opens are guarded in ``s3wire.py``; a job's own ``s3Config`` becomes an
``S3Storage`` in ``s3config.py``. boto3 and botocore are imported with the first
``S3Storage``, not with this module: a worker without a bucket never loads them. Never imports
torch or runpod. Calls block (network, disk): from async code run them in a thread.

Guarantees:

- A link is only made after the object is checked: its size (HEAD) and the sha256 computed here
  and stored as object metadata ``sha256``. A failed check is retried like a network error.
- Transient failures (connection, timeout, 5xx, 429, a failed check) are retried with
  exponential backoff (``BUCKET_RETRY_ATTEMPTS``, ``BUCKET_RETRY_DELAY_SECONDS``); then, or at
  once for a permanent failure (credentials, missing bucket), ``StorageError`` says why.
- No secret appears in an error, a log line or a ``repr``: messages are composed here from the
  error code and the endpoint's scheme://host:port, never from botocore's text (which may hold
  signed URLs). Nor does anything the server sent: an error code outside the known S3 codes is
  shown as its HTTP status only. Reading a missing object and one the credentials may not read
  give the same error.
- Every operation (an upload with its retries and check, a link, a read) runs on connections
  of its own, under a total time limit (``BUCKET_UPLOAD_TIMEOUT_SECONDS``, or the caller's
  deadline for reads) that a watchdog enforces by shutting those connections: a server that
  answers one byte at a time cannot hold it longer, whatever the per-request timeout. An
  upload given its job's end (``within``) also stops there: when the job times out or is
  cancelled its connections are shut and its thread is free at once.
- Every reply is read under ``REPLY_BUDGET_BYTES`` (1 MiB: status line, headers, body, a
  100-continue; 64 KiB a line) except a GetObject body, which ``read_to`` bounds by its
  ``max_bytes``. Past it the connection is closed and the operation fails with StorageError,
  not retried: a server cannot make the worker hold an unbounded answer in memory. The
  worker's own bucket obeys the same budget (S3's own replies are a few KB).
- A job's endpoint (``allow_address`` set) is connected to only at an address the rule
  allows, checked where each connection is made; a refused one is an InputError naming
  ``s3Config.endpointUrl``. The worker's own ``BUCKET_*`` endpoint is the operator's and exempt.

Provider notes: botocore >= 1.36 adds checksums by default that R2 and GCS reject; both
``request_checksum_calculation`` and ``response_checksum_validation`` are "when_required" here.
The region is explicit (``BUCKET_REGION``; ``auto`` for R2), never guessed from the URL, and
path-style addressing is the default because every S3-compatible server accepts it.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar
from urllib.parse import urlsplit

from serving.config import StorageSettings
from serving.errors import InputError, StorageError
from serving.netguard import AddressPolicy, AddressRefused, Deadline, allow_any_address
from serving.s3wire import MAX_LINE, REPLY_BUDGET_BYTES, Limit, ReplyTooLarge, guard_connections
from serving.stored import StoredObject, check_key, digest, object_key

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0                        # cap on one retry delay
_SHA256_META = "sha256"                      # x-amz-meta-sha256
# Error codes that no retry can fix: wrong credentials, missing bucket, no permission.
_PERMANENT_CODES = {
    "AccessDenied": "the storage refused access: check the credentials and bucket permissions",
    "InvalidAccessKeyId": "the storage does not know this access key id: check the credentials",
    "SignatureDoesNotMatch": "the storage refused the signature: check the secret access key "
                             "(and BUCKET_REGION)",
    "AuthorizationHeaderMalformed": "the storage refused the request signature: check "
                                    "BUCKET_REGION (auto for Cloudflare R2)",
    "NoSuchBucket": "the bucket does not exist at this endpoint",
    "InvalidBucketName": "the bucket name is not valid for this storage",
    "PermanentRedirect": "the bucket is in another region or needs another endpoint",
}
# Transient codes worth naming; any other code a server sends is shown as its HTTP status only
# (a code is the server's text, and a job's server may be anyone's).
_KNOWN_TRANSIENT_CODES = frozenset(("SlowDown", "RequestTimeout", "InternalError",
                                    "ServiceUnavailable", "RequestTimeTooSkewed"))
# Reading: "no such object" and "not yours to read" must look alike to the caller.
_UNREADABLE_CODES = frozenset(("NoSuchKey", "NotFound", "AccessDenied", "AllAccessDisabled"))
_UNREADABLE = "cannot be read: there is no such object, or no permission to read it"
PRIVATE_ENDPOINT = ("the host is not, or does not resolve to, a public address; a job's "
                    "storage must be at a public address unless the worker sets "
                    "DOWNLOAD_ALLOW_PRIVATE=true")
ENDPOINT_FIELD = "s3Config.endpointUrl"


def _expiry(seconds: int) -> dt.datetime:
    # Taken before signing, so the stated expiry is never later than the link's own.
    return dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=seconds)


def endpoint_label(url: str) -> str:
    """scheme://host[:port] of an endpoint: what messages may show of it."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class _Transient(Exception):
    """An attempt failed in a way the next attempt may not (network, 5xx, failed check)."""


T = TypeVar("T")


def _with_retries(what: str, attempts: int, delay_s: float, fn: Callable[[], T],
                  deadline: Limit) -> T:
    """Run ``fn``; retry on _Transient with jittered exponential backoff; then StorageError.

    Nothing runs past ``deadline``: neither an attempt (its connections are shut) nor a pause.
    """
    for attempt in range(1, attempts + 1):
        try:
            if deadline.passed():
                raise _Transient("out of time")
            return fn()
        except _Transient as err:
            if deadline.job_ended():
                raise StorageError(f"{what} stopped: the job ended (WORKER_JOB_TIMEOUT_S, or "
                                   "a cancel)") from None
            if deadline.passed():
                raise StorageError(f"{what} did not finish within {deadline.seconds:g} s "
                                   "(BUCKET_UPLOAD_TIMEOUT_SECONDS)") from None
            if attempt == attempts:
                raise StorageError(f"{what} failed after {attempts} attempt"
                                   f"{'s' if attempts > 1 else ''}: {err}") from None
            pause = min(_MAX_BACKOFF_S, delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            pause = min(pause, deadline.remaining())
            log.warning("%s failed (%s); retry %d/%d in %.2f s",
                        what, err, attempt, attempts - 1, pause)
            deadline.pause(pause)
    raise AssertionError("unreachable")


def _find(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``err`` or the first exception of ``kind`` it wraps (causes, contexts, and botocore's
    ``error`` keyword), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        wrapped = getattr(current, "kwargs", None)
        todo += [current.__cause__, current.__context__,
                 wrapped.get("error") if isinstance(wrapped, dict) else None]
    return None


class S3Storage:
    """An S3-compatible bucket (AWS S3, Cloudflare R2, MinIO, Backblaze B2, RunPod S3 API).

    ``allow_address`` is None for the worker's own bucket (the operator's endpoint: any address,
    environment proxies honoured) and the address rule for a job's own ``s3Config`` (no
    proxies: a proxy would resolve the name itself, past the rule).
    """

    kind = "s3"

    def __init__(self, *, endpoint_url: str, access_key_id: str, secret_access_key: str,
                 bucket: str, settings: StorageSettings,
                 allow_address: AddressPolicy | None = None) -> None:
        # boto3 loads here, with the first bucket, not with this module (see the docstring).
        import boto3
        import botocore.config
        from boto3.s3.transfer import TransferConfig

        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.prefix = settings.prefix
        self.link_expiry_s = settings.link_expiry_s
        self.retry_attempts = settings.retry_attempts
        self.retry_delay_s = settings.retry_delay_s
        self.transfer_timeout_s = settings.upload_timeout_s
        self._allow_address = allow_address
        self._endpoint = endpoint_label(endpoint_url)
        self._endpoint_field = "BUCKET_ENDPOINT_URL" if allow_address is None else ENDPOINT_FIELD
        self._transfer = TransferConfig(
            multipart_threshold=settings.part_size_bytes,
            multipart_chunksize=settings.part_size_bytes,
            max_concurrency=settings.upload_concurrency,
            use_threads=True,
        )
        self._config = botocore.config.Config(
            region_name=settings.region,
            signature_version="s3v4",  # presigned links default to SigV2 on path-style otherwise
            s3={"addressing_style": settings.addressing_style},
            # R2/GCS reject botocore's default CRC checksums (SignatureDoesNotMatch).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Our own retry loop (configurable delays, clean messages) replaces botocore's.
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=settings.timeout_s,
            read_timeout=settings.timeout_s,
            max_pool_connections=max(10, settings.upload_concurrency + 2),
            proxies={} if allow_address is not None else None,
        )
        # A private session: no ~/.aws, AWS_* variables or profiles change what we sign with.
        self._session = boto3.session.Session(aws_access_key_id=access_key_id,
                                              aws_secret_access_key=secret_access_key,
                                              region_name=settings.region)
        self._session_lock = threading.Lock()   # boto3 sessions are not thread-safe
        self._new_client().close()   # a malformed endpoint fails here, not on first use

    def __repr__(self) -> str:
        return f"S3Storage(endpoint={self._endpoint!r}, bucket={self.bucket!r})"

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> S3Storage:
        """The worker's own bucket, from ``BUCKET_*``."""
        if settings.backend != "s3":
            raise StorageError("no S3 storage is configured: set BUCKET_ENDPOINT_URL, "
                               "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY and BUCKET_NAME")
        assert settings.endpoint_url and settings.access_key_id and settings.bucket
        assert settings.secret_access_key
        return cls(endpoint_url=settings.endpoint_url, access_key_id=settings.access_key_id,
                   secret_access_key=settings.secret_access_key, bucket=settings.bucket,
                   settings=settings)

    def _new_client(self) -> Any:
        with self._session_lock:
            return self._session.client("s3", endpoint_url=self.endpoint_url,
                                        config=self._config)

    @contextmanager
    def _client(self, deadline: Limit) -> Iterator[Any]:
        """A client for one operation: connections of its own, guarded, shut at ``deadline``.

        One client per operation (about 5 ms to make) is what lets the watchdog shut exactly
        that operation's connections, those of multipart worker threads included, and never a
        pooled connection another job is using.
        """
        client = self._new_client()
        try:
            guard_connections(client, self._allow_address or allow_any_address, deadline)
            yield client
        finally:
            client.close()

    def key_for(self, job_id: str, filename: str) -> str:
        return object_key(self.prefix, job_id, filename)

    def put(self, key: str, data: bytes | Path, content_type: str,
            within: Deadline | None = None) -> StoredObject:
        check_key(key)
        size, sha256 = digest(data)
        extra = {"ContentType": content_type, "Metadata": {_SHA256_META: sha256}}

        with Deadline(self.transfer_timeout_s) as own:
            deadline = Limit(own, within)

            def attempt() -> StoredObject:
                with self._client(deadline) as client:
                    try:
                        if isinstance(data, Path):
                            client.upload_file(str(data), self.bucket, key, ExtraArgs=extra,
                                               Config=self._transfer)
                        else:
                            client.upload_fileobj(io.BytesIO(data), self.bucket, key,
                                                  ExtraArgs=extra, Config=self._transfer)
                    except Exception as err:  # noqa: BLE001  (classified, never shown raw)
                        self._raise_classified(err, deadline)
                    return self._verified(client, deadline, key, size, sha256)

            return _with_retries(f"upload of {key!r} to bucket {self.bucket!r} at "
                                 f"{self._endpoint}", self.retry_attempts, self.retry_delay_s,
                                 attempt, deadline)

    def link(self, key: str) -> StoredObject:
        check_key(key)
        with Deadline(self.transfer_timeout_s) as own:
            deadline = Limit(own)

            def attempt() -> StoredObject:
                with self._client(deadline) as client:
                    return self._verified(client, deadline, key, None, None)

            return _with_retries(f"link to {key!r} in bucket {self.bucket!r} at "
                                 f"{self._endpoint}", self.retry_attempts, self.retry_delay_s,
                                 attempt, deadline)

    def read_to(self, key: str, out: BinaryIO, max_bytes: int,
                deadline: Deadline | None = None) -> int:
        """Copy object ``key`` into ``out``; StorageError if larger than ``max_bytes``.

        ``deadline`` bounds the whole read (default: ``BUCKET_UPLOAD_TIMEOUT_SECONDS`` from
        now). Returns the size. A missing object and a forbidden one give the same error.
        Used by downloads.py for ``s3://`` inputs, whose messages name DOWNLOAD_MAX_BYTES.
        """
        check_key(key)
        own = Deadline(self.transfer_timeout_s) if deadline is None else None
        limit = Limit(deadline or own)  # type: ignore[arg-type]
        try:
            with self._client(limit) as client:
                try:
                    obj = client.get_object(Bucket=self.bucket, Key=key)
                except Exception as err:  # noqa: BLE001
                    if _unreadable(err):
                        raise StorageError(_UNREADABLE) from None
                    try:
                        self._raise_classified(err, limit)
                    except _Transient as transient:
                        raise StorageError(f"reading failed: {transient}") from None
                return self._copy_body(obj, out, max_bytes, limit)
        finally:
            if own is not None:
                own.close()

    def _copy_body(self, obj: Mapping[str, Any], out: BinaryIO, max_bytes: int,
                   deadline: Limit) -> int:
        from botocore.exceptions import BotoCoreError

        body = obj["Body"]
        too_large = StorageError(f"the object is over the download limit of {max_bytes:,} "
                                 "bytes (DOWNLOAD_MAX_BYTES)")
        try:
            if obj.get("ContentLength", 0) > max_bytes:
                raise too_large
            total = 0
            for chunk in body.iter_chunks(1024 * 1024):
                total += len(chunk)
                if total > max_bytes:
                    raise too_large
                out.write(chunk)
        except (BotoCoreError, OSError):
            if deadline.passed():
                raise StorageError("reading the object ran out of time") from None
            raise StorageError("reading the object was interrupted") from None
        finally:
            body.close()
        if deadline.passed():    # the watchdog may have ended the body early: not a success
            raise StorageError("reading the object ran out of time")
        return total

    def _verified(self, client: Any, deadline: Limit, key: str, size: int | None,
                  sha256: str | None) -> StoredObject:
        """HEAD the object, compare size and sha256 metadata, and presign a GET."""
        try:
            head = client.head_object(Bucket=self.bucket, Key=key)
        except Exception as err:  # noqa: BLE001
            if _error_code(err) in ("404", "NoSuchKey", "NotFound"):
                if size is None:
                    raise StorageError(f"no object {key!r} in bucket {self.bucket!r}") from None
                raise _Transient("the object was not found after upload") from None
            self._raise_classified(err, deadline)
        stored_size = int(head.get("ContentLength", -1))
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        stored_sha = meta.get(_SHA256_META, "")
        if size is not None and stored_size != size:
            raise _Transient(f"stored size {stored_size} differs from uploaded size {size}")
        if sha256 is not None and stored_sha != sha256:
            raise _Transient("stored sha256 metadata differs from the uploaded bytes")
        if size is None and not stored_sha:
            raise StorageError(f"object {key!r} has no sha256 metadata; it was not written "
                               "by this worker")
        expires = _expiry(self.link_expiry_s)
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.link_expiry_s)
        return StoredObject(url=url, key=key, size=stored_size, sha256=stored_sha,
                            content_type=head.get("ContentType") or "application/octet-stream",
                            expires_at=expires)

    def _raise_classified(self, err: BaseException, deadline: Limit) -> NoReturn:
        """Re-raise a boto error as _Transient (retry), StorageError (permanent), or
        InputError (a job's endpoint the address rule refuses), sanitised."""
        import botocore.exceptions

        if _find(err, AddressRefused) is not None:
            raise InputError(PRIVATE_ENDPOINT, field=ENDPOINT_FIELD) from None
        if _find(err, ReplyTooLarge) is not None:
            # Not retried: a server that sent this much once will again.
            raise StorageError(f"the storage at {self._endpoint} sent a reply larger than S3 "
                               f"sends (over {REPLY_BUDGET_BYTES:,} bytes, or a line over "
                               f"{MAX_LINE:,}), so the connection was closed; check "
                               f"{self._endpoint_field}") from None
        if deadline.passed():
            # Whatever broke, it broke because the watchdog shut the connection.
            raise _Transient("out of time") from None
        # boto3's upload_file wraps ClientError in S3UploadFailedError (implicit context).
        inner = _find(err, botocore.exceptions.ClientError)
        if isinstance(inner, botocore.exceptions.ClientError):
            code = _error_code(inner)
            status = inner.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _PERMANENT_CODES:
                raise StorageError(f"{_PERMANENT_CODES[code]} ({code} from {self._endpoint}, "
                                   f"bucket {self.bucket!r})") from None
            shown = code if code in _KNOWN_TRANSIENT_CODES else f"HTTP {status}"
            if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout"):
                raise _Transient(f"the storage answered {shown}") from None
            raise StorageError(f"the storage at {self._endpoint} answered {shown} "
                               f"for bucket {self.bucket!r}") from None
        if isinstance(err, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.
                      ReadTimeoutError):
            raise _Transient(f"no answer from {self._endpoint} in time") from None
        if isinstance(err, botocore.exceptions.EndpointConnectionError | botocore.exceptions.
                      ConnectionClosedError | botocore.exceptions.HTTPClientError):
            raise _Transient(f"could not connect to {self._endpoint}") from None
        if isinstance(err, botocore.exceptions.NoCredentialsError):
            raise StorageError("no credentials for the storage") from None
        if isinstance(err, OSError):
            raise _Transient(f"{type(err).__name__} talking to {self._endpoint}") from None
        log.error("unexpected storage failure at %s: %s", self._endpoint, type(err).__name__)
        raise StorageError(f"unexpected storage failure ({type(err).__name__}) at "
                           f"{self._endpoint}") from None


def _unreadable(err: BaseException) -> bool:
    """A read refused as missing or forbidden (told apart by neither code nor status)."""
    import botocore.exceptions

    if not isinstance(err, botocore.exceptions.ClientError):
        return False
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return _error_code(err) in _UNREADABLE_CODES or status in (403, 404)


def _error_code(err: BaseException) -> str:
    import botocore.exceptions

    if isinstance(err, botocore.exceptions.ClientError):
        return str(err.response.get("Error", {}).get("Code", ""))
    return ""
