"""serving/media.py: structural limits on real image bytes, and the decode pool's job bounds.

Fast: no model. The attacks through the job wiring (a bomb beside a victim job, padding, the
output format's limits) are in tests/test_upscale.py::TestImageBombs.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
from PIL import Image

from serving.errors import InputError, JobTimeout
from serving.media import (
    DECODE_THREADS,
    ImageLimits,
    check_output_size,
    check_structure,
    decode_image,
    in_decode_pool,
    open_image,
)
from tests.support.images import (
    animation,
    iccp_bomb,
    image_bytes,
    jpeg_scan_bomb,
    jpeg_scans,
    png_chunk,
    png_chunks,
)

LIMITS = ImageLimits(max_pixels=1024 * 1024)


def refusal(raw: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(InputError) as err:
        check_structure(raw, limits, "input.batch.3.image")
    message = str(err.value)
    assert message.startswith("input.batch.3.image: "), message
    return message


def with_jpeg_segment(raw: bytes, marker: int, payload: bytes, copies: int = 1) -> bytes:
    """``raw`` with ``copies`` segments of ``marker`` right after its SOI."""
    segment = bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload
    return raw[:2] + segment * copies + raw[2:]


class TestEveryCommonImagePasses:
    @pytest.mark.parametrize("fmt, save", [
        ("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
        ("JPEG", {"progressive": True, "subsampling": 0}),
        ("JPEG", {"progressive": True, "restart_marker_blocks": 1}), ("WEBP", {}),
        ("WEBP", {"lossless": True})], ids=["png", "jpeg", "progressive", "progressive-444",
                                             "restart-markers", "webp", "webp-lossless"])
    def test_is_checked_and_decoded(self, fmt: str, save: dict[str, object]) -> None:
        raw = image_bytes(40, 30, fmt, **save)
        assert check_structure(raw, LIMITS) == fmt
        assert open_image(raw, LIMITS).size == (40, 30)

    def test_a_png_with_a_colour_profile_and_text_passes(self) -> None:
        out = io.BytesIO()
        Image.new("RGB", (8, 8)).save(out, "PNG", icc_profile=b"\x00" * 3000)
        raw = png_chunks([(b"tEXt", b"Comment\x00hello")] * 10, 8, 8)
        assert open_image(out.getvalue(), LIMITS).size == (8, 8)
        assert open_image(raw, LIMITS).size == (8, 8)

    @pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
    def test_an_animation_within_the_frame_limit_gives_its_first_frame(self, fmt: str) -> None:
        image = open_image(animation(5, fmt), LIMITS)
        assert image.size == (4, 4) and image.getpixel((0, 0)) == (0, 0, 7)


class TestJpegScans:
    def test_a_scan_bomb_is_refused_naming_the_field_before_pillow_reads_it(self) -> None:
        """Pins the decode-cost bomb: 3,000 repeated refinement scans, 2 s of decoding."""
        raw = jpeg_scan_bomb(extra_scans=3000)
        started = time.perf_counter()
        message = refusal(raw)
        assert "more than 48 scans" in message
        assert time.perf_counter() - started < 0.5     # the walk, not a decode

    def test_the_limit_is_exact(self) -> None:
        raw = image_bytes(16, 16, "JPEG", progressive=True)
        scans = len(jpeg_scans(raw))
        assert scans == 10                     # libjpeg's standard progressive script
        assert check_structure(raw, ImageLimits(1 << 20, max_jpeg_scans=scans)) == "JPEG"
        assert "more than 9 scans" in refusal(raw, ImageLimits(1 << 20, max_jpeg_scans=9))

    def test_scan_markers_inside_metadata_are_not_counted(self) -> None:
        """An EXIF thumbnail or a comment may hold 0xFFDA bytes: only real segments count."""
        raw = with_jpeg_segment(image_bytes(16, 16, "JPEG"), 0xFE, b"\xff\xda\x00\x08" * 2000)
        assert check_structure(raw, LIMITS) == "JPEG"
        assert open_image(raw, LIMITS).size == (16, 16)

    def test_too_many_segments_are_refused(self) -> None:
        raw = with_jpeg_segment(image_bytes(16, 16, "JPEG"), 0xFE, b"note", copies=300)
        assert "more than 256 header and metadata segments" in refusal(raw)

    def test_markers_without_a_length_count_as_segments(self) -> None:
        """Restart markers outside a scan: each is one more step of the walk, so each counts."""
        raw = image_bytes(16, 16, "JPEG")
        assert "segments" in refusal(raw[:2] + b"\xff\xd0" * 2_000_000 + raw[2:])

    def test_a_scan_of_fill_bytes_is_walked_in_linear_time(self) -> None:
        """A long run of 0xFF is where a backtracking marker search would go quadratic."""
        raw = image_bytes(16, 16, "JPEG")
        start, end = jpeg_scans(raw)[-1]
        header_end = start + 2 + int.from_bytes(raw[start + 2:start + 4], "big")
        hostile = raw[:header_end] + b"\xff" * 4_000_000 + b"\x00" + raw[end:]
        started = time.perf_counter()
        assert check_structure(hostile, LIMITS) == "JPEG"
        assert time.perf_counter() - started < 2


class TestPngChunks:
    def test_an_iccp_bomb_is_refused_before_pillow_inflates_it(self) -> None:
        """Pins the PNG of the same class: 1,000 profiles, 1 GB inflated at open."""
        assert "more than one colour profile" in refusal(iccp_bomb(1000))

    def test_the_ancillary_limit_is_exact(self) -> None:
        text = (b"tEXt", b"k\x00v")
        assert check_structure(png_chunks([text] * 64), LIMITS) == "PNG"
        assert "more than 64 metadata (ancillary) chunks" in refusal(png_chunks([text] * 65))

    def test_text_after_the_image_data_counts_too(self) -> None:
        raw = image_bytes(8, 8)
        iend = raw.rindex(b"IEND") - 4
        hostile = raw[:iend] + png_chunk(b"zTXt", b"k\x00\x00x") * 65 + raw[iend:]
        assert "ancillary" in refusal(hostile)

    def test_a_metadata_chunk_over_1_mib_is_refused(self) -> None:
        raw = png_chunks([(b"tEXt", b"k\x00" + b"v" * (1024 * 1024))])
        assert "metadata chunk of 1,048,578 bytes" in refusal(raw)

    def test_chunks_before_the_image_data_are_bounded(self) -> None:
        raw = png_chunks([(b"QQQQ", b"")] * 300)       # unknown critical chunks: Pillow skips
        assert "more than 256 chunks before its image data" in refusal(raw)

    def test_frames_past_the_limit_are_refused(self) -> None:
        assert "more than 4 frames" in refusal(animation(5, "PNG"),
                                               ImageLimits(1 << 20, max_frames=4))


class TestWebpChunks:
    def test_frames_past_the_limit_are_refused(self) -> None:
        assert "animated WebP of more than 4 frames" in refusal(
            animation(5, "WEBP"), ImageLimits(1 << 20, max_frames=4))

    def test_other_chunks_past_the_limit_are_refused(self) -> None:
        raw = image_bytes(8, 8, "WEBP")
        body = raw[12:] + b"XTRA\x02\x00\x00\x00ab" * 65
        hostile = b"RIFF" + (len(body) + 4).to_bytes(4, "little") + b"WEBP" + body
        assert "more than 64 chunks" in refusal(hostile)


class TestOutputLimits:
    @pytest.mark.parametrize("fmt, side", [("WEBP", 16_383), ("JPEG", 65_535)])
    def test_a_side_past_the_format_limit_is_refused_naming_the_field(self, fmt: str,
                                                                      side: int) -> None:
        check_output_size(side, 16, fmt, "input.output_format")
        with pytest.raises(InputError, match=r"^input\.output_format: .*choose png"):
            check_output_size(16, side + 1, fmt, "input.output_format")

    def test_png_holds_any_size_the_pixel_limit_allows(self) -> None:
        check_output_size(1 << 24, 16, "PNG", "input.output_format")


class TestDecodePool:
    def test_work_runs_in_the_decode_pool_not_the_default_executor(self) -> None:
        name = asyncio.run(in_decode_pool(lambda: threading.current_thread().name))
        assert name.startswith("decode")

    def test_work_of_a_cancelled_job_never_starts(self) -> None:
        """Queued work is dropped when its job ends: it cannot hold the pool after the job."""
        ran: list[str] = []

        async def scenario() -> None:
            release = threading.Event()
            blockers = [asyncio.ensure_future(in_decode_pool(release.wait))
                        for _ in range(DECODE_THREADS)]
            queued = asyncio.ensure_future(in_decode_pool(ran.append, "cancelled job"))
            await asyncio.sleep(0)             # let it reach the pool's queue
            queued.cancel()                    # the job ends while its work waits
            await asyncio.wait([queued])
            release.set()
            await asyncio.gather(*blockers)
            await in_decode_pool(ran.append, "next job")   # FIFO: after the dropped one
            assert queued.cancelled()

        asyncio.run(scenario())
        assert ran == ["next job"]

    def test_work_whose_deadline_passed_while_queued_is_a_timeout(self) -> None:
        ran: list[bool] = []
        with pytest.raises(JobTimeout, match="WORKER_JOB_TIMEOUT_S"):
            asyncio.run(in_decode_pool(ran.append, True, deadline=time.monotonic() - 1))
        assert ran == []

    def test_a_job_ending_mid_decode_stops_before_the_pixels(self) -> None:
        cancelled = threading.Event()

        def job_ends(width: int, height: int) -> None:   # after the header, before pixels
            cancelled.set()

        with pytest.raises(JobTimeout):
            asyncio.run(decode_image(image_bytes(8, 8), LIMITS, cancelled=cancelled,
                                     check=job_ends))
