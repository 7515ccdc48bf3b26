"""The one-page report of a sort, as a PNG: what was cut, what the subspaces look like, how EM went.

Panels: the histogram of the final scores of all images (kept and rejected) with the cut; the mean
log-likelihood per image at every EM iteration with the pruning rounds marked; a summary (counts and
settings); and, for each subspace, its mean and top principal components as images.

Matplotlib's Agg canvas only (no pyplot, no GUI backend), so it runs headless and inside napari alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .models import MODELS, score_label
from .outputs import atomic_write
from .sorting import SortRound

__all__ = ["report_figure", "write_report", "pruning_iterations", "score_bin_edges", "MAX_SUBSPACES_SHOWN"]

#: At most this many subspaces (the heaviest) get a column of images.
MAX_SUBSPACES_SHOWN = 8
#: A4 landscape, inches.
PAGE_SIZE = (11.69, 8.27)
REPORT_DPI = 150
N_BINS = 60
KEPT_COLOUR, REJECTED_COLOUR, CUT_COLOUR = "tab:blue", "tab:orange", "black"


def score_bin_edges(scores: np.ndarray, n_bins: int = N_BINS, *, tail: float = 0.0,
                    include=(), limits: tuple[float, float] | None = None) -> tuple[np.ndarray, bool]:
    """Histogram bin edges (n_bins + 1,) over the finite ``scores``, and whether they are logarithmic.

    Logarithmic when every score is positive and they span more than a factor 20 (sorting factors, whose junk
    tail spans decades), linear otherwise (signed scores such as the steerable model's evidence).
    tail : leave out this fraction of the scores at each end (0.005: the edges span the 0.5th to the 99.5th
        percentile), so that a few extreme scores do not squeeze the rest into a few bins; the caller clips the
        scores into the end bins. include : values the edges must span all the same (a cut). limits : the
        widest range worth drawing (``ModelSpec.score_limits``: the junk log-odds beyond +-40 are all certain),
        the scores beyond it go into the end bins too.
    """
    finite = scores[np.isfinite(scores)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    logarithmic = low > 0 and high / low > 20
    if tail > 0 and finite.size:
        low, high = np.quantile(finite, [tail, 1 - tail])
    wanted = [value for value in include if value is not None and np.isfinite(value)]
    if wanted:
        low, high = min(low, *wanted), max(high, *wanted)
    if limits is not None:
        low, high = max(low, limits[0]), min(high, limits[1])
    if high <= low:
        low, high = (low / 2, high * 2) if logarithmic or low > 0 else (low - 1, high + 1)
    edges = np.geomspace(low, high, n_bins + 1) if logarithmic else np.linspace(low, high, n_bins + 1)
    return edges, logarithmic


def pruning_iterations(result: SortRound) -> np.ndarray:
    """EM iteration counts after which the sort pruned, (round,) int.

    OnlineSorter runs the same number of EM iterations before every pruning, so round r pruned after
    r * n_iterations / round iterations.
    """
    per_round = result.n_iterations // result.round
    return per_round * np.arange(1, result.round + 1)


def report_figure(result: SortRound, kept_mask: np.ndarray, means: np.ndarray, components: np.ndarray, *,
                  title: str = "", settings=None) -> Figure:
    """The report of a finished sort as a matplotlib Figure (Agg canvas).

    result : the last SortRound of the sort.
    kept_mask : (N,) bool, the images kept (``result.removal_round == 0`` for the sort's own selection).
    means : (M, box, box) subspace means as images; components : (M, n, box, box) top components
        (both from ``pipeline.subspace_images``).
    title : first line of the page, e.g. the input file.
    settings : a SortSettings (or None) whose fields are listed in the summary and whose model names the score.
    """
    kept_mask = np.asarray(kept_mask, dtype=bool)
    if kept_mask.shape != (result.n_total,):
        raise ValueError(f"kept_mask must have one entry per image ({result.n_total}), got shape {kept_mask.shape}")
    if not kept_mask.any():
        raise ValueError("kept_mask keeps no image: there is no cut to draw")
    means, components = np.asarray(means), np.asarray(components)
    n_subspaces = result.parameters.weights.shape[0]
    if means.ndim != 3 or means.shape[0] != n_subspaces:
        raise ValueError(f"means must be (M={n_subspaces}, box, box) images, got shape {means.shape}")
    if components.ndim != 4 or components.shape[0] != n_subspaces or components.shape[2:] != means.shape[1:]:
        raise ValueError(f"components must be (M={n_subspaces}, n, {means.shape[1]}, {means.shape[2]}) images, "
                         f"got shape {components.shape}")

    figure = Figure(figsize=PAGE_SIZE, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title or "ppcasort report", fontsize="large")
    top, bottom = figure.subfigures(2, 1, height_ratios=[1, 1.25])
    histogram_axes, trace_axes, text_axes = top.subplots(1, 3, width_ratios=[1.2, 1.2, 0.8])
    _draw_histogram(histogram_axes, result.final_scores, kept_mask,
                    score_label(settings) if settings is not None else "junk score",
                    MODELS[settings.model].score_limits if settings is not None else None)
    _draw_trace(trace_axes, result)
    _draw_summary(text_axes, result, kept_mask, settings)
    _draw_subspaces(bottom, result.parameters.weights, means, components)
    return figure


def write_report(path, result: SortRound, kept_mask: np.ndarray, means: np.ndarray, components: np.ndarray, *,
                 title: str = "", settings=None) -> Path:
    """Render :func:`report_figure` to the PNG ``path`` (through a temporary file renamed into place)."""
    figure = report_figure(result, kept_mask, means, components, title=title, settings=settings)
    return atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=REPORT_DPI), binary=True)


def _draw_histogram(axes, scores: np.ndarray, kept_mask: np.ndarray, label: str, limits=None) -> None:
    """Stacked histogram of kept and rejected scores; log bins when the scores are positive and span decades;
    scores beyond the model's ``limits`` counted in the end bins."""
    finite = np.isfinite(scores)
    cut = scores[kept_mask].max()
    edges, logarithmic = score_bin_edges(scores, include=(cut,), limits=limits)
    drawn = np.clip(scores, edges[0], edges[-1])
    axes.hist([drawn[kept_mask & finite], drawn[~kept_mask & finite]], bins=edges, stacked=True,
              color=[KEPT_COLOUR, REJECTED_COLOUR],
              label=[f"kept ({kept_mask.sum()})", f"rejected ({(~kept_mask).sum()})"])
    axes.axvline(cut, color=CUT_COLOUR, linestyle="--", linewidth=1.2, label=f"cut {cut:.3g}")
    if logarithmic:
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
    clipped = finite & ((scores < edges[0]) | (scores > edges[-1]))
    axes.set_xlabel("final " + label + (f"\n(scores beyond [{edges[0]:.3g}, {edges[-1]:.3g}] in the end bins)"
                                        if clipped.any() else ""))
    axes.set_ylabel("images")
    axes.set_title("scores of all images", fontsize="medium")
    axes.legend(fontsize="small")


def _draw_trace(axes, result: SortRound) -> None:
    """Mean log-likelihood per image before each EM iteration, a dotted line after each pruning."""
    trace = result.log_likelihood
    axes.plot(np.arange(1, trace.size + 1), trace, marker=".", color=KEPT_COLOUR)
    for n, after in enumerate(pruning_iterations(result)):
        axes.axvline(after + 0.5, color=REJECTED_COLOUR, linestyle=":", label="pruning" if n == 0 else None)
    axes.set_xlim(0.5, trace.size + 1)
    axes.set_xlabel("EM iteration")
    axes.set_ylabel("mean log-likelihood per image")
    axes.set_title(f"EM over {result.round} pruning rounds", fontsize="medium")
    axes.legend(fontsize="small")


def _draw_summary(axes, result: SortRound, kept_mask: np.ndarray, settings) -> None:
    n_kept = int(kept_mask.sum())
    lines = [
        f"images         {result.n_total}",
        f"kept           {n_kept} ({n_kept / result.n_total:.1%})",
        f"rejected       {result.n_total - n_kept}",
        f"rounds         {result.round}",
        f"EM iterations  {result.n_iterations}",
        f"final log-lik. {result.log_likelihood[-1]:.6g}" if result.log_likelihood.size else "",
    ]
    if settings is not None:
        lines += ["", "settings"] + [f"  {name} = {value}" for name, value in settings.used_settings().items()]
    axes.axis("off")
    axes.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize="small",
              transform=axes.transAxes)


def _draw_subspaces(subfigure, weights: np.ndarray, means: np.ndarray, components: np.ndarray) -> None:
    """One row per subspace (the heaviest MAX_SUBSPACES_SHOWN): its mean, then its components, as one montage."""
    shown = np.sort(np.argsort(weights, kind="stable")[::-1][:MAX_SUBSPACES_SHOWN])
    box = means.shape[1]
    gap = max(1, box // 16)
    n_columns = 1 + components.shape[1]
    step = box + gap
    montage = np.full((shown.size * step - gap, n_columns * step - gap), np.nan)
    for row, m in enumerate(shown):
        for column, tile in enumerate([_scaled_mean(means[m])] + [_scaled_component(c) for c in components[m]]):
            montage[row * step:row * step + box, column * step:column * step + box] = tile
    axes = subfigure.subplots()
    axes.imshow(montage, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes.set_facecolor("white")
    axes.set_xticks(np.arange(n_columns) * step + box / 2 - 0.5,
                    ["mean"] + [f"component {j}" for j in range(1, n_columns)], fontsize="small")
    axes.set_yticks(np.arange(shown.size) * step + box / 2 - 0.5,
                    [f"subspace {m + 1}\nweight {weights[m]:.2f}" for m in shown], fontsize="small")
    axes.tick_params(length=0)
    axes.xaxis.tick_top()
    for spine in axes.spines.values():
        spine.set_visible(False)
    hidden = len(weights) - shown.size
    caption = "subspace means and top components (by variance)"
    subfigure.suptitle(caption + (f"; {hidden} lighter subspaces not shown" if hidden else ""), fontsize="medium")


def _scaled_mean(image: np.ndarray) -> np.ndarray:
    """The image mapped to [0, 1] between its 1st and 99th percentiles."""
    low, high = np.percentile(image, [1, 99])
    return np.clip((image - low) / (high - low), 0, 1) if high > low else np.full(image.shape, 0.5)


def _scaled_component(image: np.ndarray) -> np.ndarray:
    """The image mapped to [0, 1] with zero at 0.5 (a component's sign is arbitrary)."""
    largest = np.abs(image).max()
    return 0.5 + 0.5 * image / largest if largest > 0 else np.full(image.shape, 0.5)
