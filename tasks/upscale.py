"""The image super-resolution task: an image in, the same image at the model's scale out.

A complete example of a batched task whose output is a file. It serves
``Swin2SRForImageSuperResolution`` models (any checkpoint, such as
``caidas/swin2SR-classical-sr-x2-64``). Images from concurrent jobs share forward passes:
``predict_batch`` runs one pass per group of equally sized images.

Input (``job["input"]``)::

    image            an https:// or s3:// URL (fetched under the download rules: public
                     addresses only, size and time limits), or a data:image/...;base64, URI
    output_format    "png" (default), "jpeg" or "webp"

PNG, JPEG and WebP images are accepted (the first frame of an animated one). The pixel count is
read from the image header and checked against WORKER_MAX_IMAGE_PIXELS before any pixel is
decoded, so a small file that claims a huge image (a decompression bomb) costs nothing
(``serving/inputs.py`` fetches and decodes every ``Image`` field).

Answer: ``{"image": <file>, "width", "height", "model"}``: the output is exactly the model's
scale times the input's size (the padding the processor adds is cut off again). ``<file>`` is
``{"data": <base64>, "bytes", "sha256", "content_type"}`` when the answer fits inline, else the
link object of the image stored as its own object (``image/png``, ...); ``output_mode`` decides
as for every task.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import PIL.Image
import torch
from transformers import AutoImageProcessor, AutoModelForImageToImage

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
    architectures = ("ForImageSuperResolution",)
    model_class = AutoModelForImageToImage
    max_batch_size = 256                   # as many as WORKER_MAX_BATCH_SIZE allows

    def setup(self) -> None:
        self.processor = AutoImageProcessor.from_pretrained(self.loaded.source.path)
        self.scale = int(getattr(self.model.config, "upscale", 1) or 1)
        self.dtype = next(self.model.parameters()).dtype

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
        encoded = io.BytesIO()
        PIL.Image.fromarray(output.numpy()).save(encoded, format=pil_format)
        return {"image": OutputFile(encoded.getvalue(), content_type,
                                    f"image.{input.output_format}"),
                "width": int(output.shape[1]), "height": int(output.shape[0])}
