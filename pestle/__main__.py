"""``python -m pestle``: the command line (the daemon re-launches itself this way)."""

from pestle.cli import main

main()
