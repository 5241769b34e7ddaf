"""A job's own ``s3Config``: checked field by field, then the storage that job's files go to.

This module owns ``storage_for_job``: RunPod's per-request bucket (``accessId``,
``accessSecret``, ``bucketName``, ``endpointUrl``) wins over the worker's ``BUCKET_*`` storage
for that job. Every field is checked before a client is made, and a bad one is an InputError
naming it, never echoing its value. The endpoint obeys the address rule of downloads
(netguard.py): public unless ``DOWNLOAD_ALLOW_PRIVATE=true``, an IP address checked here, a
name where each connection is made (s3wire.py). Never imports boto3 itself (``S3Storage``
does, when a job sends a bucket), torch or runpod.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from serving.config import StorageSettings
from serving.errors import InputError
from serving.netguard import AddressPolicy, address_policy, ascii_host, parse_ip
from serving.s3 import ENDPOINT_FIELD, PRIVATE_ENDPOINT, S3Storage

if TYPE_CHECKING:
    from storage import Storage

_S3CONFIG_FIELDS = ("accessId", "accessSecret", "bucketName", "endpointUrl")
_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def storage_for_job(job: Mapping[str, Any], settings: StorageSettings,
                    default: Storage | None, *, allow_private: bool = False
                    ) -> Storage | None:
    """The storage for one job: its own ``s3Config`` if it sent one, else ``default``.

    ``default`` is the worker's storage, built once at startup (``storage_from_settings``);
    None when the worker has none. An ``s3Config`` that is not an object with the four
    string fields ``accessId``, ``accessSecret``, ``bucketName`` and ``endpointUrl`` is an
    InputError naming the field; values are never echoed. ``endpointUrl`` must be an http(s)
    URL with a valid host and port; its address must be public unless ``allow_private``
    (DOWNLOAD_ALLOW_PRIVATE): an IP address is checked here, a name where each connection is
    made. Region, prefix, link lifetime, part size, retries and time limits come from
    ``settings``.
    """
    cfg = job.get("s3Config")
    if cfg is None:
        return default
    if not isinstance(cfg, Mapping):
        raise InputError("must be an object with accessId, accessSecret, bucketName and "
                         "endpointUrl", field="s3Config")
    for name in _S3CONFIG_FIELDS:
        value = cfg.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InputError("is missing or not a non-empty string", field=f"s3Config.{name}")
    for name in ("accessId", "accessSecret"):
        # Sent in a signed header: printable ASCII only (a newline would end the header).
        if not cfg[name].strip().isascii() or not cfg[name].strip().isprintable():
            raise InputError("must be printable ASCII", field=f"s3Config.{name}")
    bucket = cfg["bucketName"].strip()
    if not 3 <= len(bucket) <= 255 or not set(bucket) <= _BUCKET_CHARS:
        raise InputError("is not a bucket name; use 3..255 letters, digits, '.', '-' or '_'",
                         field="s3Config.bucketName")
    policy = address_policy(allow_private)
    endpoint = _job_endpoint(cfg["endpointUrl"], policy)
    try:
        return S3Storage(endpoint_url=endpoint, access_key_id=cfg["accessId"].strip(),
                         secret_access_key=cfg["accessSecret"].strip(), bucket=bucket,
                         settings=settings, allow_address=policy)
    except ValueError:   # botocore's own endpoint check, should ours ever let one through
        raise InputError("is not a valid endpoint URL", field=ENDPOINT_FIELD) from None


def _job_endpoint(raw: str, policy: AddressPolicy) -> str:
    """A job's endpoint URL, checked: InputError naming s3Config.endpointUrl (never echoing
    it) for anything botocore or the address rule would not take."""
    endpoint = raw.strip().rstrip("/")
    try:
        parts = urlsplit(endpoint)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise InputError("is not a valid URL; check the host and the port (1..65535)",
                         field=ENDPOINT_FIELD) from None
    if parts.scheme not in ("http", "https") or not host:
        raise InputError("must be an http:// or https:// URL with a host",
                         field=ENDPOINT_FIELD)
    if parts.username is not None or parts.password is not None or parts.query \
            or parts.fragment:
        raise InputError("must not carry credentials, a query or a fragment; send the keys in "
                         "accessId and accessSecret", field=ENDPOINT_FIELD)
    if port == 0 or not endpoint.isascii() or not endpoint.isprintable() \
            or ascii_host(host) != host:
        raise InputError("has an invalid host or port; use an ASCII host name or IP address "
                         "and a port in 1..65535", field=ENDPOINT_FIELD)
    ip = parse_ip(host)
    if ip is not None and not policy(ip):   # known now: refuse before the job does any work
        raise InputError(PRIVATE_ENDPOINT, field=ENDPOINT_FIELD)
    return endpoint
