"""`python -m s2clip_cli` (also what `torchrun -m s2clip_cli` runs)."""

from .cli import main

main()
