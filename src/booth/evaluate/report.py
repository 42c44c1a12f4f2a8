"""Self-contained HTML reports: headings, text, tables, image grids and matplotlib charts.

A report is a folder: ``index.html`` plus the PNG files it shows (relative links, so the folder can be moved,
zipped or served). Written atomically; opens in any browser without a server or the network.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 640px; }
img.pixel { image-rendering: pixelated; } .note { color: #555; font-size: 0.9em; }
"""


class Report:
    """Build a report piece by piece, then `save(folder)`."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.images: list[str] = []  # file names referenced, checked on save

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = []
        for row in rows:
            cells = []
            for value in row:
                if isinstance(value, float):
                    cells.append(f'<td class="num">{value:.3f}</td>')
                else:
                    cells.append(f"<td>{html.escape(str(value))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        self.parts.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")

    def image(self, file_name: str, caption: str = "", width: int | None = None, pixel: bool = False) -> None:
        """Show `file_name` (relative to the report folder)."""
        self.images.append(file_name)
        size = f' width="{width}"' if width else ""
        cls = ' class="pixel"' if pixel else ""
        alt = html.escape(caption or file_name)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(
            f'<figure><img src="{html.escape(file_name)}" alt="{alt}"{size}{cls}>{cap}</figure>'
        )

    def render(self) -> str:
        title = html.escape(self.title)
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>\n"
            + "\n".join(self.parts)
            + "\n</body></html>\n"
        )

    def save(self, folder: str | Path, name: str = "index.html") -> Path:
        from booth.errors import BoothError
        from booth.generate.metadata import atomic_write

        folder = Path(folder)
        missing = [f for f in self.images if not (folder / f).is_file()]
        if missing:
            raise BoothError(f"report images missing in {folder}: {', '.join(missing)}")
        text = self.render()
        return atomic_write(folder / name, lambda f: f.write(text.encode()))


def bar_chart(
    path: Path,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    title: str,
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Grouped bars: one group per label in `groups`, one bar per series (matplotlib, Agg).

    `ylim` (bottom, top): the bottom moves below the lowest value when a value lies under it (cosine scores can
    be negative), so no bar is cut off.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 3.4), dpi=100)
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, groups)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*bar_ylim(ylim, series))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def bar_ylim(ylim: tuple[float, float], series: dict[str, Sequence[float]]) -> tuple[float, float]:
    """`ylim` with its bottom moved 0.1 below the lowest value when that value lies under it."""
    low = min([ylim[0], *(v for values in series.values() for v in values)])
    return (ylim[0] if low >= ylim[0] else low - 0.1, ylim[1])


def save_figure(fig, path: Path) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically and free it."""
    import matplotlib.pyplot as plt

    from booth.generate.metadata import atomic_write

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path
