"""``ppcasort simulate -o OUTDIR``: write a simulated particle stack with known junk (labels included)."""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

import mrcfile
import numpy as np

from ..core.outputs import OutputSet
from ..core.errors import literal
from ._common import UsageError, add_output_options

NAME = "simulate"
HELP = "write a simulated particle stack with known junk (labels included)"
#: The demo's simulated stack (also the defaults of ``ppcasort simulate``): 20 % junk, 32 px, SNR 0.3.
DEMO_STACK = {"n_particles": 2400, "n_outliers": 300, "n_noise": 300, "box_size": 32, "snr": 0.3, "random_state": 0}

def add_parser(commands) -> None:
    parser = commands.add_parser(
        NAME, help=HELP,
        description="Write NAME.mrcs, NAME.star (true labels in the ppcasortTrueLabel column: 0 particle, "
                    "1 outlier, 2 noise; with --realistic also 3 off-centre, 4 aggregate, 5 ice, 6 carbon, 7 empty) "
                    "and NAME_labels.csv in OUTDIR, all three or none. By default the paper's stack (projections, "
                    "photograph crops and noise); with --realistic, picks from simulated micrographs.")
    add_output_options(parser, "the stack", force_help="replace an earlier stack of the same NAME in OUTDIR")
    add_simulation_options(parser)
    parser.set_defaults(run=run)


def paper_pixel_size() -> float:
    """The pixel size (angstrom) of the paper's stack: ``simulate_particles``' default."""
    from ..core.simulate import simulate_particles

    return inspect.signature(simulate_particles).parameters["pixel_size"].default


def add_simulation_options(parser: argparse.ArgumentParser) -> None:
    # the simulators (pandas, scipy.ndimage...) are imported only when this command's options are built
    from ..core import micrograph
    from ..core.simulate import simulate_particles, write_simulated

    engine = inspect.signature(simulate_particles).parameters
    stack = parser.add_argument_group("simulated stack")
    stack.add_argument("--n-particles", type=int, metavar="N", default=DEMO_STACK["n_particles"],
                       help="projections of the volume [default: %(default)s]")
    stack.add_argument("--n-outliers", type=int, metavar="N", default=DEMO_STACK["n_outliers"],
                       help="outliers: crops of a photograph, energy-matched to the particles [default: %(default)s]")
    stack.add_argument("--n-noise", type=int, metavar="N", default=DEMO_STACK["n_noise"],
                       help="pure-noise images [default: %(default)s]")
    stack.add_argument("--snr", type=float, metavar="SNR",
                       help="signal-to-noise ratio: mean particle power / noise variance (inf: no noise) "
                            f"[default: {DEMO_STACK['snr']}, with --realistic {micrograph.DEFAULT_SNR}]")
    stack.add_argument("--box", type=int, metavar="PX",
                       help="image side in pixels; a --volume is resampled to it [default: "
                            f"{DEMO_STACK['box_size']}, with --realistic {micrograph.DEFAULT_BOX_SIZE}]")
    stack.add_argument("--volume", type=Path, metavar="MRC",
                       help="3-D density map (cubic MRC) to project [default: the built-in asymmetric phantom]")
    stack.add_argument("--max-shift", type=float, metavar="PX", default=engine["max_shift"].default,
                       help="particles are shifted by up to this many pixels in x and y [default: %(default)s]")
    stack.add_argument("--defocus", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="apply a CTF with a defocus drawn in [LOW, HIGH] micrometres [default: no CTF]")
    stack.add_argument("--pixel-size", type=float, metavar="ANGSTROM",
                       help=f"pixel size in angstrom [default: {paper_pixel_size()}; with --realistic, the "
                            "one at which the particle is 60%% of the box across]")
    realistic = parser.add_argument_group(
        "realistic picks", "micrographs with CTF, coloured noise, ice, carbon edges and clumps, picked by an "
                           "imperfect picker and extracted as RELION does (the CTF of each pick in the STAR file)")
    realistic.add_argument("--realistic", action="store_true",
                           help="simulate picks from micrographs instead of the paper's stack (--n-particles, "
                                "--n-outliers, --n-noise, --max-shift and --defocus do not apply)")
    realistic.add_argument("--n-picks", type=int, metavar="N", default=3000,
                           help="boxes in the stack [default: %(default)s]")
    realistic.add_argument("--junk-fraction", type=float, metavar="F", default=micrograph.DEFAULT_JUNK_FRACTION,
                           help="fraction of the picks that are junk [default: %(default)s]")
    stack.add_argument("--seed", type=int, metavar="SEED", default=DEMO_STACK["random_state"],
                       help="seed of every random choice [default: %(default)s]")
    stack.add_argument("--name", metavar="NAME", default=inspect.signature(write_simulated).parameters["name"].default,
                       help="base name of the files: NAME.mrcs, NAME.star, NAME_labels.csv [default: %(default)s]")


