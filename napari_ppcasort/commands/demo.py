"""``ppcasort demo``: simulate a stack with known junk, sort it as ``ppcasort sort`` does, report the purity."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ._common import add_output_options, add_settings_options, file_names, rounds_text, settings_from_args, \
    sort_with_progress
from .simulate import DEMO_STACK, present, simulated_names, stage_simulated
from .sort import add_verbose_option, progress_for

NAME = "demo"
HELP = "sort a built-in simulated stack and report how pure the kept set is"
#: Where the demo's settings differ from SortSettings (nowhere: the demo shows the defaults).
DEMO_SETTINGS: dict = {}
DEMO_OUTPUT = "ppcasort-demo"
DEMO_NAME = "simulated"


def add_parser(commands) -> None:
    from ..core.settings import SortSettings

    n_images = sum(DEMO_STACK[k] for k in ("n_particles", "n_outliers", "n_noise"))
    parser = commands.add_parser(
        NAME, help=HELP,
        description=f"Simulate {n_images} images ({DEMO_STACK['n_particles']} particles, {DEMO_STACK['n_outliers']} "
                    f"outliers, {DEMO_STACK['n_noise']} noise; {DEMO_STACK['box_size']} px, SNR {DEMO_STACK['snr']}), "
                    "sort them as 'ppcasort sort' does and compare the kept set with the truth.")
    add_output_options(parser, "the simulated stack and the results", default=Path(DEMO_OUTPUT))
    add_verbose_option(parser)
    add_settings_options(parser, SortSettings(**DEMO_SETTINGS))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..core.outputs import OutputSet
    from ..core.particles import open_particles
    from ..core.results import existing_results, result_names, write_results
    from ..core.run import check_sort
    from ..core.settings import SortSettings
    from ..core.simulate import NOISE, OUTLIER, PARTICLE, simulate_particles

    started = time.monotonic()
    settings = settings_from_args(args, SortSettings(**DEMO_SETTINGS))
    stack_names = simulated_names(DEMO_NAME)
    n_images = sum(DEMO_STACK[k] for k in ("n_particles", "n_outliers", "n_noise"))
    needed = 2 * n_images * (4 * DEMO_STACK["box_size"] ** 2 + 200) + 8 * 2**20

    def previous(folder):
        return existing_results(folder) + present(stack_names)(folder)

    with OutputSet(args.output, previous=previous, planned=stack_names, force=args.force, inputs=[args.settings],
                   needed_bytes=needed, what="a demo run") as output:
        stack = simulate_particles(**DEMO_STACK)
        staged = stage_simulated(output, stack, DEMO_NAME)
        star = output.final_path(staged["star"].name)
        with open_particles(staged["star"]) as particles:
            check_sort(particles, settings)
            output.planned += result_names(particles)
            with progress_for(args) as progress:
                result = sort_with_progress(particles, settings, progress)
            written = write_results(output, result, title=f"demo: {star}", input_path=star)
        output.commit()
    labels = stack.labels
    kept_labels = labels[result.kept_mask]
    n_kept = kept_labels.size
    print(f"kept {n_kept} of {labels.size} images ({n_kept / labels.size:.1%}) after {rounds_text(result.final.round)} "
          f"in {time.monotonic() - started:.1f} s")
    print(f"purity of the kept set: {np.mean(kept_labels == PARTICLE):.1%} particles "
          f"(raw stack: {np.mean(labels == PARTICLE):.1%})")
    print(f"junk left in the kept set: {np.count_nonzero(kept_labels == OUTLIER)} of "
          f"{np.count_nonzero(labels == OUTLIER)} outliers, {np.count_nonzero(kept_labels == NOISE)} of "
          f"{np.count_nonzero(labels == NOISE)} noise images")
    print(f"results in {args.output}: {star.name} (the simulated stack, true labels in {stack_names[2]}), "
          f"{file_names(written)}")
    return 0


