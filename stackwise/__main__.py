"""`python -m stackwise` runs the command line (same as the `stackwise` script)."""

from stackwise.cli import main

main()