def simulated_names(name: str) -> list[str]:
    """The files write_simulated writes for ``name``, in its order (stack, STAR, labels)."""
    return [f"{name}.mrcs", f"{name}.star", f"{name}_labels.csv"]


def present(names: list[str]):
    """An OutputSet ``previous`` that finds those of ``names`` that are in the folder."""
    return lambda folder: [name for name in names if os.path.lexists(Path(folder) / name)]


def stage_simulated(output: OutputSet, stack, name: str) -> dict[str, Path]:
    """Write a simulated stack into an output set's staging folder; returns the staged paths by kind."""
    from ..core.simulate import write_simulated

    for each in simulated_names(name):
        output.path(each)
    try:
        return write_simulated(stack, output.staging, name=name)
    except OSError as error:
        raise output.write_error(error) from error


def simulate(args: argparse.Namespace):
    """The stack the options describe (UsageError for options the engine refuses)."""
    from ..core.simulate import load_volume, simulate_particles

    try:
        if args.realistic:
            return _simulate_picks(args)
        box = box_size(args)
        volume = None if args.volume is None else load_volume(args.volume, size=box)
        return simulate_particles(
            n_particles=args.n_particles, n_outliers=args.n_outliers, n_noise=args.n_noise, box_size=box,
            volume=volume, snr=DEMO_STACK["snr"] if args.snr is None else args.snr, max_shift=args.max_shift,
            defocus_um=None if args.defocus is None else tuple(args.defocus),
            pixel_size=paper_pixel_size() if args.pixel_size is None else args.pixel_size, random_state=args.seed)
    except (FileNotFoundError, IsADirectoryError):
        raise UsageError(f"{literal(args.volume)}: no such volume file") from None
    except ValueError as error:
        if isinstance(error, np.linalg.LinAlgError):
            raise
        raise UsageError(literal(error)) from None


def _simulate_picks(args: argparse.Namespace):
    """The realistic picked stack of the options (the volume at the voxel size its MRC header records)."""
    from ..core import micrograph
    from ..core.simulate import load_volume

    volumes = voxel_sizes = None
    if args.volume is not None:
        volumes = load_volume(args.volume)
        with mrcfile.open(args.volume, header_only=True, permissive=True) as mrc:
            voxel_sizes = float(mrc.voxel_size.x)
        if not voxel_sizes > 0:
            raise UsageError(f"{literal(args.volume)}: records no voxel size in its header, which realistic picks "
                             "need (to size the particle in the micrograph)")
    return micrograph.simulate_picked_stack(
        args.n_picks, volumes=volumes, voxel_sizes=voxel_sizes,
        box_size=box_size(args),
        pixel_size=args.pixel_size, snr=micrograph.DEFAULT_SNR if args.snr is None else args.snr,
        junk_fraction=args.junk_fraction, random_state=args.seed)


def box_size(args: argparse.Namespace) -> int:
    """The box the options ask for (the default depends on --realistic)."""
    from ..core import micrograph

    if args.box is not None:
        return args.box
    return micrograph.DEFAULT_BOX_SIZE if args.realistic else DEMO_STACK["box_size"]


def n_simulated(args: argparse.Namespace) -> int:
    """How many images the options ask for."""
    return max(args.n_picks if args.realistic else args.n_particles + args.n_outliers + args.n_noise, 0)


def run(args: argparse.Namespace) -> int:
    from ..core.simulate import LABEL_NAMES

    names = simulated_names(args.name)
    if Path(args.name).name != args.name or not args.name:
        raise UsageError(f"--name must be a plain file name without folders, got {literal(repr(args.name))}")
    n_images = n_simulated(args)
    with OutputSet(args.output, previous=present(names), planned=names, force=args.force, inputs=[args.volume],
                   needed_bytes=n_images * (4 * max(box_size(args), 1) ** 2 + 200), what=f"a simulated stack named "
                   f"{literal(repr(args.name))}") as output:
        stack = simulate(args)
        stage_simulated(output, stack, args.name)
        output.commit()
    paths = {kind: output.final_path(name) for kind, name in zip(("stack", "star", "labels"), names)}
    counts = ", ".join(f"{np.count_nonzero(stack.labels == code)} {LABEL_NAMES[code]}" for code in np.unique(stack.labels))
    print(f"wrote {stack.images.shape[0]} images of {stack.images.shape[1]} px ({counts}; noise variance "
          f"{stack.noise_variance:.4g}) to {paths['star']}, {paths['stack'].name} and {paths['labels'].name}")
    return 0
