"""Line plots as PNG with Pillow only (no matplotlib): e.g. FID against model evaluations.

`save_line_plot` draws one line with markers per series on a log-x axis (labelled ticks at
1, 2, 5 × 10^k), a linear or log y axis, axis labels, a title and a legend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Distinguishable on white, in the order series are drawn (matplotlib's "tab10" hues).
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


@dataclass(frozen=True)
class Axes:
    """The data → pixel map of the plot area [left, right] × [top, bottom] (pixels, y down)."""

    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]  # log10 of the x limits
    y_range: tuple[float, float]  # the y limits (log10 of them if y_log)
    y_log: bool = False

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """x on a log scale; y linear (or log): the lower limit at the bottom."""
        fx = (math.log10(x) - self.x_range[0]) / (self.x_range[1] - self.x_range[0])
        yv = math.log10(y) if self.y_log else y
        fy = (yv - self.y_range[0]) / (self.y_range[1] - self.y_range[0])
        return (self.left + fx * (self.right - self.left),
                self.bottom - fy * (self.bottom - self.top))


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 × 10^k within [low, high] (all powers of ten if that gives more than 12)."""
    ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(low)) - 1,
                                           math.ceil(math.log10(high)) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
    if len(ticks) > 12:
        ticks = [t for t in ticks if math.isclose(10 ** round(math.log10(t)), t)]
    return ticks


def linear_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About `count` round ticks (1, 2 or 5 × 10^k apart) covering [low, high]."""
    span = max(high - low, 1e-12)
    raw = span / max(count - 1, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step + 1e-9)) + 1)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.0e}"


def save_line_plot(path: str, series: Mapping[str, Sequence[tuple[float, float]]], *,
                   x_label: str, y_label: str, title: str = "", y_log: bool | None = None,
                   size: tuple[int, int] = (720, 480)) -> Axes:
    """Writes the plot to `path` (PNG, atomically) and returns its `Axes`.

    `series`: name → (x, y) points (x > 0), drawn sorted by x in `COLOURS` order. `y_log`
    None = log when the y values span more than a factor of 20.
    """
    from PIL import Image, ImageDraw, ImageFont

    from ddpm_jax.files import atomic_write

    points = [(float(x), float(y)) for values in series.values() for x, y in values
              if x > 0 and math.isfinite(y)]
    if not points:
        raise ValueError("nothing to plot: no series has a point with x > 0 and a finite y")
    xs, ys = np.asarray(points).T
    if y_log is None:
        y_log = bool(ys.min() > 0 and ys.max() / ys.min() > 20)
    x_ticks = log_ticks(xs.min() / 1.25, xs.max() * 1.25)
    if y_log:
        y_ticks = log_ticks(ys.min() / 1.25, ys.max() * 1.25)
        y_limits = (math.log10(ys.min() / 1.25), math.log10(ys.max() * 1.25))
    else:
        y_ticks = linear_ticks(min(0.0, ys.min()), ys.max())
        y_limits = (y_ticks[0], y_ticks[-1])
    width, height = size
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    axes = Axes(left=70, top=40, right=width - 20, bottom=height - 55,
                x_range=(math.log10(xs.min() / 1.25), math.log10(xs.max() * 1.25)),
                y_range=y_limits, y_log=y_log)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    grey, black = (225, 225, 225), (0, 0, 0)
    for tick in x_ticks:
        px, _ = axes.to_pixel(tick, 10 ** y_limits[0] if y_log else y_limits[0])
        draw.line([(px, axes.top), (px, axes.bottom)], fill=grey)
        draw.line([(px, axes.bottom), (px, axes.bottom + 5)], fill=black)
        draw.text((px, axes.bottom + 8), _label(tick), fill=black, font=small, anchor="mt")
    for tick in y_ticks:
        _, py = axes.to_pixel(xs.min(), tick)
        draw.line([(axes.left, py), (axes.right, py)], fill=grey)
        draw.line([(axes.left - 5, py), (axes.left, py)], fill=black)
        draw.text((axes.left - 8, py), _label(tick), fill=black, font=small, anchor="rm")
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline=black)
    draw.text(((axes.left + axes.right) / 2, height - 8), x_label, fill=black, font=font,
              anchor="mb")
    label = Image.new("RGB", (int(draw.textlength(y_label, font=font)) + 4, 18), "white")
    ImageDraw.Draw(label).text((2, 1), y_label, fill=black, font=font)
    image.paste(label.rotate(90, expand=True),
                (4, int((axes.top + axes.bottom) / 2 - label.width / 2)))
    if title:
        draw.text((width / 2, 10), title, fill=black, font=font, anchor="mt")
    legend = []
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        line = [axes.to_pixel(x, y) for x, y in sorted(values) if x > 0 and math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for px, py in line:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        legend.append((name, colour))
    box_width = max(int(draw.textlength(name, font=small)) for name, _ in legend) + 34
    x0, y0 = axes.right - box_width - 8, axes.top + 8
    draw.rectangle([x0, y0, x0 + box_width, y0 + 18 * len(legend) + 6], fill="white",
                   outline=(160, 160, 160))
    for row, (name, colour) in enumerate(legend):
        y = y0 + 12 + 18 * row
        draw.line([(x0 + 6, y), (x0 + 24, y)], fill=colour, width=3)
        draw.text((x0 + 28, y), name, fill=black, font=small, anchor="lm")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return axes
