"""The ``ppcasort`` command line: sort particle images headless, simulate a stack, run the demo, open the GUI.

    ppcasort sort particles.star -o sorted/ [--n-subspaces 3 --alpha 0.05 ...]
    ppcasort simulate -o simulated/ [--n-particles 2400 --n-outliers 300 --n-noise 300 --snr 0.3 ...]
    ppcasort demo [-o ppcasort-demo]
    ppcasort gui [particles.star]

One module per command in :mod:`napari_ppcasort.commands`; this one parses and maps errors to exit statuses:
0 success; 2 bad input, settings or output folder (one line on stderr naming the file or the option,
before any expensive work); 1 a failure while computing or writing (one line; nothing partial is left);
130 interrupted (Ctrl-C) and 143 terminated (SIGTERM), which end the run like Ctrl-C does.
Start-up imports neither napari, Qt nor matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import typing

import numpy as np

from . import __version__
from .commands import COMMANDS
from .commands._common import cli_name
from .core.errors import InputError, PPCASortError, RunError

__all__ = ["main", "build_parser", "Terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send), raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), pointing at --help."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(full=None) -> argparse.ArgumentParser:
    """The ``ppcasort`` parser. ``full``: the names of the commands whose options are built (None: all); the
    others get a stand-in with their one-line help, enough for ``ppcasort --help``. Building a command's options
    imports what its defaults come from (the settings schema and its models, the simulators), so ``main`` builds
    only those of the command it runs."""
    parser = _Parser(prog="ppcasort", description="Remove junk particle images (ice, carbon, contamination, empty "
                     "boxes) from cryo-EM particle stacks with a mixture of probabilistic PCA and online sorting.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        if full is None or command.NAME in full:
            command.add_parser(commands)
        else:
            commands.add_parser(command.NAME, help=command.HELP)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command ``argv`` names: its first argument that is not an option (``ppcasort`` has no option with a
    value before the command), or None."""
    return next((argument for argument in argv if not argument.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(full={_command_of(argv)} - {None})
    args = parser.parse_args(argv)
    prefix = f"ppcasort {args.command}: error:"
    with _sigterm_as_interrupt():
        try:
            return args.run(args)
        except InputError as error:
            return _fail(f"{prefix} {error.describe(cli_name)}", 2)
        except RunError as error:
            return _fail(f"{prefix} {error.describe(cli_name)}", 1)
        except PPCASortError as error:  # SortCancelled: not raised by the commands, which do not cancel
            return _fail(f"{prefix} {error.describe(cli_name)}", 1)
        except np.linalg.LinAlgError as error:  # a ValueError, but a failure of the computation, not of the input
            return _fail(f"{prefix} the computation failed numerically ({error})", 1)
        except MemoryError:
            return _fail(f"{prefix} not enough memory; lower --box-size or --n-coefficients, or sort fewer "
                         "particles at a time", 1)
        except ValueError as error:  # an engine check not yet of the InputError kind: still the user's input
            return _fail(f"{prefix} {error}", 2)
        except OSError as error:  # reading or writing failed outside the output sets (e.g. an unreadable input)
            where = f"{error.filename}: " if error.filename else ""
            return _fail(f"{prefix} {where}{error.strerror or error}", 1)
        except Terminated:
            return _fail(f"ppcasort {args.command}: terminated (SIGTERM); no partial output was left", 143)
        except KeyboardInterrupt:
            return _fail(f"ppcasort {args.command}: interrupted; no partial output was left", 130)


def _fail(message: str, status: int) -> int:
    print(message.replace("\n", " "), file=sys.stderr)
    return status


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While running a command in the main thread, SIGTERM raises Terminated (handled like Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
