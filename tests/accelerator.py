"""A stand-in for a tensor on an accelerator, so that the copy to the host is tested without a GPU."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GeneratorOnAccelerator", "OnAccelerator"]


class OnAccelerator:
    """A tensor on an accelerator as numpy sees it: neither ``.numpy()`` nor ``np.asarray`` reads it (as a
    CUDA tensor's raise); only ``.cpu()`` or ``.to("cpu")`` gives the tensor back on the host."""

    def __init__(self, t: torch.Tensor) -> None:
        self._t, self.dtype = t, t.dtype

    def detach(self) -> OnAccelerator:
        return self

    def to(self, device: Any) -> Any:
        return self._t if str(device) == "cpu" else self

    def cpu(self) -> torch.Tensor:
        return self._t

    def numpy(self) -> Any:
        raise TypeError("can't convert cuda:0 device type tensor to numpy")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("can't convert cuda:0 device type tensor to numpy")


class GeneratorOnAccelerator(torch.Generator):
    """A ``torch.Generator`` that reports itself on ``cuda:0``, as one made there does (without a GPU)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)
