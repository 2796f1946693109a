"""Fit a data set's images to what a model declares: its input shape (channels, size) and input range.

Ready-built models (a diffusers autoencoder, a pythae folder, a torch module) come with their own input
shape and range; the data set is adapted to them, the way torchvision's ``Resize`` + ``CenterCrop``
would: the shorter side is resized to the target's (bilinear, antialiased), the centre is cropped, grey
images are repeated to 3 channels (RGB to grey by the ITU-R 601 luma weights), and pixel values are
mapped affinely from the data set's range onto the model's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from robbench.inputrange import input_range, to_range


def resize_center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """x: (N, C, H, W) -> (N, C, *size): shorter side resized to fit, then the centre cropped."""
    th, tw = size
    h, w = x.shape[-2:]
    if (h, w) == (th, tw):
        return x
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[..., top:top + th, left:left + tw].contiguous()


def match_channels(x: Tensor, channels: int) -> Tensor:
    """(N, C, H, W) with C in {1, 3} -> (N, channels, H, W)."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.repeat(1, 3, 1, 1)
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    raise ValueError(f"cannot turn {c}-channel images into {channels}-channel ones")


def fit_images(x: Tensor, data_range: tuple[float, float], shape: tuple[int, ...],
               model_range: tuple[float, float]) -> Tensor:
    """Images x (N, *data_shape) in ``data_range`` -> (N, *shape) in ``model_range``.

    Image shapes (C, H, W) are resized/cropped and channel-matched; a flat model shape (D,) accepts any
    data of D values (flattened). Raises ValueError when the shapes cannot be matched.
    """
    if tuple(x.shape[1:]) != tuple(shape):
        if len(shape) == 3 and x.dim() == 4:
            x = resize_center_crop(match_channels(x, shape[0]), (shape[1], shape[2]))
        elif math.prod(x.shape[1:]) == math.prod(shape):
            x = x.reshape(x.shape[0], *shape)
        else:
            raise ValueError(f"the data's images are {tuple(x.shape[1:])} and the model expects "
                             f"{tuple(shape)}; robbench resizes (C, H, W) images only")
    return to_range(x, data_range, model_range)


def fit_to_model(x: Tensor, data_range: tuple[float, float], model: object) -> Tensor:
    """:func:`fit_images` to ``model.input_shape`` and the model's declared input range."""
    return fit_images(x, data_range, tuple(model.input_shape), input_range(model))


def fit_if_needed(x: Tensor, data_range: tuple[float, float] | None, model: object) -> Tensor:
    """x as ``model`` takes it: unchanged when ``data_range`` is None (already fitted) or when shape and
    range already match (models trained on the data); else :func:`fit_to_model`."""
    if data_range is None:
        return x
    if tuple(x.shape[1:]) == tuple(model.input_shape) and tuple(data_range) == input_range(model):
        return x
    return fit_to_model(x, tuple(data_range), model)
