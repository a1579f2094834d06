"""fast-reid's transforms with two steps of the original Keras code swapped in on request.

`INPUT.RESIZE_IMPL "cv2_bilinear"` replaces fast-reid's PIL bicubic resize (antialiased) by the
original's OpenCV INTER_LINEAR resize (half-pixel centres, no antialiasing), train and test;
`INPUT.REA.IMPL "keras"` replaces torchvision's random erasing by the original's (area 0.02-0.4,
aspect ratio uniform in [0.3, 1/0.3], up to 100 attempts, CIFAR-mean fill). Everything else, and the
order of the steps, stays fast-reid's: it erases last, on the 0-255 RGB tensor after flip and
pad + crop, which is where the original erases its uint8 RGB image too.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from fastreid.config import CfgNode
from fastreid.data.transforms import build_transforms as build_fastreid_transforms
from PIL import Image

RESIZE_IMPLS = ("pil_bicubic", "cv2_bilinear")
ERASING_IMPLS = ("fastreid", "keras")
# The original fills with the CIFAR mean x 255 written into a uint8 image, which truncates it.
KERAS_ERASING_FILL = tuple(float(int(np.float32(c) * 255)) for c in (0.4914, 0.4822, 0.4465))


def resize_bilinear_half_pixel(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR on a uint8 H x W (x C) image: bilinear with half-pixel centres
    (source = (dest + 0.5) * scale - 0.5, clamped to the border), no antialiasing, rounded to
    uint8. OpenCV itself uses 11-bit fixed-point weights, so it can differ by 1 grey level."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"resize expects a uint8 H x W or H x W x C image, got {image.dtype} "
                         f"with shape {image.shape}")
    planes = torch.tensor(image, dtype=torch.float32)  # a copy: PIL's arrays are read-only
    planes = planes.unsqueeze(-1) if image.ndim == 2 else planes
    resized = F.interpolate(planes.permute(2, 0, 1).unsqueeze(0), size=(height, width),
                            mode="bilinear", align_corners=False, antialias=False)
    out = resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out[..., 0] if image.ndim == 2 else out


class CV2BilinearResize:
    """Resize a PIL image straight to (height, width) as the original's cv2.resize did."""

    def __init__(self, size: Sequence[int] | int):
        size = [size] if isinstance(size, int) else list(size)
        if len(size) != 2:
            raise ValueError(f"INPUT.RESIZE_IMPL cv2_bilinear needs INPUT.SIZE_TRAIN / SIZE_TEST "
                             f"as [height, width], got {size}")
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        resized = resize_bilinear_half_pixel(np.asarray(image), *self.size)
        return Image.fromarray(resized)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class KerasRandomErasing:
    """The original Keras code's random erasing (Zhong et al.), on a C x H x W tensor.

    With probability `prob`: up to `max_attempts` times draw an area fraction uniform in `area`
    and an aspect ratio (height / width) uniform in [min_aspect, 1 / min_aspect]; the first
    rectangle (sides rounded) strictly smaller than the image is filled with `fill` (one value
    per channel, the tensor's scale: fast-reid's is 0-255). Random numbers come from torch's
    generator, so DataLoader workers get their own streams. Returns a new tensor."""

    def __init__(self, prob: float = 0.5, area: Tuple[float, float] = (0.02, 0.4),
                 min_aspect: float = 0.3, max_attempts: int = 100,
                 fill: Sequence[float] = KERAS_ERASING_FILL):
        if not 0 <= prob <= 1:
            raise ValueError(f"INPUT.REA.PROB must be in [0, 1], got {prob}")
        self.prob, self.area, self.min_aspect = prob, area, min_aspect
        self.max_attempts, self.fill = max_attempts, tuple(fill)

    def sample_box(self, height: int, width: int) -> Optional[Tuple[int, int, int, int]]:
        """(top, left, box height, box width) of the rectangle to erase, or None if every attempt
        was too large for the image."""
        low, high = self.area
        for _ in range(self.max_attempts):
            u_area, u_aspect = torch.rand(2, dtype=torch.float64).tolist()
            target_area = (low + (high - low) * u_area) * height * width
            aspect = self.min_aspect + (1 / self.min_aspect - self.min_aspect) * u_aspect
            box_height = round(math.sqrt(target_area * aspect))
            box_width = round(math.sqrt(target_area / aspect))
            if box_height < height and box_width < width:
                # numpy's randint(0, n) as in the original: the upper bound is excluded
                top = int(torch.randint(0, height - box_height, (1,)))
                left = int(torch.randint(0, width - box_width, (1,)))
                return top, left, box_height, box_width
        return None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(1)) >= self.prob:
            return image
        box = self.sample_box(image.shape[-2], image.shape[-1])
        if box is None:
            return image
        top, left, box_height, box_width = box
        erased = image.clone()
        fill = torch.tensor(self.fill, dtype=image.dtype).view(-1, 1, 1)
        erased[..., top:top + box_height, left:left + box_width] = fill
        return erased

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(prob={self.prob}, area={self.area}, "
                f"min_aspect={self.min_aspect}, max_attempts={self.max_attempts}, fill={self.fill})")


def check_transform_keys(cfg: CfgNode) -> None:
    """Refuse an unknown INPUT.RESIZE_IMPL or INPUT.REA.IMPL before anything is built."""
    if cfg.INPUT.RESIZE_IMPL not in RESIZE_IMPLS:
        raise ValueError(f"INPUT.RESIZE_IMPL must be one of {RESIZE_IMPLS}, got "
                         f"'{cfg.INPUT.RESIZE_IMPL}'")
    if cfg.INPUT.REA.IMPL not in ERASING_IMPLS:
        raise ValueError(f"INPUT.REA.IMPL must be one of {ERASING_IMPLS}, got '{cfg.INPUT.REA.IMPL}'")


def build_transforms(cfg: CfgNode, is_train: bool = True) -> T.Compose:
    """fast-reid's train or test transforms, with the resize and the random erasing swapped for
    the original Keras code's when INPUT.RESIZE_IMPL / INPUT.REA.IMPL select them."""
    check_transform_keys(cfg)
    steps = []
    for step in build_fastreid_transforms(cfg, is_train=is_train).transforms:
        if type(step) is T.Resize and cfg.INPUT.RESIZE_IMPL == "cv2_bilinear":
            step = CV2BilinearResize(step.size)
        elif type(step) is T.RandomErasing and cfg.INPUT.REA.IMPL == "keras":
            step = KerasRandomErasing(prob=step.p)
        steps.append(step)
    return T.Compose(steps)
