"""Build hook: copy the repository's `manifests/` and `pipelines/` into the wheel as package data.

The top-level folders stay the only copies in the repository; a wheel carries them in
`ssv2prep/shipped/{manifests,pipelines}/`, where `ssv2prep.resources` finds them. Everything else about the
package is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"manifests": "*.json", "pipelines": "*.toml"}


class BuildWithShippedFiles(build_py):
    """`build_py` that also copies the shipped manifests and pipelines below the built `ssv2prep` package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's folders in place
            return
        for folder, pattern in SHIPPED.items():
            sources = sorted((ROOT / folder).glob(pattern))
            if not sources:  # a wheel without them fails at run time only; fail the build instead
                raise FileNotFoundError(f"{folder}/{pattern}: no files to ship (is this a full checkout?)")
            target = Path(self.build_lib) / "ssv2prep" / "shipped" / folder
            self.mkpath(str(target))
            for src in sources:
                self.copy_file(str(src), str(target / src.name))


setup(cmdclass={"build_py": BuildWithShippedFiles})
