"""Installs the tokmix package with the library built by CMake (no compiler, no download):

    cmake --build build --target tokmix_torch
    python3 -m pip install --no-build-isolation --no-index ./python

The library is taken from TOKMIX_LIBRARY, else from the most recent ../build*/lib, and copied
into the package (tokmix/lib/libtokmix_torch.so). It is tied to the torch it was built against.
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "libtokmix_torch.so"


def built_library():
    env = os.environ.get("TOKMIX_LIBRARY")
    if env:
        if not os.path.isfile(env):
            raise SystemExit(f"TOKMIX_LIBRARY={env}: no such file")
        return env
    found = sorted(glob.glob(os.path.join(HERE, "..", "build*", "lib", NAME)), key=os.path.getmtime, reverse=True)
    if not found:
        raise SystemExit(f"no {NAME} under {os.path.join(HERE, '..', 'build*', 'lib')}: build it first "
                         "(cmake --build build --target tokmix_torch) or set TOKMIX_LIBRARY")
    return found[0]


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "tokmix", "lib")
        os.makedirs(dst, exist_ok=True)
        shutil.copy2(built_library(), os.path.join(dst, NAME))


class BinaryDistribution(Distribution):
    def has_ext_modules(self):  # a platform wheel: it carries a shared library
        return True


setup(
    name="tokmix",
    version="0.1.0",
    description="Generalized linear token mixing (Y = (I - B)^-1 A X) for PyTorch, over the tokmix C++ ops",
    packages=["tokmix"],
    python_requires=">=3.8",
    install_requires=[],  # torch is required but not pinned here: the library is built against a given one
    cmdclass={"build_py": BuildWithLibrary},
    distclass=BinaryDistribution,
)
