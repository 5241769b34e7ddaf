"""Storage that fails mid-way: retries, then a clean failure; never a link to a partial object.

The real rclone S3 server, behind a loopback proxy that cuts uploads or answers slowly.
"""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError

from serving.config import StorageSettings
from serving.errors import StorageError
from serving.s3 import S3Storage
from storage import store_output
from tests.support.faulty_proxy import FaultyProxy

BODY = bytes(range(256)) * (12 * 4096)          # 12 MiB: three 5 MiB multipart parts


def storage_via(proxy: FaultyProxy, server, bucket: str, **extra: str) -> S3Storage:
    env = server.env(bucket, BUCKET_PART_SIZE_MB="5", **extra)
    env["BUCKET_ENDPOINT_URL"] = proxy.endpoint
    return S3Storage.from_settings(StorageSettings.from_env(env))


def object_exists(server, bucket: str, key: str) -> bool:
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id=server.access_key,
                          aws_secret_access_key=server.secret_key)
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError:
        return False


@pytest.fixture
def proxy(s3_server):
    proxy = FaultyProxy(target_port=s3_server.port).start()
    yield proxy
    proxy.stop()


class TestUploadCutMidway:
    def test_every_attempt_cut_fails_cleanly_and_leaves_no_object(self, proxy, s3_server,
                                                                 s3_bucket):
        proxy.drop_after_bytes = 2 * 1024 * 1024
        storage = storage_via(proxy, s3_server, s3_bucket)
        with pytest.raises(StorageError) as err:
            store_output(storage, "job-cut", BODY, "application/octet-stream", "big.bin")
        assert "after 3 attempts" in str(err.value)
        assert s3_server.secret_key not in str(err.value)
        assert not object_exists(s3_server, s3_bucket, storage.key_for("job-cut", "big.bin"))

    def test_one_cut_connection_is_retried_and_the_object_verifies(self, proxy, s3_server,
                                                                  s3_bucket):
        proxy.drop_after_bytes, proxy.drop_connections = 1024 * 1024, 1
        storage = storage_via(proxy, s3_server, s3_bucket)
        link = store_output(storage, "job-retry", BODY, "application/octet-stream", "big.bin")
        assert proxy.dropped == 1
        assert link["bytes"] == len(BODY)
        assert object_exists(s3_server, s3_bucket, link["key"])


# slow: a server slower than the timeout, through every retry (~6 s)
@pytest.mark.slow
class TestSlowServer:
    def test_a_server_slower_than_the_timeout_fails_after_retries(self, proxy, s3_server,
                                                                 s3_bucket):
        proxy.delay_s = 2.5
        storage = storage_via(proxy, s3_server, s3_bucket, BUCKET_TIMEOUT_SECONDS="1")
        with pytest.raises(StorageError) as err:
            store_output(storage, "job-slow", b"small answer", "text/plain")
        assert "after 3 attempts" in str(err.value)
