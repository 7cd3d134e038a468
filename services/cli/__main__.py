"""`python -m services.cli`: the `feedloop` command (used to start child processes with this interpreter)."""

from services.cli.main import main

main()
