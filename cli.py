"""Thin entry so `python cli.py ...` works from a checkout."""

from ssv2prep.cli import main

if __name__ == "__main__":
    main()
