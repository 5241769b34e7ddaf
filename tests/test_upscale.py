"""The upscale task: real PNG, JPEG and WebP bytes through a tiny random Swin2SR model.

In-process through ``Worker.handle`` (the job wiring RunPod's loop calls), with a real rclone
S3 server for links and a loopback HTTP server for image URLs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import statistics
import struct
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, Swin2SRForImageSuperResolution

from serving.worker import Worker
from tests.support.images import data_uri, iccp_bomb, image_bytes, jpeg_scan_bomb
from tests.support.worker import LoopThread, build_worker, collect

pytestmark = pytest.mark.slow


def answer(loop: Any, worker: Any, job_input: Any, job_id: str = "up") -> dict[str, Any]:
    (out,) = loop.run(collect(worker, job_input, job_id))
    return out


def decoded(file: dict[str, Any]) -> Image.Image:
    raw = base64.b64decode(file["data"])
    assert file["bytes"] == len(raw)
    assert file["sha256"] == hashlib.sha256(raw).hexdigest()
    return Image.open(io.BytesIO(raw))


def direct_upscale(model_dir: Path, raw: bytes) -> np.ndarray:
    """The same image through the model and processor called directly, cropped to scale x size."""
    model = Swin2SRForImageSuperResolution.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    with torch.inference_mode():
        out = model(**processor(image, return_tensors="pt")).reconstruction[0]
    scale = model.config.upscale
    out = out[:, :image.height * scale, :image.width * scale]
    return out.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def bomb_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    raw = bytearray(image_bytes(1, 1))
    ihdr = 8 + 8                                       # signature, then length + type
    raw[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(raw[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(raw)


class TestAnswers:
    def test_output_is_scale_times_the_input_and_equals_the_model_called_directly(
            self, loop, upscale_worker, swin2sr_dir):
        raw = image_bytes(17, 13)                      # not a multiple of the padding (8)
        out = answer(loop, upscale_worker, {"image": data_uri(raw)})
        assert (out["width"], out["height"]) == (34, 26)
        assert out["model"] == swin2sr_dir.name
        image = decoded(out["image"])
        assert out["image"]["content_type"] == "image/png" and image.format == "PNG"
        assert image.size == (34, 26)
        assert np.array_equal(np.asarray(image.convert("RGB")),
                              direct_upscale(swin2sr_dir, raw))

    @pytest.mark.parametrize("fmt, content_type, pil", [
        ("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"),
        ("webp", "image/webp", "WEBP")])
    def test_each_output_format_is_real_bytes_of_that_format(self, loop, upscale_worker, fmt,
                                                            content_type, pil):
        out = answer(loop, upscale_worker, {"image": data_uri(image_bytes(16, 16)),
                                            "output_format": fmt})
        assert out["image"]["content_type"] == content_type
        image = decoded(out["image"])
        assert image.format == pil and image.size == (32, 32)

    @pytest.mark.parametrize("fmt, kind", [("JPEG", "jpeg"), ("WEBP", "webp")])
    def test_jpeg_and_webp_inputs_are_read(self, loop, upscale_worker, fmt, kind):
        out = answer(loop, upscale_worker, {"image": data_uri(image_bytes(8, 8, fmt), kind)})
        assert (out["width"], out["height"]) == (16, 16)

    def test_image_url_is_fetched_through_the_safe_downloader(self, loop, upscale_worker,
                                                               tmp_path):
        import http.server
        import threading

        raw = image_bytes(10, 6)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/cat.png"
            out = answer(loop, upscale_worker, {"image": url})   # private allowed in this worker
        finally:
            server.shutdown()
        assert (out["width"], out["height"]) == (20, 12)

    def test_loopback_image_url_is_refused_by_default(self, loop, swin2sr_dir):
        strict = build_worker({"MODEL_PATH": str(swin2sr_dir), "MODEL_WARMUP": "false"})
        out = answer(loop, strict, {"image": "http://127.0.0.1:9/cat.png"})
        assert out["error_code"] == "download_failed"

    def test_concurrent_images_of_one_size_share_forward_passes(self, loop, upscale_worker):
        before = upscale_worker.task.batcher.batches_run

        async def four() -> list[list[dict[str, Any]]]:
            jobs = [collect(upscale_worker, {"image": data_uri(image_bytes(16, 16, seed=i))},
                            f"c{i}") for i in range(4)]
            return await asyncio.gather(*jobs)

        outs = loop.run(four())
        assert all(out[0]["width"] == 32 for out in outs)
        assert upscale_worker.task.batcher.batches_run - before < 4

    def test_a_batch_job_answers_each_image_in_order(self, loop, upscale_worker):
        batch = [{"image": data_uri(image_bytes(8 + i, 8))} for i in range(3)]
        out = answer(loop, upscale_worker, {"batch": batch})
        assert out["failed"] == 0
        assert [r["width"] for r in out["results"]] == [16, 18, 20]


class TestBadImages:
    @pytest.mark.parametrize("image, says", [
        (data_uri(b"this is not an image"), "is not a PNG, JPEG or WebP image"),
        (data_uri(image_bytes(64, 64)[:200]), "truncated or corrupt"),
        ("data:image/png;base64,***not base64***", "not valid base64"),
        (data_uri(image_bytes(8, 8, "GIF"), "gif"), "is not a PNG, JPEG or WebP image"),
        (data_uri(image_bytes(8, 8, "BMP"), "bmp"), "is not a PNG, JPEG or WebP image"),
        ("file:///etc/passwd", "must be an https:// or s3:// URL"),
        ("ftp://example.com/cat.png", "must be an https:// or s3:// URL"),
        # Decoding 5000x5000 would find the data missing ("truncated"): the header is checked
        # first. 100000x100000 is past Pillow's own bomb guard, which says the same.
        (data_uri(bomb_png(5000, 5000)), "is 5000x5000 (25,000,000 pixels), over the limit of "
                                         "1,048,576 (WORKER_MAX_IMAGE_PIXELS)"),
        (data_uri(bomb_png(100_000, 100_000)), "over the limit of 1,048,576 pixels "
                                               "(WORKER_MAX_IMAGE_PIXELS)"),
    ], ids=["not-an-image", "truncated", "bad-base64", "gif", "bmp", "file-scheme",
            "ftp-scheme", "bomb-header", "huge-bomb-header"])
    def test_fails_naming_input_image_and_the_worker_serves_the_next_job(
            self, loop, upscale_worker, image, says):
        out = answer(loop, upscale_worker, {"image": image})
        assert out["error_code"] == "invalid_input"
        assert out["error"].startswith("input.image")
        assert says in out["error"]
        after = answer(loop, upscale_worker, {"image": data_uri(image_bytes(8, 8))})
        assert after["width"] == 16

    def test_unknown_fields_and_stream_are_refused(self, loop, upscale_worker):
        out = answer(loop, upscale_worker, {"image": data_uri(image_bytes(8, 8)),
                                            "stream": True})
        assert out["error_code"] == "invalid_input" and "input.stream" in out["error"]


class TestDelivery:
    def test_auto_over_the_limit_stores_the_image_alone_with_its_content_type(
            self, loop, swin2sr_dir, s3_settings_env):
        worker = build_worker({"MODEL_PATH": str(swin2sr_dir), "MODEL_WARMUP": "false",
                               "OUTPUT_INLINE_LIMIT_BYTES": "2048", **s3_settings_env})
        raw = image_bytes(40, 30)
        out = answer(loop, worker, {"image": data_uri(raw)}, job_id="job-auto")
        link = out["image"]
        assert set(link) == {"url", "key", "bytes", "sha256", "content_type", "expires_at"}
        assert link["content_type"] == "image/png" and link["key"].endswith("job-auto/image.png")
        with urllib.request.urlopen(link["url"], timeout=10) as response:
            body = response.read()
            assert response.headers["Content-Type"] == "image/png"
        assert len(body) == link["bytes"] and hashlib.sha256(body).hexdigest() == link["sha256"]
        assert Image.open(io.BytesIO(body)).size == (80, 60)     # the PNG itself, not JSON
        assert (out["width"], out["height"]) == (80, 60)

    def test_auto_under_the_limit_is_inline_without_storage(self, loop, upscale_worker):
        out = answer(loop, upscale_worker, {"image": data_uri(image_bytes(8, 8)),
                                            "output_mode": "auto"})
        assert "data" in out["image"]

    def test_link_always_stores(self, loop, swin2sr_dir, s3_settings_env):
        worker = build_worker({"MODEL_PATH": str(swin2sr_dir), "MODEL_WARMUP": "false",
                               **s3_settings_env})
        out = answer(loop, worker, {"image": data_uri(image_bytes(8, 8)), "output_mode": "link",
                                    "output_format": "webp"}, job_id="job-link")
        assert out["image"]["content_type"] == "image/webp"
        assert out["image"]["key"].endswith("job-link/image.webp")

    def test_inline_never_stores_and_fails_clearly_when_too_large(self, loop, swin2sr_dir,
                                                                  s3_settings_env):
        worker = build_worker({"MODEL_PATH": str(swin2sr_dir), "MODEL_WARMUP": "false",
                               "OUTPUT_INLINE_LIMIT_BYTES": "2048", **s3_settings_env})
        out = answer(loop, worker, {"image": data_uri(image_bytes(40, 30)),
                                    "output_mode": "inline"})
        assert out["error_code"] == "payload_too_large"
        assert "input.output_mode" in out["error"] and "OUTPUT_INLINE_LIMIT_BYTES" in out["error"]

    def test_over_the_limit_without_storage_fails_naming_the_settings(self, loop, swin2sr_dir):
        worker = build_worker({"MODEL_PATH": str(swin2sr_dir), "MODEL_WARMUP": "false",
                               "OUTPUT_INLINE_LIMIT_BYTES": "2048"})
        out = answer(loop, worker, {"image": data_uri(image_bytes(40, 30))})
        assert out["error_code"] == "payload_too_large" and "BUCKET_ENDPOINT_URL" in out["error"]

    def test_batch_items_get_their_own_objects(self, loop, swin2sr_dir, s3_settings_env):
        worker = build_worker({"MODEL_PATH": str(swin2sr_dir), "MODEL_WARMUP": "false",
                               **s3_settings_env})
        batch = [{"image": data_uri(image_bytes(8, 8, seed=i))} for i in range(2)]
        out = answer(loop, worker, {"batch": batch, "output_mode": "link"}, job_id="job-batch")
        keys = [r["image"]["key"] for r in out["results"]]
        assert keys[0].endswith("job-batch/0-image.png")
        assert keys[1].endswith("job-batch/1-image.png")
        assert out["results"][0]["image"]["sha256"] != out["results"][1]["image"]["sha256"]


class TestImageBombs:
    """Images that cost far more than their size, refused before the model or the decoder."""

    def test_jpeg_scan_bombs_are_refused_and_a_concurrent_job_is_not_delayed(
            self, loop, upscale_worker):
        """Pins the decode-cost bomb: a batch of 8 held every image thread for seconds."""
        victim = {"image": data_uri(image_bytes(96, 64, seed=3))}
        bomb = data_uri(jpeg_scan_bomb(extra_scans=1500), "jpeg")    # ~1 s each to decode
        bombs = {"batch": [{"image": bomb} for _ in range(8)]}

        async def timed(job_input: dict[str, Any], job_id: str) -> tuple[dict[str, Any], float]:
            started = time.perf_counter()
            (out,) = await collect(upscale_worker, job_input, job_id)
            return out, time.perf_counter() - started

        async def together() -> tuple[dict[str, Any], tuple[dict[str, Any], float]]:
            attack = asyncio.ensure_future(timed(bombs, "bombs"))
            hit = await timed(victim, "victim")
            return (await attack)[0], hit

        answer(loop, upscale_worker, victim)                       # warm, not measured
        # One job's time on a shared machine is noisy: medians of five, alone and beside the
        # attack in turn, so both see the same background load.
        alone, beside = [], []
        for i in range(5):
            alone.append(loop.run(timed(victim, f"alone-{i}"))[1])
            refused, (out, seconds) = loop.run(together())
            assert out["width"] == 192, out
            assert refused["failed"] == 8
            for index, result in enumerate(refused["results"]):
                assert result["error_code"] == "invalid_input"
                assert result["error"].startswith(
                    f"input.batch.{index}.image: is a JPEG of more than 48 scans")
            beside.append(seconds)
        alone_s, beside_s = statistics.median(alone), statistics.median(beside)
        # 1.5x, plus 0.25 s for a loaded machine's scheduling: the bombs cost seconds each.
        assert beside_s <= 1.5 * alone_s + 0.25, (
            f"the victim took {beside_s:.2f}s, {alone_s:.2f}s alone")

    def test_a_png_of_a_thousand_colour_profiles_is_refused_at_once(self, loop,
                                                                    upscale_worker):
        """Pins the PNG of the same class: Pillow inflated 1 GB of profiles at open."""
        out = answer(loop, upscale_worker, {"image": data_uri(iccp_bomb(1000))})
        assert out["error_code"] == "invalid_input"
        assert out["error"].startswith("input.image: is a PNG with more than one colour profile")


@pytest.fixture(scope="module")
def small_worker(swin2sr_dir: Path) -> Worker:
    """The tiny model with a limit of 4,096 pixels (64x64 as the processor pads it)."""
    return build_worker({"MODEL_PATH": str(swin2sr_dir), "MODEL_WARMUP": "false",
                         "WORKER_MAX_IMAGE_PIXELS": "4096"})


class TestSizeLimits:
    def test_the_padded_size_counts_against_the_pixel_limit(self, loop: LoopThread,
                                                            small_worker: Worker) -> None:
        """Pins the padding finding: a 1x3000 image ran at 8x3008, 8 times the limit."""
        before = small_worker.task.batcher.batches_run
        out = answer(loop, small_worker, {"image": data_uri(image_bytes(1, 3000))})
        assert out["error_code"] == "invalid_input"
        assert out["error"] == ("input.image: is 1x3000, which the model runs on padded to "
                                "8x3008 (24,064 pixels), over the limit of 4,096 "
                                "(WORKER_MAX_IMAGE_PIXELS)")
        assert small_worker.task.batcher.batches_run == before

    def test_an_image_padded_to_exactly_the_limit_runs(self, loop: LoopThread,
                                                       small_worker: Worker) -> None:
        out = answer(loop, small_worker, {"image": data_uri(image_bytes(56, 56))})  # 64x64
        assert (out["width"], out["height"]) == (112, 112)
        out = answer(loop, small_worker, {"image": data_uri(image_bytes(64, 56))})  # 72x64
        assert out["error_code"] == "invalid_input" and "72x64" in out["error"]

    @pytest.mark.parametrize("fmt, width, side", [("webp", 8200, "16,383"),
                                                  ("jpeg", 32_768, "65,535")])
    def test_an_output_too_large_for_its_format_is_refused_before_the_model_runs(
            self, loop, upscale_worker, fmt, width, side):
        """Pins the output-size finding: this failed as 'internal' after the forward pass."""
        before = upscale_worker.task.batcher.batches_run
        out = answer(loop, upscale_worker, {"image": data_uri(image_bytes(width, 4)),
                                            "output_format": fmt})
        assert out["error_code"] == "invalid_input", out
        assert out["error"] == (f"input.output_format: the output would be {width * 2}x8, and "
                                f"{fmt} images are at most {side} pixels a side; choose png, or "
                                "send a smaller image")
        assert upscale_worker.task.batcher.batches_run == before
