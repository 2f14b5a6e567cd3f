"""`python -m runner` is the `runner` command."""

from runner.cli.train import main

main()
