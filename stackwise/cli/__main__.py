"""`python -m stackwise.cli` runs the command line (same as the `stackwise` script)."""

from stackwise.cli import main

main()
