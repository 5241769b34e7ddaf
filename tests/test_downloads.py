"""downloads.py: only public http(s) and our own bucket, capped in size and time; JSONL items."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.config import DownloadSettings, StorageSettings
from serving.downloads import (
    DownloadStop,
    download_bytes,
    download_to,
    is_public_address,
    load_jsonl_url,
    read_jsonl,
    run_download,
)
from serving.errors import DownloadError, InputError, PayloadTooLarge
from storage import storage_from_settings
from tests.support.http_server import pattern


def settings(**env: str) -> DownloadSettings:
    return DownloadSettings.from_env({"DOWNLOAD_ALLOW_PRIVATE": "true", **env})


def only_127_0_0_1(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Treat the test server's address as public and every other non-public one as private."""
    return str(address) == "127.0.0.1" or is_public_address(address)


class TestAddresses:
    def test_loopback_is_refused_by_default(self, http_server) -> None:
        with pytest.raises(DownloadError, match="private or reserved address.*"
                                                "DOWNLOAD_ALLOW_PRIVATE"):
            download_bytes(http_server.url("/data/10"), DownloadSettings.from_env({}))

    def test_a_name_resolving_to_loopback_is_refused_without_saying_its_address(
            self, http_server) -> None:
        with pytest.raises(DownloadError, match="does not resolve to, a public") as err:
            download_bytes(http_server.url("/data/10", host="localhost"),
                           DownloadSettings.from_env({}))
        assert "127.0.0.1" not in str(err.value)   # an internal name's address stays internal

    @pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/",
                                     "http://10.1.2.3/", "http://[::ffff:192.168.0.1]/",
                                     "http://100.64.0.1/", "http://0.0.0.0/", "http://[::1]/"])
    def test_metadata_private_and_mapped_addresses_are_refused(self, url: str) -> None:
        with pytest.raises(DownloadError, match="private or reserved"):
            download_bytes(url, DownloadSettings.from_env({}))

    # IANA special-purpose blocks that some CPython release's ipaddress counts as global.
    @pytest.mark.parametrize("address", [
        "192.0.0.8", "192.0.0.9", "192.0.0.200",    # IETF protocol assignments (3.11.7: global)
        "192.88.99.1",                              # 6to4 relay anycast, deprecated
        "3fff::1",                                  # IPv6 documentation (RFC 9637)
        "2001:1::1", "2001:3::1", "2001:4:112::1", "2001:20::1", "2001:30::1",  # 2001::/23
        "5f00::1", "100:0:0:1::1",                  # SRv6 SIDs, dummy prefix
        "::ffff:192.0.0.8", "64:ff9b::c000:8", "2002:c000:8::1",   # 192.0.0.8 embedded
    ])
    def test_special_purpose_blocks_are_refused_whatever_the_python(self, address: str) -> None:
        """Pins 192.0.0.8 counting as public on Python 3.11.7, and 2001:20::1 on 3.13.0."""
        assert not is_public_address(ipaddress.ip_address(address))

    @pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "192.0.1.1", "192.31.196.1",
                                         "2606:4700:4700::1111", "2001:200::1"])
    def test_globally_routable_addresses_stay_public(self, address: str) -> None:
        assert is_public_address(ipaddress.ip_address(address))

    def test_a_url_to_the_ietf_protocol_block_is_refused(self) -> None:
        with pytest.raises(DownloadError, match="not, or does not resolve to, a public"):
            download_bytes("http://192.0.0.8/x", DownloadSettings.from_env({}))

    def test_loopback_is_allowed_when_allowed_and_the_host_name_is_kept(
            self, http_server) -> None:
        assert download_bytes(http_server.url("/data/1000", host="localhost"),
                              settings()) == pattern(1000)
        assert http_server.hosts[-1] == f"localhost:{http_server.port}"

    def test_a_redirect_to_a_private_address_is_refused(self, http_server) -> None:
        for target in ("http://10.0.0.1/x", f"http://127.0.0.2:{http_server.port}/data/1"):
            with pytest.raises(DownloadError, match="private or reserved"):
                download_bytes(http_server.url(f"/redirect?to={target}"),
                               DownloadSettings.from_env({}), allow_address=only_127_0_0_1)

    def test_a_redirect_to_an_allowed_address_is_followed(self, http_server) -> None:
        url = http_server.url(f"/redirect?to={http_server.url('/data/300')}")
        assert download_bytes(url, DownloadSettings.from_env({}),
                              allow_address=only_127_0_0_1) == pattern(300)

    def test_a_redirect_loop_stops(self, http_server) -> None:
        with pytest.raises(DownloadError, match="redirected more than 5 times"):
            download_bytes(http_server.url("/loop"), settings())


