"""Image grids for the demo and reports (PIL only): batches in [-1, 1] to labelled PNG panels.

Example:
    >>> img = image_grid(torch.zeros(8, 1, 28, 28), ncol=4)
    >>> img.size
    (117, 59)
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, ncol: int, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile images [N, C, H, W] in [-1, 1] into a grayscale/RGB PIL image, ``ncol`` per row, ``pad`` px apart."""
    n, c, h, w = images.shape
    nrow = (n + ncol - 1) // ncol
    canvas = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for k in range(n):
        r, q = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        canvas[:, top : top + h, left : left + w] = (images[k].float().clamp(-1, 1) + 1) / 2
    array = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if c == 1 else array)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def side_by_side(panels: dict[str, torch.Tensor], path: str | Path, ncol: int, scale: int = 2) -> Path:
    """Write one PNG with a titled grid per panel, left to right; returns the path."""
    grids = {title: image_grid(images, ncol, scale=scale).convert("RGB") for title, images in panels.items()}
    title_h, gap = 16, 8
    width = sum(g.width for g in grids.values()) + gap * (len(grids) + 1)
    height = max(g.height for g in grids.values()) + title_h + 2 * gap
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    x = gap
    for title, grid in grids.items():
        draw.text((x, gap // 2), title, fill="black")
        sheet.paste(grid, (x, gap + title_h))
        x += grid.width + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
