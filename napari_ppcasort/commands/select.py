"""``ppcasort select RESULTS -o OUTDIR``: cut an exported result again (by score or count) without sorting again."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from ._common import UsageError, add_output_options, file_names

NAME = "select"
HELP = "re-cut the results of a sort (its scores.csv) by a score threshold or a count, without sorting again"


def add_parser(commands) -> None:
    parser = commands.add_parser(
        NAME, help=HELP,
        description="Write new kept and rejected sets, scores.csv and parameters.json into OUTDIR from the results "
                    "of an earlier sort (a folder written by 'ppcasort sort' or the widget's Export), with another "
                    "cut: the particles scoring at most --score-threshold, or the --keep best by score. The manual "
                    "overrides recorded in RESULTS (particles moved across the cut in the widget) are applied "
                    "after the cut. No report.png is written: it needs the fitted model, which is not kept.")
    parser.add_argument("results", type=Path, metavar="RESULTS", help="folder with parameters.json and scores.csv "
                        "of a sort (the particle file it names must still be there)")
    cut = parser.add_mutually_exclusive_group(required=True)
    cut.add_argument("--score-threshold", type=float, metavar="FLOAT",
                     help="keep the particles whose final junk score is at most this")
    cut.add_argument("--keep", type=int, metavar="N", help="keep the N particles with the lowest final scores")
    add_output_options(parser, "the new kept and rejected sets")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..core.results import open_results_folder, read_results, write_results

    recorded = read_results(args.results)
    with recorded.particles as particles:
        scores = recorded.scores
        if args.keep is not None:
            if not 1 <= args.keep <= scores.size:
                raise UsageError(f"--keep must be between 1 and the {scores.size} particles of {args.results}, got "
                                 f"{args.keep}")
            threshold = float(np.sort(scores)[args.keep - 1])
        else:
            threshold = args.score_threshold
        recut = dataclasses.replace(recorded, particles=particles,
                                    settings=recorded.settings.replace(score_threshold=threshold))
        with open_results_folder(args.output, particles, force=args.force,
                                 inputs=[args.results / "parameters.json", args.results / "scores.csv"]) as output:
            written = write_results(output, recut, report=False)
            output.commit()
    kept = recut.kept_mask
    print(f"kept {int(kept.sum())} of {kept.size} particles (score <= {threshold:.6g}"
          f"{', with the manual overrides' if recut.overrides else ''}); wrote {file_names(written)} to {args.output}")
    return 0
