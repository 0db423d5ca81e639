"""Plots of the statistics histories (percentile bands, BN gaps) with matplotlib."""

from __future__ import annotations

import os


def pyplot():
    """Returns `matplotlib.pyplot` on the non-interactive Agg backend."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "Plotting needs matplotlib: pip install matplotlib"
        ) from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def draw_bands(ax, steps, columns: dict, color, label: str) -> None:
    """Draws the middle percentile as a line and nested bands around it.

    Args:
        ax: A matplotlib Axes.
        steps: The x values.
        columns: `{"p15": [...], "p50": [...], "p85": [...]}` in increasing
            percentile order.
        color: Line and band color.
        label: Legend label of the middle line.
    """
    names = list(columns)
    mid = len(names) // 2
    for i in range(mid):
        lo, hi = columns[names[i]], columns[names[-1 - i]]
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15 + 0.1 * i, lw=0)
        ax.plot(steps, lo, color=color, lw=0.8, ls="--")
        ax.plot(steps, hi, color=color, lw=0.8, ls="--")
    ax.plot(steps, columns[names[mid]], color=color, lw=1.5, label=label)


def _layer_names(history, layers) -> list[str]:
    if len(history) == 0:
        raise ValueError(
            "Nothing to plot: the history is empty. Call `plot` after `fit`."
        )
    names = history.layers() if layers is None else list(layers)
    unknown = [n for n in names if n not in history.layers()]
    if unknown:
        raise ValueError(
            f"Unknown layers {unknown} for `plot`; recorded: {history.layers()}"
        )
    return names


def _save(fig, plt, path, title):
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_percentile_history(history, percentile_columns, path, layers=None, title=None):
    """Writes one panel per layer: percentile bands of the history over steps."""
    names = _layer_names(history, layers)
    ordered = sorted(percentile_columns, key=lambda c: float(c[1:]))
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        steps = history.series(name, ordered[0])[0]
        cols = {c: history.series(name, c)[1] for c in ordered}
        draw_bands(ax, steps, cols, "C0", f"{ordered[len(ordered) // 2]}")
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"percentiles {', '.join(ordered)}")
        ax.grid(alpha=0.3)
    return _save(fig, plt, path, title)


#: (row label, channel-average column, channel-maximum column) of the gap plot.
GAP_ROWS = (
    ("mean gap (batch std)", "mean_gap", "mean_gap_max"),
    ("|log variance ratio|", "variance_log_ratio", "variance_log_ratio_max"),
)


def plot_gap_history(history, path, layers=None, title=None):
    """Writes two panels per layer: the mean and variance gaps over steps."""
    names = _layer_names(history, layers)
    plt = pyplot()
    fig, axes = plt.subplots(
        len(GAP_ROWS), len(names), figsize=(4.5 * len(names), 6), squeeze=False
    )
    for col, name in enumerate(names):
        for row, (label, average, maximum) in enumerate(GAP_ROWS):
            ax = axes[row][col]
            steps, mean = history.series(name, average)
            ax.plot(steps, mean, color="C0", lw=1.5, label="channel average")
            steps, top = history.series(name, maximum)
            ax.plot(steps, top, color="C1", lw=1.0, ls="--", label="channel maximum")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(name)
            if row == len(GAP_ROWS) - 1:
                ax.set_xlabel("training step")
    axes[0][0].legend(loc="best", fontsize="small")
    return _save(fig, plt, path, title)
