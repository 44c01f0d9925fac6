"""The `ssv2prep` command line (entry point `ssv2prep.cli:main`).

`app` holds the command group and shared helpers; each other module adds one family of commands to it.
"""

from ssv2prep.cli import bench, data, run, train  # noqa: F401  (importing registers the commands)
from ssv2prep.cli.app import main

__all__ = ["main"]
