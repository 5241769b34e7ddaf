"""Storage and download settings: complete or absent, never half, never a silent fallback."""

from __future__ import annotations

import pytest

from serving.config import DownloadSettings, StorageSettings
from serving.errors import SettingsError

FULL = {"BUCKET_ENDPOINT_URL": "https://example.r2.cloudflarestorage.com",
        "BUCKET_ACCESS_KEY_ID": "AKIAEXAMPLE", "BUCKET_SECRET_ACCESS_KEY": "s3cr3t-value-xyz",
        "BUCKET_NAME": "outputs-bucket"}


class TestWhichBackend:
    def test_nothing_set_means_no_storage(self) -> None:
        s = StorageSettings.from_env({})
        assert s.backend is None
        assert s.inline_limit_bytes == 1_000_000

    def test_all_four_bucket_variables_mean_s3(self) -> None:
        s = StorageSettings.from_env(FULL)
        assert (s.backend, s.bucket, s.region, s.addressing_style) == (
            "s3", "outputs-bucket", "us-east-1", "path")

    def test_local_dir_alone_means_local(self, tmp_path) -> None:
        s = StorageSettings.from_env({"OUTPUT_LOCAL_DIR": str(tmp_path)})
        assert (s.backend, s.local_dir) == ("local", tmp_path.resolve())

    def test_local_dir_with_bucket_is_refused_not_picked(self, tmp_path) -> None:
        with pytest.raises(SettingsError, match="OUTPUT_LOCAL_DIR and BUCKET_"):
            StorageSettings.from_env({**FULL, "OUTPUT_LOCAL_DIR": str(tmp_path)})


class TestPartialSettings:
    @pytest.mark.parametrize("missing", sorted(FULL))
    def test_one_missing_variable_is_named(self, missing: str) -> None:
        env = {k: v for k, v in FULL.items() if k != missing}
        with pytest.raises(SettingsError) as err:
            StorageSettings.from_env(env)
        assert f"{missing} is missing" in str(err.value)
        assert FULL["BUCKET_SECRET_ACCESS_KEY"] not in str(err.value)

    def test_endpoint_alone_names_all_three_missing(self) -> None:
        with pytest.raises(SettingsError) as err:
            StorageSettings.from_env({"BUCKET_ENDPOINT_URL": "http://minio:9000"})
        msg = str(err.value)
        for name in ("BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "BUCKET_NAME"):
            assert name in msg.split("(")[0]


class TestInvalidValues:
    @pytest.mark.parametrize(("name", "value", "hint"), [
        ("BUCKET_ENDPOINT_URL", "minio:9000", "http:// or https://"),
        ("BUCKET_ENDPOINT_URL", "https://user:pw@host", "credentials"),
        ("BUCKET_NAME", "a", "bucket name"),
        ("BUCKET_ADDRESSING_STYLE", "dns", "path, virtual"),
        ("BUCKET_LINK_EXPIRY_SECONDS", "604801", "an integer from 1 to 604800"),
        ("BUCKET_PART_SIZE_MB", "4", "an integer from 5 to 512"),
        ("OUTPUT_INLINE_LIMIT_BYTES", "lots", "not an integer"),
    ])
    def test_bad_value_names_variable_and_legal_values(self, name: str, value: str,
                                                       hint: str) -> None:
        with pytest.raises(SettingsError) as err:
            StorageSettings.from_env({**FULL, name: value})
        assert name in str(err.value) and hint in str(err.value)

    def test_secret_is_not_in_repr(self) -> None:
        assert FULL["BUCKET_SECRET_ACCESS_KEY"] not in repr(StorageSettings.from_env(FULL))

    @pytest.mark.parametrize("value", ["/", "a/../b", "outputs", "outputs/mine", "//"])
    def test_the_batch_url_prefix_is_a_folder_apart_from_the_answers(self, value: str) -> None:
        with pytest.raises(SettingsError, match="BATCH_URL_S3_PREFIX"):
            DownloadSettings.from_env({"BATCH_URL_S3_PREFIX": value})

    def test_the_batch_url_prefix_is_off_unless_set(self) -> None:
        assert DownloadSettings.from_env({}).s3_prefix is None
        assert DownloadSettings.from_env({"BATCH_URL_S3_PREFIX": "/inputs/"}).s3_prefix == \
            "inputs"
        assert DownloadSettings.from_env({"BATCH_URL_S3_PREFIX": "outputs",
                                          "BUCKET_PREFIX": "answers"}).s3_prefix == "outputs"

    def test_an_upload_has_a_total_time_limit(self) -> None:
        assert StorageSettings.from_env({}).upload_timeout_s == 300
        with pytest.raises(SettingsError, match="BUCKET_UPLOAD_TIMEOUT_SECONDS"):
            StorageSettings.from_env({"BUCKET_UPLOAD_TIMEOUT_SECONDS": "0"})

    def test_download_flag_must_be_boolean(self) -> None:
        with pytest.raises(SettingsError, match="DOWNLOAD_ALLOW_PRIVATE"):
            DownloadSettings.from_env({"DOWNLOAD_ALLOW_PRIVATE": "maybe"})
        assert DownloadSettings.from_env({}).allow_private is False
