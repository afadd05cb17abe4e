"""PNG plots (matplotlib is an optional extra: ``pip install jaxrefine[plots]``)."""
from __future__ import annotations

from .errors import JaxrefineError
from .io.writers import atomic_write


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise JaxrefineError("plots need matplotlib: pip install 'jaxrefine[plots]'") from exc
    return plt


def plot_r_vs_cycle(cycles, path, title: str = "R-work and R-free per macrocycle") -> None:
    """R-work/R-free (left axis) and RMS bond (right axis) against macrocycle; cycle 0 = input."""
    plt = _pyplot()
    c = [x["cycle"] for x in cycles]
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
