"""`python -m medexp ...` is the `medexp` command."""

from medexp.cli import main

main()
