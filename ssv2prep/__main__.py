"""`python -m ssv2prep ...` (also what `torchrun -m ssv2prep train ...` runs)."""

from ssv2prep.cli import main

main()
