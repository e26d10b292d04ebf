"""The build: setuptools, with the request path compiled by mypyc (gateway/compiled.py).

Everything else about the project is in pyproject.toml. ``GATEWAY_PURE_PYTHON=1`` builds
without compiling (the same code, about a third more CPU per request).
"""

import os
import runpy

from setuptools import setup

ext_modules = []
if os.environ.get("GATEWAY_PURE_PYTHON") != "1":
    from mypyc.build import mypycify

    # Read by path: the package can't be imported before its dependencies are installed.
    compiled = runpy.run_path(os.path.join("gateway", "compiled.py"))
    compiled["write_manifest"]()  # what the stale-build guard compares against
    # group_name: the runtime shared by the compiled modules is the importable module
    # ``gateway__mypyc`` instead of one named after a hash of the file list.
    ext_modules = mypycify(compiled["source_files"](), group_name="gateway")

setup(ext_modules=ext_modules)
