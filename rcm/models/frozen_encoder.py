"""A frozen conditioning encoder (text or image) that lives on the CPU and visits a GPU to encode.

The umT5 text encoder and the CLIP image encoder are several GB each and run once per prompt or image,
so they are kept off the GPU between uses: ``with encoder.on("cuda"): ctx = encoder(inputs)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class FrozenEncoder:
    """Holds ``model`` in eval mode with no grad; subclasses define ``encode`` (also their ``__call__``)."""

    def __init__(self, model, *, offload_device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False)
        self.offload_device = torch.device(offload_device)

    def encode(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device):
        self.model.to(device)
        return self

    def offload(self):
        """Moves the weights to ``offload_device`` (CPU) and releases the cached GPU memory they held."""
        was_cuda = self.device.type == "cuda"
        self.model.to(self.offload_device)
        if was_cuda:
            torch.cuda.empty_cache()
        return self

    @contextmanager
    def on(self, device: str | torch.device) -> Iterator:
        """The weights are on ``device`` inside the block and offloaded after it (even on error)."""
        self.to(device)
        try:
            yield self
        finally:
            self.offload()
