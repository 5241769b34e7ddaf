"""The device thread and what a device failure means: the one place torch work is scheduled.

Owns the single thread every computation on the model runs on (loading, warm-up, every batch)
and the classification of failures raised there: out of memory (the job fails, the worker serves
on) or a fault that leaves the device unusable (the worker asks to be replaced). Never imports
runpod or boto3.
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import torch

# Every computation on the model runs on this one thread: loading, warm-up, every batch. Each
# thread that calls torch gets its own OpenMP pool, and two pools on the same cores slow each
# other down for good (measured on 2 cores: an 8-row decode took 5.6 s instead of 4.6 s once
# a second thread had run torch). One exception: the compiled decode step compiles in a thread of
# its own (serving/graphs.py, SwitchingEngine), so that no job waits for it; what it leaves to
# the device (capturing CUDA graphs, the check against eager) runs here, between two steps.
DEVICE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the device (or host allocator) running out of memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def is_device_fault(exc: BaseException) -> bool:
    """True for a CUDA error that leaves the device unusable for every later job."""
    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(marker in text for marker in (
        "CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS",
        "cuDNN error", "NCCL error"))


def check_device(device: torch.device) -> None:
    """A tiny computation on ``device`` (on the device thread); raises if it is unusable."""
    DEVICE_THREAD.submit(_check_device, device).result()


def _check_device(device: torch.device) -> None:
    x = torch.ones((8, 8), device=device)
    if float((x @ x).sum().item()) != 512.0:
        raise RuntimeError(f"the device {device} computed a wrong result")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory() -> None:
    """Give cached blocks back after a failure, so the next job starts from a clean pool."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
