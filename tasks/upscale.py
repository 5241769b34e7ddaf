"""The image super-resolution task: an image in, the same image at the model's scale out.

A complete example of a batched task whose output is a file. It serves Swin2SR models
(``Swin2SRForImageSuperResolution``, e.g. ``caidas/swin2SR-classical-sr-x2-64``). Images from
concurrent jobs share forward passes: ``predict_batch`` runs one pass per group of equally sized
images.

Input: ``image`` (an https:// or s3:// URL under the download rules, or a data:image/... URI;
PNG, JPEG or WebP, its structure and pixel count checked before decoding by
``serving/inputs.py``) and ``output_format`` ("png", "jpeg" or "webp"). Answer: ``{"image":
<file>, "width", "height", "model"}``, exactly the model's scale times the input's size; the
file is inline or a link as ``output_mode`` decides.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import AutoImageProcessor, AutoModelForImageToImage

from serving.errors import InputError
from serving.media import check_output_size, encode_image
from tasks.base import Image, Input, OutputFile, Task

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"),
           "webp": ("WEBP", "image/webp")}
BLANK = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAGUlEQVR42u3BMQEA"
         "AADCoPVP7WENoAAAAG4MIAABITLN7AAAAABJRU5ErkJggg==")      # a black 32x32 PNG


class UpscaleInput(Input):
    """The fields of an upscale job."""

    image: Image
    output_format: Literal["png", "jpeg", "webp"] = "png"


class UpscaleTask(Task):
    """Super-resolution jobs on a Swin2SR model, batched across concurrent jobs."""

    name = "upscale"
    input = UpscaleInput
    example = {"image": BLANK}
    pipeline_tasks = ("image-to-image",)      # Swin2SR: read from the config, exactly
    model_class = AutoModelForImageToImage
    max_batch_size = 256                   # as many as WORKER_MAX_BATCH_SIZE allows

    def setup(self) -> None:
        self.processor = AutoImageProcessor.from_pretrained(self.loaded.source.path)
        self.scale = int(getattr(self.model.config, "upscale", 1) or 1)
        self.dtype = next(self.model.parameters()).dtype

    def check(self, input: UpscaleInput, where: str) -> None:
        """Before the device: the size the model runs on (the processor pads each side to the
        next multiple of 8 above it, so a 1-pixel-wide image runs 8 wide) within the pixel
        limit, and the output within what the asked format can hold."""
        width, height = input.image.width, input.image.height
        padded_w, padded_h = self._padded(width), self._padded(height)
        limit = self.settings.max_image_pixels
        if padded_w * padded_h > limit:
            raise InputError(f"is {width}x{height}, which the model runs on padded to "
                             f"{padded_w}x{padded_h} ({padded_w * padded_h:,} pixels), over the "
                             f"limit of {limit:,} (WORKER_MAX_IMAGE_PIXELS)",
                             field=f"{where}.image")
        check_output_size(width * self.scale, height * self.scale,
                          FORMATS[input.output_format][0], f"{where}.output_format")

    def _padded(self, side: int) -> int:
        if not getattr(self.processor, "do_pad", True):
            return side
        divisor = int(getattr(self.processor, "size_divisor", None) or 8)
        return (side // divisor + 1) * divisor

    def predict_batch(self, inputs: list[UpscaleInput]) -> list[torch.Tensor]:
        """The upscaled pixels of each input: (H*scale, W*scale, 3) uint8 on the CPU."""
        pixels = [self.processor(i.image, return_tensors="pt")["pixel_values"][0] for i in inputs]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, p in enumerate(pixels):
            groups.setdefault(tuple(p.shape), []).append(index)
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
        for rows in groups.values():
            batch = torch.stack([pixels[r] for r in rows]).to(self.device, self.dtype)
            out = self.model(pixel_values=batch).reconstruction
            # [0, 1] floats to 8-bit channels-last, on the CPU, for Pillow.
            out = out.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1)
            out = out.cpu()
            for row, index in enumerate(rows):
                image = inputs[index].image       # the padding the processor added is cut off
                outputs[index] = out[row, :image.height * self.scale, :image.width * self.scale]
        return outputs

    def respond(self, output: torch.Tensor, input: UpscaleInput) -> dict[str, Any]:
        """The image encoded in the asked format (in a thread, off the device)."""
        pil_format, content_type = FORMATS[input.output_format]
        encoded = encode_image(output.numpy(), pil_format)
        return {"image": OutputFile(encoded, content_type,
                                    f"image.{input.output_format}"),
                "width": int(output.shape[1]), "height": int(output.shape[0])}
