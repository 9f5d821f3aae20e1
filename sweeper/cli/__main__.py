"""``python -m sweeper.cli``: the command line."""

from sweeper.cli import main

main()