class TestRules:
    @pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x",
                                     "gopher://x/", "http:///nohost"])
    def test_other_schemes_are_refused(self, url: str) -> None:
        with pytest.raises(DownloadError):
            download_bytes(url, settings())

    def test_credentials_in_the_url_are_refused_and_not_echoed(self, http_server) -> None:
        url = http_server.url("/data/1").replace("127.0.0.1", "me:pa55word@127.0.0.1")
        with pytest.raises(DownloadError, match="credentials") as err:
            download_bytes(url, settings())
        assert "pa55word" not in str(err.value)

    def test_a_declared_size_over_the_cap_is_refused_before_reading(self, http_server) -> None:
        with pytest.raises(DownloadError, match="1,000 bytes.*DOWNLOAD_MAX_BYTES"):
            download_bytes(http_server.url("/data/5000"), settings(DOWNLOAD_MAX_BYTES="1000"))

    def test_an_undeclared_size_is_capped_while_reading(self, http_server) -> None:
        with pytest.raises(DownloadError, match="over the download limit"):
            download_bytes(http_server.url("/stream/300000"),
                           settings(DOWNLOAD_MAX_BYTES="100000"))

    def test_a_server_sending_more_than_it_declared_gives_only_what_it_declared(
            self, http_server) -> None:
        assert download_bytes(http_server.url("/lie/300000"),
                              settings(DOWNLOAD_MAX_BYTES="100000")) == pattern(10)

    def test_the_whole_download_has_a_time_limit(self, http_server) -> None:
        with pytest.raises(DownloadError, match="DOWNLOAD_TIMEOUT_SECONDS"):
            download_bytes(http_server.url("/slow"), settings(DOWNLOAD_TIMEOUT_SECONDS="0.7"))

    def test_an_error_status_is_reported_without_the_query(self, http_server) -> None:
        with pytest.raises(DownloadError, match="HTTP 404") as err:
            download_bytes(http_server.url("/status/404?X-Amz-Signature=abc123"), settings())
        assert "abc123" not in str(err.value)

    def test_a_body_cut_before_its_declared_length_is_not_a_success(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            def serve() -> None:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            threading.Thread(target=serve, daemon=True).start()
            port = listener.getsockname()[1]
            with pytest.raises(DownloadError, match="connection broke"):
                download_bytes(f"http://127.0.0.1:{port}/cut", settings())

    def test_a_refused_connection_is_a_download_error(self) -> None:
        from tests.support.s3 import free_port
        with pytest.raises(DownloadError, match="could not connect"):
            download_bytes(f"http://127.0.0.1:{free_port()}/x", settings())


class FirstByte(io.BytesIO):
    """A download's file that sets ``started`` when the first body byte arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.started.set()
        return super().write(data)


class TestEndWithTheJob:
    """A download stops with the job that asked for it, not only at DOWNLOAD_TIMEOUT_SECONDS."""

    def test_stop_ends_a_download_in_progress_at_once(self, http_server) -> None:
        out, stop, errors = FirstByte(), DownloadStop(), []

        def fetch() -> None:
            try:
                download_to(http_server.url("/slow"), out, settings(), stop=stop)   # 10 s
            except DownloadError as err:
                errors.append(err)

        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()
        assert out.started.wait(5)
        stop.stop()
        thread.join(2)
        assert not thread.is_alive(), "the stopped download kept its thread"
        assert len(errors) == 1

    def test_a_stopped_download_never_connects(self, http_server) -> None:
        stop = DownloadStop()
        stop.stop()
        before = len(http_server.hosts)
        with pytest.raises(DownloadError):
            download_bytes(http_server.url("/data/10"), settings(), stop=stop)
        assert len(http_server.hosts) == before

    def test_the_jobs_deadline_ends_a_download_before_its_own_limit(self, http_server) -> None:
        started = time.monotonic()
        with pytest.raises(DownloadError):
            download_bytes(http_server.url("/slow"), settings(DOWNLOAD_TIMEOUT_SECONDS="60"),
                           until=started + 0.5)
        assert time.monotonic() - started < 5      # /slow takes 10 s, the setting 60 s

    def test_cancelling_the_job_frees_the_pool_thread(self, http_server) -> None:
        """Pins downloads outliving their job: the thread was held until the download ended."""
        pool = ThreadPoolExecutor(1, "download")
        out = FirstByte()

        async def scenario() -> str:
            task = asyncio.ensure_future(run_download(pool, lambda stop: download_to(
                http_server.url("/slow"), out, settings(), stop=stop)))
            await asyncio.to_thread(out.started.wait, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The pool's one thread is free again: the next download there runs at once.
            return await asyncio.wait_for(run_download(pool, lambda stop: "next"), 2)

        try:
            assert asyncio.run(scenario()) == "next"
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class TestS3Urls:
    def test_an_object_in_our_bucket_is_read_under_the_allowed_prefix(
            self, s3_settings_env) -> None:
        storage = storage_from_settings(StorageSettings.from_env(s3_settings_env))
        stored = storage.put("inputs/batch.jsonl", b'{"a": 1}\n{"a": 2}\n', "application/jsonl")
        url = f"s3://{storage.bucket}/{stored.key}"
        assert load_jsonl_url(url, settings(BATCH_URL_S3_PREFIX="inputs"),
                              storage=storage) == [{"a": 1}, {"a": 2}]
        with pytest.raises(DownloadError, match="BATCH_URL_S3_PREFIX is unset"):
            load_jsonl_url(url, settings(), storage=storage)

    def test_a_jobs_own_bucket_is_read_anywhere(self, s3_settings_env) -> None:
        storage = storage_from_settings(StorageSettings.from_env(s3_settings_env))
        storage.put("anywhere/batch.jsonl", b'{"a": 1}\n', "application/jsonl")
        url = f"s3://{storage.bucket}/anywhere/batch.jsonl"
        assert load_jsonl_url(url, settings(), storage=storage, job_storage=True) == [{"a": 1}]

    def test_another_bucket_is_refused(self, s3_settings_env) -> None:
        storage = storage_from_settings(StorageSettings.from_env(s3_settings_env))
        with pytest.raises(DownloadError, match="only name the worker's own bucket"):
            download_bytes("s3://someone-elses/secret.txt", settings(), storage=storage)

    def test_s3_urls_need_s3_storage(self) -> None:
        with pytest.raises(DownloadError, match="need S3 storage"):
            download_bytes("s3://bucket/key", settings(), storage=None)

    def test_an_object_over_the_cap_is_refused(self, s3_settings_env) -> None:
        storage = storage_from_settings(StorageSettings.from_env(s3_settings_env))
        storage.put("inputs/big.bin", b"x" * 5000, "application/octet-stream")
        with pytest.raises(DownloadError, match="over the download limit of 1,000 bytes "
                                                r"\(DOWNLOAD_MAX_BYTES\)"):
            download_to(f"s3://{storage.bucket}/inputs/big.bin", io.BytesIO(),
                        settings(DOWNLOAD_MAX_BYTES="1000", BATCH_URL_S3_PREFIX="inputs"),
                        storage=storage)


class TestJsonLines:
    def test_items_are_parsed_and_blank_lines_and_bom_skipped(self, http_server) -> None:
        http_server.files["ok"] = b'\xef\xbb\xbf{"prompt": "a"}\n\n  \n{"prompt": "b"}'
        assert load_jsonl_url(http_server.url("/jsonl/ok"), settings()) == [
            {"prompt": "a"}, {"prompt": "b"}]

    def test_a_bad_line_is_named_by_number(self) -> None:
        with pytest.raises(InputError, match=r"batch_url: line 3 is not valid JSON") as err:
            list(read_jsonl([b"{}\n", b"\n", b'{"a": \n'], max_items=10))
        assert err.value.field == "batch_url"
        with pytest.raises(InputError, match="line 1 is not UTF-8"):
            list(read_jsonl([b"\xff\xfe"], max_items=10))

    def test_a_line_is_measured_before_it_is_parsed(self) -> None:
        limit = 1024
        exact = b'"' + b"a" * (limit - 2) + b'"'
        lines = io.BytesIO(b"\xef\xbb\xbf" + exact + b"\r\n" + exact + b"\n")
        assert list(read_jsonl(lines, max_items=10, max_item_bytes=limit)) == ["a" * 1022] * 2
        cut = io.BytesIO(b"{}\n" + b'{"prompt": "' + b"a" * 5000)   # over the limit, not JSON
        with pytest.raises(PayloadTooLarge, match="line 2 is over the limit of 1,024 bytes "
                                                  r"for one item \(WORKER_MAX_INPUT_BYTES\)"):
            list(read_jsonl(cut, max_items=10, max_item_bytes=limit))

    def test_errors_name_the_line_but_never_quote_it(self) -> None:
        with pytest.raises(InputError) as err:
            list(read_jsonl([b'{"token": secret-value}\n'], max_items=10))
        assert str(err.value) == "batch_url: line 1 is not valid JSON"
        with pytest.raises(InputError, match="line 2 is nested too deeply"):
            list(read_jsonl([b"1\n", b"[" * 100_000 + b"]" * 100_000], max_items=10))

    def test_more_items_than_the_limit_is_refused(self) -> None:
        lines = [b"1\n"] * 4
        assert list(read_jsonl(lines[:3], max_items=3)) == [1, 1, 1]
        with pytest.raises(PayloadTooLarge, match="more than 3 items.*BATCH_MAX_ITEMS"):
            list(read_jsonl(lines, max_items=3))
