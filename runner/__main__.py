"""`python -m runner` is the `runner` command."""

from runner.train import main

main()
