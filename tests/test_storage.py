"""storage.py and its S3 client (serving/s3*.py) against a real S3-compatible server (rclone
    serve s3) and a local directory."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving.config import StorageSettings
from serving.errors import InputError, StorageError
from serving.s3 import S3Storage
from serving.s3config import storage_for_job
from serving.s3wire import REPLY_BUDGET_BYTES
from storage import (
    LocalStorage,
    object_key,
    safe_filename,
    storage_from_settings,
    store_output,
)
from tests.support.s3 import S3Server


def fetch(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read(), r.headers.get("Content-Type", "")


def s3_storage(env: dict[str, str]) -> S3Storage:
    storage = storage_from_settings(StorageSettings.from_env(env))
    assert isinstance(storage, S3Storage)
    return storage


class TestS3Links:
    def test_stored_bytes_download_unchanged_through_the_link(self, s3_settings_env) -> None:
        data = b"\x89PNG\r\n" + bytes(range(256)) * 40
        link = store_output(s3_storage(s3_settings_env), "job-1", data, "image/png",
                            filename="cat picture.png")
        body, content_type = fetch(link["url"])
        assert body == data
        assert hashlib.sha256(body).hexdigest() == link["sha256"]
        assert (link["key"], link["bytes"], link["content_type"], content_type) == (
            "outputs/job-1/cat_picture.png", len(data), "image/png", "image/png")

    def test_expires_at_is_utc_iso_and_matches_link_expiry(self, s3_server, s3_bucket) -> None:
        storage = s3_storage(s3_server.env(s3_bucket, BUCKET_LINK_EXPIRY_SECONDS="600"))
        link = store_output(storage, "job-2", b"{}", "application/json")
        expires = dt.datetime.strptime(link["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.UTC)
        assert abs((expires - dt.datetime.now(dt.UTC)).total_seconds() - 600) < 5
        assert "X-Amz-Expires=600" in link["url"]
        assert link["key"] == "outputs/job-2/output.json"

    def test_a_large_file_goes_up_in_parts_and_verifies(self, s3_server, s3_bucket,
                                                        tmp_path: Path) -> None:
        storage = s3_storage(s3_server.env(s3_bucket, BUCKET_PART_SIZE_MB="5"))
        src = tmp_path / "clip.mp4"
        data = hashlib.sha256(b"seed").digest() * (11 * 1024 * 1024 // 32 + 7)
        src.write_bytes(data)
        link = store_output(storage, "job-3", src, "video/mp4", filename=src.name)
        assert link["bytes"] == len(data)
        assert link["sha256"] == hashlib.sha256(data).hexdigest()
        assert fetch(link["url"])[0] == data

    def test_an_object_larger_than_the_reply_budget_reads_whole(self, s3_settings_env) -> None:
        """Pins: the reply budget spares GetObject bodies, which read_to bounds itself."""
        storage = s3_storage(s3_settings_env)
        data = hashlib.sha256(b"big").digest() * (3 * REPLY_BUDGET_BYTES // 32)
        link = store_output(storage, "job-big", data, "application/octet-stream")
        out = io.BytesIO()
        assert storage.read_to(link["key"], out, max_bytes=len(data)) == len(data)
        assert out.getvalue() == data
        with pytest.raises(StorageError, match="DOWNLOAD_MAX_BYTES"):
            storage.read_to(link["key"], io.BytesIO(), max_bytes=len(data) - 1)

    def test_a_retried_job_overwrites_its_object(self, s3_server, s3_bucket) -> None:
        storage = s3_storage(s3_server.env(s3_bucket))
        first = store_output(storage, "job-4", b"first", "text/plain", filename="a.txt")
        second = store_output(storage, "job-4", b"second", "text/plain", filename="a.txt")
        assert first["key"] == second["key"]
        assert [p.name for p in (s3_server.root / s3_bucket).rglob("*") if p.is_file()] == [
            "a.txt"]
        assert fetch(second["url"])[0] == b"second"

    def test_a_tampered_link_is_forbidden(self, s3_settings_env) -> None:
        link = store_output(s3_storage(s3_settings_env), "job-5", b"secret data", "text/plain")
        with pytest.raises(urllib.error.HTTPError) as err:
            fetch(link["url"].replace("job-5", "job-6"))
        err.value.close()
        assert err.value.code == 403

    def test_an_expired_link_is_refused(self, s3_server, s3_bucket) -> None:
        storage = s3_storage(s3_server.env(s3_bucket, BUCKET_LINK_EXPIRY_SECONDS="1"))
        link = store_output(storage, "job-7", b"short-lived", "text/plain")
        time.sleep(2.2)
        with pytest.raises(urllib.error.HTTPError) as err:
            fetch(link["url"])
        err.value.close()
        assert err.value.code in (400, 403)

    def test_link_re_signs_an_existing_object_and_refuses_a_missing_one(
            self, s3_settings_env) -> None:
        storage = s3_storage(s3_settings_env)
        stored = storage.put(storage.key_for("job-8", "x.bin"), b"abc", "application/x-thing")
        again = storage.link(stored.key)
        assert (again.sha256, again.size, again.content_type) == (
            stored.sha256, 3, "application/x-thing")
        assert fetch(again.url)[0] == b"abc"
        with pytest.raises(StorageError, match="no object"):
            storage.link("outputs/job-8/missing.bin")


class TestS3Failures:
    def test_a_wrong_secret_fails_cleanly_without_retrying(self, s3_server, s3_bucket,
                                                           caplog) -> None:
        wrong = "wrong-secret-Hh7Kd92LmQ"
        env = s3_server.env(s3_bucket, BUCKET_SECRET_ACCESS_KEY=wrong)
        with caplog.at_level(logging.DEBUG), pytest.raises(StorageError) as err:
            store_output(s3_storage(env), "job-9", b"x", "text/plain")
        msg = str(err.value)
        assert "SignatureDoesNotMatch" in msg and "secret access key" in msg
        assert "attempt" not in msg  # permanent: no retries
        assert wrong not in msg and wrong not in caplog.text

    def test_a_missing_bucket_is_named(self, s3_server) -> None:
        with pytest.raises(StorageError, match="bucket does not exist"):
            store_output(s3_storage(s3_server.env("no-such-bucket")), "job-10", b"x",
                         "text/plain")

    def test_unreachable_storage_fails_after_retries(self, start_s3_server, caplog) -> None:
        server: S3Server = start_s3_server()
        storage = s3_storage(server.env(server.make_bucket()))
        store_output(storage, "job-11", b"before", "text/plain")
        server.stop()
        with caplog.at_level(logging.WARNING, logger="storage"), \
                pytest.raises(StorageError) as err:
            store_output(storage, "job-11", b"after", "text/plain")
        assert "after 3 attempts" in str(err.value)
        assert "could not connect to http://127.0.0.1:" in str(err.value)
        assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2

    def test_no_secret_in_errors_logs_or_reprs(self, s3_server, s3_bucket, start_s3_server,
                                               caplog) -> None:
        """Scan every captured log line (botocore's DEBUG included) and message for secrets."""
        down: S3Server = start_s3_server()
        down_bucket = down.make_bucket()
        down.stop()
        job_secret = "job-secret-Pq2Wn8Rt5Yx"
        texts: list[str] = []
        with caplog.at_level(logging.DEBUG):
            for job, env in [
                ({"id": "j1"}, s3_server.env(s3_bucket)),
                ({"id": "j2"}, down.env(down_bucket)),
                ({"id": "j3", "s3Config": {"accessId": s3_server.access_key,
                                           "accessSecret": job_secret,
                                           "bucketName": s3_bucket,
                                           "endpointUrl": s3_server.endpoint}},
                 s3_server.env(s3_bucket)),
            ]:
                settings = StorageSettings.from_env(env)
                storage = storage_for_job(job, settings, storage_from_settings(settings),
                                          allow_private=True)
                texts += [repr(settings), repr(storage)]
                try:
                    texts.append(str(store_output(storage, job["id"], b"x", "text/plain")))
                except StorageError as err:
                    texts.append(str(err))
        texts.append(caplog.text)
        blob = "\n".join(texts)
        assert "Unable to connect" in blob or "could not connect" in blob
        for secret in (s3_server.secret_key, job_secret):
            assert secret not in blob


class TestPerJobConfig:
    def test_a_jobs_s3config_lands_in_its_own_bucket(self, s3_server, s3_bucket) -> None:
        own = s3_server.make_bucket()
        job = {"id": "job-12", "s3Config": {"accessId": s3_server.access_key,
                                            "accessSecret": s3_server.secret_key,
                                            "bucketName": own,
                                            "endpointUrl": s3_server.endpoint + "/"}}
        settings = StorageSettings.from_env(s3_server.env(s3_bucket))
        default = storage_from_settings(settings)
        storage = storage_for_job(job, settings, default, allow_private=True)
        assert storage is not default
        link = store_output(storage, job["id"], b"mine", "text/plain")
        assert (s3_server.root / own / link["key"]).read_bytes() == b"mine"
        assert not (s3_server.root / s3_bucket / link["key"]).exists()
        assert storage_for_job({"id": "job-13"}, settings, default) is default

    @pytest.mark.parametrize(("cfg", "field"), [
        ("not-an-object", "s3Config"),
        ({"accessId": "k", "accessSecret": "", "bucketName": "bkt", "endpointUrl": "http://x"},
         "s3Config.accessSecret"),
        ({"accessId": "k", "accessSecret": "hunter2", "bucketName": "bkt"},
         "s3Config.endpointUrl"),
        ({"accessId": "k", "accessSecret": "hunter2", "bucketName": "bkt",
          "endpointUrl": "ftp://x"}, "s3Config.endpointUrl"),
        ({"accessId": "k", "accessSecret": "hunter2", "bucketName": "b/../x",
          "endpointUrl": "https://s3.example.com"}, "s3Config.bucketName"),
        ({"accessId": "k\nX-Injected: 1", "accessSecret": "hunter2", "bucketName": "bkt",
          "endpointUrl": "https://s3.example.com"}, "s3Config.accessId"),
        ({"accessId": "k", "accessSecret": "hunter2", "bucketName": "bkt",
          "endpointUrl": "https://user:hunter2@s3.example.com"}, "s3Config.endpointUrl"),
    ])
    def test_a_bad_s3config_names_the_field_not_the_value(self, cfg, field: str) -> None:
        with pytest.raises(InputError) as err:
            storage_for_job({"id": "j", "s3Config": cfg}, StorageSettings.from_env({}), None)
        assert err.value.field == field
        assert "hunter2" not in str(err.value)


class TestKeys:
    @pytest.mark.parametrize(("name", "expected"), [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\out put.wav", "out_put.wav"),
        ("..", "output"),
        ("ünïcode.txt", "n_code.txt"),
        ("a" * 300 + ".png", "a" * 116 + ".png"),
    ])
    def test_filenames_are_made_safe(self, name: str, expected: str) -> None:
        assert safe_filename(name) == expected

    def test_keys_derive_from_prefix_job_id_and_name(self) -> None:
        assert object_key("outs/", "sync-1/../x", "a.json") == "outs/sync-1_.._x/a.json"
        assert object_key("", "j", "a.json") == "j/a.json"
        with pytest.raises(StorageError):
            object_key("p", "///", "a.json")


class TestLocalStorage:
    def test_local_links_are_file_urls_that_say_they_do_not_expire(self, tmp_path) -> None:
        storage = storage_from_settings(StorageSettings.from_env(
            {"OUTPUT_LOCAL_DIR": str(tmp_path)}))
        assert isinstance(storage, LocalStorage)
        src = tmp_path / "in.wav"
        src.write_bytes(b"RIFF" + b"\0" * 1000)
        for data in (b"hello", src):
            link = store_output(storage, "job-14", data, "audio/wav", filename="a.wav")
            assert link["url"].startswith("file:///") and link["expires_at"] is None
            body, _ = fetch(link["url"])
            assert hashlib.sha256(body).hexdigest() == link["sha256"]
            assert storage.link(link["key"]).sha256 == link["sha256"]
        assert not list((tmp_path / "outputs" / "job-14").glob(".part-*"))

    def test_no_settings_means_no_storage(self) -> None:
        assert storage_from_settings(StorageSettings.from_env({})) is None
