"""Training augmentation recipes by name, as batched tensor ops on uint8 (N, C, H, W) images.

A recipe takes a batch and a generator and returns the augmented batch, uint8 or float32 on the
same 0..255 scale (the loader divides by 255 and normalises). Every random number comes from
the generator, so an epoch's augmentation follows from the seed. The recipes are the papers':

- ``cifar``: zero-pad by 1/8 of the side (4 px at 32) and random crop, horizontal flip.
- ``domainbed``: random-resized crop (scale 0.7-1, DomainBed's), horizontal flip, colour
  jitter 0.4 (brightness, contrast, saturation; DomainBed itself uses 0.3 plus hue and random
  greyscale).
- ``flowers``: random rotation (+-30 degrees), random-resized crop (scale 0.08-1, torchvision's
  default), horizontal and vertical flips.
- ``none``: the images as they are.

Evaluation never augments: the images were resized and centre-cropped once, when decoded.
A new recipe is a function registered with `register_recipe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from depthcut.errors import ConfigError

Recipe = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
_RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str) -> Callable[[Recipe], Recipe]:
    def add(recipe: Recipe) -> Recipe:
        if name in _RECIPES:
            raise ValueError(f"augmentation recipe {name!r} is registered twice")
        _RECIPES[name] = recipe
        return recipe
    return add


def recipe_names() -> tuple[str, ...]:
    return tuple(_RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe `name`; ConfigError naming the known ones when there is none."""
    try:
        return _RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown augmentation {name!r}; choose from "
                          f"{', '.join(recipe_names())}") from None


def augment(
    images: torch.Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random crop (from the zero-padded image) and horizontal flip, vectorised.

    Offsets are uniform in [0, 2 * padding] per sample and axis; each sample is flipped with
    probability 0.5. Everything is one gather with advanced indexing, so it costs the same on GPU
    as a copy. Random numbers come from `generator` (on its device), or the global RNG of the
    images' device. With padding 0 and no flip the input itself is returned.
    """
    if images.dim() != 4:
        raise ConfigError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if padding < 0:
        raise ConfigError(f"padding must be >= 0, got {padding}")
    if padding == 0 and not flip:
        return images
    n, c, h, w = images.shape
    device = images.device
    rng_device = generator.device if generator is not None else device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    source = images
    if padding > 0:
        size = (n,)
        dy = torch.randint(0, 2 * padding + 1, size, generator=generator, device=rng_device)
        dx = torch.randint(0, 2 * padding + 1, size, generator=generator, device=rng_device)
        rows = rows + dy.to(device)[:, None]
        cols = cols + dx.to(device)[:, None]
        source = F.pad(images, (padding, padding, padding, padding))
    if flip:
        flipped = torch.randint(0, 2, (n,), generator=generator, device=rng_device).bool()
        cols = torch.where(flipped.to(device)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return source[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    rng_device = generator.device if generator is not None else device
    values = torch.rand(n, generator=generator, device=rng_device).to(device)
    return low + (high - low) * values


def _coin(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """+1 or -1 per sample, with probability 0.5 each (a flip's sign)."""
    return torch.where(_uniform(n, 0, 1, generator, device) < 0.5, -1.0, 1.0)


def resized_crop_and_turn(
    images: torch.Tensor, generator: torch.Generator | None, *, scale: tuple[float, float],
    max_degrees: float = 0.0, vertical_flip: bool = False,
) -> torch.Tensor:
    """Random-resized crop (area fraction in `scale`, aspect ratio 3/4-4/3, as torchvision's),
    rotation up to `max_degrees`, horizontal (and vertical) flips: one affine grid sample per
    batch, bilinear, zeros outside the image. Returns float32 on the 0..255 scale."""
    n, _, h, w = images.shape
    device = images.device
    area = _uniform(n, *scale, generator, device)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), generator, device)
    ratio = torch.exp(log_ratio)
    crop_w = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the side
    crop_h = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = _uniform(n, -1, 1, generator, device) * (1 - crop_w)
    centre_y = _uniform(n, -1, 1, generator, device) * (1 - crop_h)
    angle = _uniform(n, -max_degrees, max_degrees, generator, device) * (math.pi / 180)
    flip_x = _coin(n, generator, device)
    flip_y = _coin(n, generator, device) if vertical_flip else torch.ones(n, device=device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([crop_w * cos * flip_x, -crop_h * sin * flip_y, centre_x], dim=1),
        torch.stack([crop_w * sin * flip_x, crop_h * cos * flip_y, centre_y], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [n, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def colour_jitter(images: torch.Tensor, strength: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s] per image
    (in that order); float32 on the 0..255 scale. One-channel images skip saturation."""
    n = images.shape[0]
    device = images.device
    x = images.float()
    factors = [_uniform(n, 1 - strength, 1 + strength, generator, device).view(n, 1, 1, 1)
               for _ in range(3)]
    x = (x * factors[0]).clamp_(0, 255)
    grey = _luminance(x)
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factors[1] + mean).clamp_(0, 255)
    if x.shape[1] == 3:
        grey = _luminance(x)
        x = ((x - grey) * factors[2] + grey).clamp_(0, 255)
    return x


def _luminance(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


@register_recipe("cifar")
def cifar_recipe(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return augment(images, max(1, round(images.shape[-1] / 8)), True, generator=generator)


@register_recipe("domainbed")
def domainbed_recipe(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    cropped = resized_crop_and_turn(images, generator, scale=(0.7, 1.0))
    return colour_jitter(cropped, 0.4, generator)


@register_recipe("flowers")
def flowers_recipe(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return resized_crop_and_turn(images, generator, scale=(0.08, 1.0), max_degrees=30.0,
                                 vertical_flip=True)


@register_recipe("none")
def no_recipe(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return images
