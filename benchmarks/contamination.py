"""Realistic contamination: how well the default sort and the paper's method separate particles from junk.

Data: picked stacks from simulated micrographs (core/micrograph.py: particles with CTF and coloured noise,
clumps picked as aggregates, ice and other contamination with Fresnel fringes, carbon edges, beads, an
imperfect picker, RELION-style extraction), written as a RELION .star + .mrcs and sorted from the file, as a
user would. By default the built-in elongated particle and the 70S ribosome of ../shared/data, each at SNR
1/10, 1/20 and 1/40 with 30% and 50% junk, plus a stack without junk at SNR 1/20.

With ``--simulator boxes`` the stacks come instead from benchmarks/boxsim.py, a second simulator written
independently of core/micrograph.py (box by box, other contamination shapes, another noise model), which no
setting was chosen on.

For every stack and method: ROC AUC of the final junk score (all junk, and each junk class against the
particles), the kept set at the method's own cut (% particles in it = purity, particle recall, % kept), the
junk fraction the method estimates (mean junk probability, when it has one), the calibration error of the
junk probability (ECE over 10 equal-width bins) and the wall time of the sort from the file.
``--figure`` draws per-class ROC curves and the calibration curve of the default's junk probability.

    python benchmarks/contamination.py --seeds 101 102          # held-out seeds, 20,000 picks per stack
    python benchmarks/contamination.py --quick --seeds 1        # 4,000 picks, the tuning seed
    python benchmarks/contamination.py --simulator boxes --seeds 201

Seeds 1 to 3 were used to choose the model's structure and constants (core/contamination.py, core/models.py,
core/pipeline.py); report on others.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import scipy.stats

from napari_ppcasort import SortSettings, open_particles, sort_particles
from napari_ppcasort.core.models import junk_probability
from napari_ppcasort.core.micrograph import simulate_picked_stack, voxel_size_for_diameter
from napari_ppcasort.core.simulate import LABEL_NAMES, PARTICLE, write_simulated

RIBOSOME = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aspire_70s_ribosome_vol65" / "clean70SRibosome_vol_65p.mrc"
RIBOSOME_DIAMETER_ANGSTROM = 250.0

METHODS = {
    "default": {},
    "paper": dict(model="paper", stop="schedule", n_rounds=5, alpha=0.05),
}
SNRS = (1 / 10, 1 / 20, 1 / 40)
JUNK_FRACTIONS = (0.3, 0.5)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC: the probability that a random positive scores above a random negative (ties count half)."""
    ranks = scipy.stats.rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds."""
    thresholds = np.unique(np.concatenate([positive, negative]))[::-1]
    tpr = np.searchsorted(np.sort(-positive), -thresholds, side="right") / len(positive)
    fpr = np.searchsorted(np.sort(-negative), -thresholds, side="right") / len(negative)
    return np.r_[0, fpr, 1], np.r_[0, tpr, 1]


def calibration(probability: np.ndarray, is_junk: np.ndarray, n_bins: int = 10):
    """(bin mean probability, bin junk fraction, bin counts, ECE) over equal-width probability bins."""
    bins = np.minimum((probability * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    mean_p = np.bincount(bins, probability, minlength=n_bins) / np.maximum(counts, 1)
    fraction = np.bincount(bins, is_junk.astype(float), minlength=n_bins) / np.maximum(counts, 1)
    ece = float(np.sum(counts * np.abs(mean_p - fraction)) / counts.sum())
    return mean_p, fraction, counts, ece


def simulate(volume_name: str, n_picks: int, snr: float, junk_fraction: float, seed: int, simulator: str):
    """(PickedStack-like with images, labels, star_blocks) of one setting."""
    if simulator == "boxes":
        from boxsim import simulate_boxes

        return simulate_boxes(n_picks, snr=snr, junk_fraction=junk_fraction, random_state=seed,
                              volume_path=RIBOSOME if volume_name == "ribosome" else None)
    if volume_name == "ribosome":
        volume = mrcfile.read(RIBOSOME).astype(np.float32)
        return simulate_picked_stack(n_picks, volumes=[volume],
                                     voxel_sizes=[voxel_size_for_diameter(volume, RIBOSOME_DIAMETER_ANGSTROM)],
                                     snr=snr, junk_fraction=junk_fraction, random_state=seed)
    return simulate_picked_stack(n_picks, snr=snr, junk_fraction=junk_fraction, random_state=seed)


def evaluate(stack, folder: Path, methods: dict) -> dict[str, dict]:
    """Write ``stack``, sort it with each method, and measure."""
    paths = write_simulated(stack, folder, name="picks", overwrite=True)
    labels = np.asarray(stack.labels)
    is_junk = labels != PARTICLE
    rows = {}
    for name, changes in methods.items():
        particles = open_particles(paths["star"])
        started = time.monotonic()
        result = sort_particles(particles, SortSettings(**changes))
        seconds = time.monotonic() - started
        scores, kept = result.scores, result.kept_mask
        row = {"seconds": seconds, "kept": float(kept.mean()), "recall": float(kept[~is_junk].mean()),
               "purity": float(np.mean(~is_junk[kept])) if kept.any() else float("nan"), "scores": scores,
               "labels": labels}
        if is_junk.any():
            row["auc"] = auc(scores[is_junk], scores[~is_junk])
            for code in np.unique(labels[is_junk]):
                row[LABEL_NAMES[int(code)]] = auc(scores[labels == code], scores[~is_junk])
        probability = junk_probability(result.settings, scores)
        if probability is not None:
            row["estimated_junk"] = float(probability.mean())
            row["probability"] = probability
            if is_junk.any() and (~is_junk).any():
                row["ece"] = calibration(probability, is_junk)[3]
        rows[name] = row
        particles.close()
    return rows


JUNK_COLUMNS = ("off_centre", "aggregate", "ice", "carbon", "empty")


def print_table(results: list[tuple[str, dict]], header: bool = True, stream=None) -> None:
    stream = sys.stdout if stream is None else stream
    title = ("| stack | method | AUC | " + " | ".join(JUNK_COLUMNS)
             + " | purity % | recall % | kept % | junk est./true % | ECE | sort (s) |")
    if header:
        print(title, file=stream)
        print("|" + "---|" * (title.count("|") - 1), file=stream)
    for stack_name, rows in results:
        for method, row in rows.items():
            cells = [stack_name, method, _fmt(row.get("auc"))] + [_fmt(row.get(c)) for c in JUNK_COLUMNS]
            true_junk = float(np.mean(row["labels"] != PARTICLE))
            estimate = row.get("estimated_junk")
            cells += [f"{100 * row['purity']:.1f}", f"{100 * row['recall']:.1f}", f"{100 * row['kept']:.1f}",
                      ("" if estimate is None else f"{100 * estimate:.1f}") + f"/{100 * true_junk:.0f}",
                      _fmt(row.get("ece"), 3), f"{row['seconds']:.0f}"]
            print("| " + " | ".join(cells) + " |", file=stream, flush=True)


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def draw_figure(results: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [(name, rows) for name, rows in results if "auc" in rows["default"]]
    n_columns = min(4, len(chosen) + 1)
    n_rows = -(-(len(chosen) + 1) // n_columns)
    fig, axes = plt.subplots(n_rows, n_columns, figsize=(3.6 * n_columns, 3.4 * n_rows), squeeze=False)
    axes = axes.ravel()
    for axis in axes[len(chosen) + 1:]:
        axis.set_visible(False)
    for axis, (name, rows) in zip(axes, chosen):
        row = rows["default"]
        scores, labels = row["scores"], row["labels"]
        for column in JUNK_COLUMNS:
            codes = [c for c, n in LABEL_NAMES.items() if n == column]
            junk = np.isin(labels, codes)
            if junk.any():
                fpr, tpr = roc_curve(scores[junk], scores[labels == PARTICLE])
                axis.plot(fpr, tpr, label=f"{column} ({row[column]:.3f})")
        axis.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("particles called junk (FPR)")
        axis.set_ylabel("junk called junk (TPR)")
        axis.legend(fontsize=7, loc="lower right")
    axis = axes[len(chosen)]
    probability = np.concatenate([rows["default"]["probability"] for _, rows in chosen])
    is_junk = np.concatenate([rows["default"]["labels"] != PARTICLE for _, rows in chosen])
    mean_p, fraction, counts, ece = calibration(probability, is_junk)
    used = counts > 0
    axis.plot([0, 1], [0, 1], color="0.7", lw=0.8)
    axis.plot(mean_p[used], fraction[used], "o-")
    for p, f, n in zip(mean_p[used], fraction[used], counts[used]):
        axis.annotate(str(n), (p, f), fontsize=6, xytext=(3, -8), textcoords="offset points")
    axis.set_title(f"calibration of the junk probability (ECE {ece:.3f})", fontsize=9)
    axis.set_xlabel("junk probability (bin mean)")
    axis.set_ylabel("fraction that is junk")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"figure: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[101])
    parser.add_argument("--n-picks", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="4,000 picks per stack, SNR 1/20 only")
    parser.add_argument("--volumes", nargs="+", default=["elongated", "ribosome"], choices=["elongated", "ribosome"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--simulator", default="micrographs", choices=["micrographs", "boxes"])
    parser.add_argument("--figure", type=Path, help="PNG of per-class ROC curves and the calibration curve")
    parser.add_argument("--save-results", type=Path, metavar="PICKLE",
                        help="also write the results (scores and labels of every stack) to this pickle, so that runs "
                             "made side by side (e.g. one per --volumes) can be drawn as one figure")
    parser.add_argument("--figure-from", type=Path, nargs="+", metavar="PICKLE",
                        help="draw --figure from the results saved by earlier runs (--save-results), without sorting")
    args = parser.parse_args(argv)
    n_picks = 4000 if args.quick else args.n_picks
    snrs = (1 / 20,) if args.quick else SNRS
    settings = [(snr, junk) for snr in snrs for junk in JUNK_FRACTIONS] + [(1 / 20, 0.0)]
    if args.figure_from:
        if not args.figure:
            parser.error("--figure-from needs --figure")
        results = [row for path in args.figure_from for row in pickle.loads(path.read_bytes())]
        draw_figure([r for r in results if "default" in r[1]], args.figure)
        return 0
    methods = {name: METHODS[name] for name in args.methods}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    results = []
    with tempfile.TemporaryDirectory(prefix="ppcasort-contamination-") as tmp:
        for seed in args.seeds:
            for volume_name in args.volumes:
                for snr, junk in settings:
                    name = f"{volume_name} SNR 1/{round(1 / snr)} junk {round(100 * junk)}% seed {seed}"
                    started = time.monotonic()
                    stack = simulate(volume_name, n_picks, snr, junk, seed, args.simulator)
                    print(f"# {name}: {len(stack.labels)} picks simulated in {time.monotonic() - started:.0f} s",
                          file=sys.stderr, flush=True)
                    results.append((name, evaluate(stack, Path(tmp) / "stack", methods)))
                    print_table(results[-1:], header=False, stream=sys.stderr)  # progress, the row as it comes
    print_table(results)
    if args.save_results:
        args.save_results.write_bytes(pickle.dumps(results))
    if args.figure:
        draw_figure([r for r in results if "default" in r[1]], args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
