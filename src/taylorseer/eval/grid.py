"""Image grids for the demo and reports (PIL only): batches in [-1, 1] to labelled PNG panels.

Example:
    >>> img = image_grid(torch.zeros(8, 1, 28, 28), ncol=4)
    >>> img.size
    (117, 59)
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


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
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) if scale > 1 else image


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (scalable with FreeType, else the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _two_line_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """The narrowest width (px) at which ``text`` fits on two lines: its explicit lines, else the best word split."""
    if "\n" in text:
        return max(_text_width(draw, line, font) for line in text.split("\n"))
    words = text.split()
    if len(words) < 2:
        return _text_width(draw, text, font)
    return min(max(_text_width(draw, " ".join(words[:k]), font), _text_width(draw, " ".join(words[k:]), font))
               for k in range(1, len(words)))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
          width: int) -> list[str]:
    """``text`` broken at its newlines and, greedily between words, wherever a line would exceed ``width`` px."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}" if line else word
            if line and _text_width(draw, trial, font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def side_by_side(panels: dict[str, torch.Tensor], path: str | Path, ncol: int, scale: int = 2,
                 captions: list[str] | None = None) -> Path:
    """Write one PNG with a titled grid per panel, left to right; returns the path.

    Titles (``"\\n"`` breaks a line; long ones wrap between words, onto two lines where the column allows) sit
    above each grid and the optional ``captions`` (one per panel, in order) below it; a column is as wide as its
    grid or its two-line title or caption, whichever is wider, so no text overlaps a neighbour or leaves the sheet.
    """
    titles = list(panels)
    if captions is not None and len(captions) != len(titles):
        raise ValueError(f"expected {len(titles)} captions (one per panel), got {len(captions)}")
    grids = [image_grid(images, ncol, scale=scale).convert("RGB") for images in panels.values()]
    font, gap, line_h = _font(12), 12, 15
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    needs = [[_two_line_width(draw, t, font)] for t in titles]  # a title may take two lines, a caption one
    for need, caption in zip(needs, captions or []):
        need.append(max(_text_width(draw, line, font) for line in caption.split("\n")))
    widths = [max(g.width, *need) for g, need in zip(grids, needs)]
    title_lines = [_wrap(draw, t, font, w) for t, w in zip(titles, widths)]
    caption_lines = [_wrap(draw, c, font, w) for c, w in zip(captions, widths)] if captions is not None else []
    title_h = line_h * max(len(lines) for lines in title_lines)
    caption_h = line_h * max(len(lines) for lines in caption_lines) + gap // 2 if caption_lines else 0
    grid_h = max(g.height for g in grids)
    height = gap + title_h + gap // 2 + grid_h + caption_h + gap
    sheet = Image.new("RGB", (sum(widths) + gap * (len(grids) + 1), height), "white")
    draw = ImageDraw.Draw(sheet)
    x = gap
    for k, (grid, width) in enumerate(zip(grids, widths)):
        _draw_lines(draw, title_lines[k], font, x, width, gap, line_h)
        sheet.paste(grid, (x + (width - grid.width) // 2, gap + title_h + gap // 2))
        if caption_lines:
            _draw_lines(draw, caption_lines[k], font, x, width, gap + title_h + gap + grid_h, line_h)
        x += width + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
                left: int, width: int, top: int, line_h: int) -> None:
    """Draw ``lines`` centred in the column [left, left + width), one every ``line_h`` px from ``top``."""
    for i, line in enumerate(lines):
        x = left + (width - _text_width(draw, line, font)) // 2
        draw.text((x, top + i * line_h), line, fill="black", font=font)
