"""PNG plots (matplotlib is an optional extra: ``pip install jaxrefine[plots]``)."""
from __future__ import annotations

from ..errors import JaxrefineError
from .writers import atomic_write


def new_figure(**kwargs):
    """A matplotlib Figure outside pyplot: no backend is switched (inline Jupyter plots keep working)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise JaxrefineError("plots need matplotlib: pip install 'jaxrefine[plots]'") from exc
    return Figure(**kwargs)


def save_png(fig, path, dpi: int = 100) -> None:
    """Write a Figure as PNG atomically."""
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def draw_r_vs_cycle(ax, cycles, title: str = "R-work and R-free per macrocycle"):
    """Draw R-work/R-free (left axis) and RMS bond (right axis) against macrocycle on a matplotlib Axes.

    Args:
        ax: matplotlib Axes (no backend is chosen here: works inline in Jupyter).
        cycles: list of dicts (or ``CycleStats._asdict()``) with cycle, r_work, r_free, rms_bond.

    Returns:
        the twin Axes of the RMS bond.
    """
    c = [x["cycle"] for x in cycles]
    ax.plot(c, [x["r_work"] for x in cycles], "o-", label="R-work")
    ax.plot(c, [x["r_free"] for x in cycles], "s-", label="R-free")
    ax.set_xlabel("macrocycle (0 = input model)")
    ax.set_ylabel("R")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot(c, [x["rms_bond"] for x in cycles], "^:", color="grey", label="RMS bond (Å)")
    ax2.set_ylabel("RMS bond (Å)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right")
    return ax2


def plot_r_vs_cycle(cycles, path, title: str = "R-work and R-free per macrocycle") -> None:
    """PNG of :func:`draw_r_vs_cycle`; cycle 0 = input."""
    fig = new_figure(figsize=(6, 4))
    draw_r_vs_cycle(fig.subplots(), cycles, title)
    save_png(fig, path)
