"""The subcommands of ``ppcasort``, one module each (``add_parser(subparsers)`` and ``run(args) -> exit status``)."""

from . import demo, gui, simulate, sort

#: In the order ``ppcasort --help`` lists them.
COMMANDS = (sort, simulate, demo, gui)
