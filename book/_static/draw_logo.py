"""Draw the book's logo and favicon with matplotlib: a detection box around a ViT patch grid.

Run from the repository root: ``.venv/bin/python book/_static/draw_logo.py``. The PNGs it writes
are committed (they are sources of the site, not build outputs).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import patches  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
BLUE, ORANGE, GREY = "#1f77b4", "#ff7f0e", "#d9dee5"


def draw(path: Path, size_px: int, with_text: bool) -> None:
    width = 3.2 if with_text else 1.0
    fig = plt.figure(figsize=(width, 1.0), dpi=size_px)
    ax = fig.add_axes((0, 0, 1 / width, 1))
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 4)
    ax.set_axis_off()
    for row in range(4):  # the patch grid a ViT sees; two patches masked, as in MAE
        for col in range(4):
            masked = (row, col) in {(0, 3), (2, 0)}
            ax.add_patch(patches.Rectangle((col + 0.08, row + 0.08), 0.84, 0.84,
                                           color="white" if masked else (BLUE if (row + col) % 3 else GREY),
                                           ec=GREY, lw=0.8))
    ax.add_patch(patches.Rectangle((0.9, 0.9), 2.2, 2.2, fill=False, ec=ORANGE, lw=size_px / 25))
    if with_text:
        fig.text(1.08 / width, 0.5, "edgefm", fontsize=30, fontweight="bold", color="#333333",
                 va="center")
    fig.savefig(path, transparent=True)
    plt.close(fig)


if __name__ == "__main__":
    draw(HERE / "logo.png", 100, with_text=True)
    draw(HERE / "favicon.png", 64, with_text=False)
