"""The subcommands of ``ppcasort``, one module each (``add_parser(subparsers)`` and ``run(args) -> exit status``)."""

from . import demo, gui, select, simulate, sort

#: In the order ``ppcasort --help`` lists them.
COMMANDS = (sort, select, simulate, demo, gui)
