"""``ppcasort sort INPUT -o OUTDIR``: sort a particle set and write its results as one output set."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..core.particles import PARTICLE_SUFFIXES
from ._common import (Progress, add_cluster_options, add_output_options, add_settings_options,
                      cluster_settings_from_args, file_names, rounds_text, settings_from_args, sort_with_progress)

NAME = "sort"
HELP = f"sort a particle set ({', '.join(PARTICLE_SUFFIXES)}) and write the kept and rejected sets"


def add_parser(commands) -> None:
    from ..core.settings import SortSettings

    parser = commands.add_parser(
        NAME, help=HELP,
        description="Sort a particle set and write kept.star/.mrcs (or kept.cs), rejected.star/.mrcs (or "
                    "rejected.cs), scores.csv, report.png and parameters.json in OUTDIR, all or nothing: a "
                    "failed or interrupted run leaves OUTDIR as it was. With --settings parameters.json, the "
                    "manual overrides it records (particles moved across the cut in the widget) are applied too.")
    parser.add_argument("input", type=Path, metavar="INPUT", help="particle file: .mrcs/.mrc stack, RELION .star or "
                        "cryoSPARC .cs")
    add_output_options(parser, "the results")
    add_verbose_option(parser)
    add_settings_options(parser, SortSettings())
    add_cluster_options(parser)
    parser.set_defaults(run=run)


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="a line per pruning round on stderr even when it is not a terminal")


def progress_for(args: argparse.Namespace) -> Progress:
    return Progress(sys.stderr, live=sys.stderr.isatty(), verbose=args.verbose)


def run(args: argparse.Namespace) -> int:
    from ..core.distributed import dask_client
    from ..core.particles import open_particles
    from ..core.results import open_results_folder, write_results
    from ..core.run import check_sort
    from ..core.selection import read_overrides_file
    from ..core.settings import SortSettings

    settings = settings_from_args(args, SortSettings())
    cluster = cluster_settings_from_args(args)
    with open_particles(args.input) as particles:
        check_sort(particles, settings)
        overrides = read_overrides_file(args.settings, particles.n_particles) if args.settings is not None else None
        with open_results_folder(args.output, particles, force=args.force, inputs=[args.settings]) as output:
            # the cluster (or the connection) lasts for the sort; the results are written by this process
            with dask_client(cluster.dask_workers, cluster.dask_scheduler) as client, progress_for(args) as progress:
                result = sort_with_progress(particles, settings, progress, client=client,
                                            chunk_size=cluster.chunk_size)
            if overrides:  # the particles moved across the cut by hand in the run that wrote the settings file
                result = replace(result, overrides=overrides)
            written = write_results(output, result, title=str(args.input))
            output.commit()
    print(f"kept {result.n_kept} of {result.final.n_total} particles ({result.n_kept / result.final.n_total:.1%}) "
          f"after {rounds_text(result.final.round)}; wrote {file_names(written)} to {args.output}")
    return 0
