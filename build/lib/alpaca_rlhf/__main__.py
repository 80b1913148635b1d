"""`python -m alpaca_rlhf ...` is the `alpaca-rlhf` command."""

from alpaca_rlhf.cli import main

main()
