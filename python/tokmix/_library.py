"""Finds and loads libtokmix_torch.so, which registers the ops under torch.ops.tokmix."""
import glob
import os

import torch

LIBRARY_NAME = "libtokmix_torch.so"
_loaded = None


def _candidates():
    env = os.environ.get("TOKMIX_LIBRARY")
    if env:
        # an explicit choice is the only candidate: a wrong path must not fall back silently
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    found = [os.path.join(here, "lib", LIBRARY_NAME)]  # installed next to the package
    # straight from a source checkout: <repo>/python/tokmix -> <repo>/build*/lib
    repo = os.path.dirname(os.path.dirname(here))
    builds = glob.glob(os.path.join(repo, "build*", "lib", LIBRARY_NAME))
    builds.sort(key=os.path.getmtime, reverse=True)  # the most recent build first
    return found + builds


def load():
    """Loads the library once and returns its path."""
    global _loaded
    if _loaded is not None:
        return _loaded
    tried = []
    for path in _candidates():
        if os.path.isfile(path):
            torch.ops.load_library(path)
            _loaded = path
            return path
        tried.append(path)
    raise ImportError(
        "tokmix: cannot find " + LIBRARY_NAME + "; looked at: " + ", ".join(tried) +
        ". Build it (cmake --build build --target tokmix_torch) or set TOKMIX_LIBRARY to its path.")
