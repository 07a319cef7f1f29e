"""`python -m mtp` runs the command line."""

from mtp.cli import main

main()
