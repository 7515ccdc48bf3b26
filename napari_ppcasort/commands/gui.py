"""``ppcasort gui [INPUT]``: napari with the sorting widget docked (and INPUT loaded)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..core.particles import ParticleFileError, open_particles
from ._common import UsageError

NAME = "gui"
HELP = "open napari with the sorting widget (and INPUT loaded)"
#: The widget as napari.yaml names it.
PLUGIN_NAME, WIDGET_NAME = "napari-ppcasort", "Sort particles"


def add_parser(commands) -> None:
    parser = commands.add_parser(NAME, help=HELP,
                                 description="Open napari with the sorting widget docked and INPUT, if given, loaded.")
    parser.add_argument("input", type=Path, nargs="?", metavar="INPUT", help="particle file to open")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.input is not None:
        with open_particles(args.input) as particles:
            if particles.missing_stacks:
                raise ParticleFileError(f"{args.input}: {len(particles.missing_stacks)} of its image stacks are "
                                        f"missing (first: {particles.missing_stacks[0]})")
    if sys.platform.startswith("linux") and not any(
            os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")):
        raise UsageError("no display to open napari on (DISPLAY is not set); over SSH, sort with 'ppcasort sort' "
                         "instead")
    import napari

    viewer = napari.Viewer(title="ppcasort")
    if args.input is not None:
        viewer.open(str(args.input), plugin=PLUGIN_NAME)
    viewer.window.add_plugin_dock_widget(PLUGIN_NAME, WIDGET_NAME)
    napari.run()
    return 0
