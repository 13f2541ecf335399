"""Builds `jobworker-cage`, the small static program that sets up an isolated job's namespaces
(jobworker/supervisor/cage/cage.c), next to the Python code that runs it. Everything else about
the package is in pyproject.toml.

It is declared as an extension so that every way of installing builds it where the package
finds it: into the wheel for `pip install .`, into the source tree for `pip install -e .`. It is
linked statically: it runs as root with a job on the way, and no dynamic loader, library path
or preload should have a say in what it does.
"""

import hashlib
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildPrograms(build_ext):
    """Links each "extension" as a standalone executable named after its last dotted part."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split("."))

    def build_extension(self, ext: Extension) -> None:
        target = self.get_ext_fullpath(ext.name)
        # The program can say which source it was built from (--source-sha256): a test checks
        # that the binary in use is the current cage.c, not one left from an older install.
        digest = hashlib.sha256(b"".join(open(s, "rb").read() for s in ext.sources)).hexdigest()
        objects = self.compiler.compile(
            ext.sources,
            output_dir=self.build_temp,
            macros=[("SOURCE_SHA256", f'"{digest}"')],
            extra_postargs=["-O2", "-Wall", "-Wextra", "-Werror", "-D_FORTIFY_SOURCE=2"],
        )
        self.compiler.link_executable(
            objects,
            os.path.basename(target),
            output_dir=os.path.dirname(target) or ".",
            extra_postargs=["-static"],
        )


setup(
    ext_modules=[
        Extension("jobworker.supervisor.jobworker-cage", ["jobworker/supervisor/cage/cage.c"])
    ],
    cmdclass={"build_ext": BuildPrograms},
)
