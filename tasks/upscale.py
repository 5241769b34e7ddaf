"""The image super-resolution task: an image in, the same image at the model's scale out.

A complete example of a task whose output is a file. It owns the job contract for
``Swin2SRForImageSuperResolution`` models (any checkpoint, such as
``caidas/swin2SR-classical-sr-x2-64``): recognising them, loading the model and its image
processor, decoding and checking images, and encoding the result. Images of the same size
from concurrent jobs share forward passes through ``batcher.py`` on the one device thread.

Input (``job["input"]``)::

    image            an https:// or s3:// URL (fetched under the download rules: public
                     addresses only, size and time limits), or a data:image/...;base64, URI
    output_format    "png" (default), "jpeg" or "webp"

PNG, JPEG and WebP images are accepted (the first frame of an animated one), under the limits of
``serving/media.py``: the file's structure (JPEG scans, PNG chunks, frames) is checked first,
then the size the model will run on (the image as the processor pads it) against
WORKER_MAX_IMAGE_PIXELS, and the output size against ``output_format``'s limits, all before
any pixel is decoded; so a small file that claims a huge image (a decompression bomb) or costs
minutes to decode is refused at once. Decoding, preparing and encoding run in media.py's decode
pool under the job's deadline.

Answer: ``{"image": <file>, "width", "height", "model"}``: the output is exactly the model's
scale times the input's size (the padding the processor adds is cut off again). ``<file>`` is
``{"data": <base64>, "bytes", "sha256", "content_type"}`` when the answer fits inline, else the
link object of the image stored as its own object (``image/png``, ...); ``output_mode`` decides
as for every task.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import transformers
from PIL import Image
from pydantic import field_validator
from transformers import AutoImageProcessor

from model_loader import LoadedModel, ModelFiles, place_model
from serving.batcher import Batcher
from serving.config import ModelSettings, WorkerSettings
from serving.errors import InputError, JobTimeout
from serving.media import ImageLimits, check_output_size, decode_image, encode_image, in_decode_pool
from serving.validation import StrictInput, parse_input
from tasks.base import JobContext, Task

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"),
           "webp": ("WEBP", "image/webp")}
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)
# A compressed image is smaller than its pixels; a file larger than this for the pixel limit
# is refused before it is read whole (4 bytes a pixel, plus room for metadata).
_BYTES_PER_PIXEL = 4
_HEADER_ROOM = 1024 * 1024


class UpscaleInput(StrictInput):
    """The fields of an upscale job."""

    image: str
    output_format: Literal["png", "jpeg", "webp"] = "png"

    @field_validator("image")
    @classmethod
    def _url_or_data_uri(cls, value: str) -> str:
        lowered = value[:16].lower()
        if not (lowered.startswith(("https://", "http://", "s3://"))
                or _DATA_URI.match(value[:64])):
            raise ValueError("must be an https:// or s3:// URL, or a "
                             "data:image/<type>;base64,<data> URI")
        return value


@dataclass(frozen=True)
class UpscaleRequest:
    image: str
    output_format: str
    stream: bool = False                 # images are answered whole


@dataclass(eq=False)
class UpscaleItem:
    """One image while it waits for and goes through a forward pass."""

    pixels: torch.Tensor                 # (3, H', W') float, padded by the processor
    height: int                          # the input's own size, before padding
    width: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    output: torch.Tensor | None = None   # (H*scale, W*scale, 3) uint8 on the CPU
    on_done: Callable[[], None] | None = None   # set by the batcher

    def reset_for_retry(self) -> bool:
        self.output = None
        return True


class UpscaleEngine:
    """Runs a batch of images: one forward pass per group of equally sized inputs."""

    def __init__(self, loaded: LoadedModel, scale: int) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = next(loaded.model.parameters()).dtype
        self.scale = scale

    def run(self, items: list[UpscaleItem]) -> None:
        groups: dict[tuple[int, ...], list[UpscaleItem]] = {}
        for item in items:
            if not item.cancelled.is_set():
                groups.setdefault(tuple(item.pixels.shape), []).append(item)
        for group in groups.values():
            batch = torch.stack([i.pixels for i in group]).to(self.device, self.dtype)
            with torch.inference_mode():
                out = self.model(pixel_values=batch).reconstruction
                # [0, 1] floats to 8-bit channels-last, on the CPU, for Pillow.
                out = out.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)
                out = out.permute(0, 2, 3, 1).cpu()
            for row, item in enumerate(group):
                item.output = out[row, :item.height * self.scale, :item.width * self.scale]


class UpscaleTask(Task):
    """Super-resolution jobs on a Swin2SR model, batched across concurrent jobs."""

    name = "upscale"
    pipeline_tasks = ("image-to-image",)      # super-resolution: Swin2SR
    example_input = {"image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLb"
                              "SncAAAAFUlEQVR42mM8UaHBgA0wMeAAg1MCAB4nAXgllso1AAAAAElFTkSuQmCC"}

    @classmethod
    def load(cls, model: ModelFiles, settings: ModelSettings) -> LoadedModel:
        loaded = place_model(model, settings, transformers.AutoModelForImageToImage)
        loaded.processor = AutoImageProcessor.from_pretrained(model.path)
        return loaded

    def __init__(self, loaded: LoadedModel, settings: WorkerSettings) -> None:
        super().__init__(loaded, settings)
        self.processor = loaded.processor
        self.scale = int(getattr(loaded.model.config, "upscale", 1) or 1)
        self.batcher = Batcher(UpscaleEngine(loaded, self.scale), settings.max_batch_size,
                               settings.batch_wait_ms)

    def warm_up(self) -> None:
        """One forward pass on a small blank image."""
        item = self._prepare(Image.new("RGB", (32, 32)))
        self.batcher.engine.run([item])

    @property
    def device_fault(self) -> str | None:
        return self.batcher.device_fault

    # ------------------------------------------------------------------------------------------
    def parse(self, job_input: dict[str, Any], where: str = "input") -> UpscaleRequest:
        data = parse_input(UpscaleInput, job_input, {"limits": self.settings}, prefix=where)
        return UpscaleRequest(data.image, data.output_format)

    async def answer(self, request: UpscaleRequest, job: JobContext) -> dict[str, Any]:
        field_name = "input.image"
        max_pixels = self.settings.max_image_pixels
        max_bytes = max_pixels * _BYTES_PER_PIXEL + _HEADER_ROOM
        pil_format, content_type = FORMATS[request.output_format]
        if request.image.startswith("data:"):
            raw = _decode_data_uri(request.image, field_name, max_bytes)
        else:
            raw = await job.download(request.image, field=field_name, max_bytes=max_bytes)

        def check(width: int, height: int) -> None:   # before any pixel is decoded
            self._check_size(width, height, pil_format, field_name)

        # Image work runs in media.py's decode pool, dropped once the job has ended.
        image = await decode_image(raw, ImageLimits(max_pixels), field=field_name, check=check,
                                   deadline=job.deadline, cancelled=job.cancelled)
        item = await in_decode_pool(self._prepare, image, deadline=job.deadline,
                                    cancelled=job.cancelled)
        try:
            await asyncio.wait_for(self.batcher.submit(item), max(0.0, job.remaining_s()))
        except TimeoutError:
            raise JobTimeout(f"the job ran past {job.timeout_s:g}s (WORKER_JOB_TIMEOUT_S); "
                             "send a smaller image") from None
        assert item.output is not None
        encoded = await in_decode_pool(encode_image, item.output.numpy(), pil_format,
                                       deadline=job.deadline, cancelled=job.cancelled)
        height, width = int(item.output.shape[0]), int(item.output.shape[1])
        return {"image": job.store(encoded, content_type, f"image.{request.output_format}"),
                "width": width, "height": height, "model": self.loaded.served_name}

    def _check_size(self, width: int, height: int, pil_format: str, field_name: str) -> None:
        """The size the model runs on (as the processor pads it) within the pixel limit, and
        the output within what ``pil_format`` can hold: known before the forward pass."""
        max_pixels = self.settings.max_image_pixels
        padded_w, padded_h = self._padded(width), self._padded(height)
        if padded_w * padded_h > max_pixels:
            raise InputError(f"is {width}x{height}, which the model runs on padded to "
                             f"{padded_w}x{padded_h} ({padded_w * padded_h:,} pixels), over the "
                             f"limit of {max_pixels:,} (WORKER_MAX_IMAGE_PIXELS)",
                             field=field_name)
        check_output_size(width * self.scale, height * self.scale, pil_format,
                          "input.output_format")

    def _padded(self, side: int) -> int:
        """``side`` after the processor's padding: Swin2SR's always grows a side to the next
        multiple of its ``size_divisor`` above it (8 -> 16), so a 1-pixel-wide image runs 8
        wide."""
        if not getattr(self.processor, "do_pad", True):
            return side
        divisor = int(getattr(self.processor, "size_divisor", None) or 8)
        return (side // divisor + 1) * divisor

    def _prepare(self, image: Image.Image) -> UpscaleItem:
        pixels = self.processor(image, return_tensors="pt")["pixel_values"][0]
        return UpscaleItem(pixels, height=image.height, width=image.width)


# ----------------------------------------------------------------------------------------------
# data: URIs
# ----------------------------------------------------------------------------------------------
def _decode_data_uri(uri: str, field_name: str, max_bytes: int) -> bytes:
    head = _DATA_URI.match(uri)
    assert head is not None             # the input model checked the prefix
    payload = uri[head.end():]
    if len(payload) > 4 * (max_bytes // 3) + 4:
        raise InputError(f"holds more than {max_bytes:,} bytes of image data",
                         field=field_name)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("is not valid base64 after 'data:image/...;base64,'",
                         field=field_name) from None
