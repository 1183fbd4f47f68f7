"""Build the optional C fault core; everything else is in pyproject.toml.

``optional=True``: on a machine without a compiler or Python headers the install still
succeeds and pagein uses its pure-Python engine.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "pagein.serve._core", ["src/pagein/serve/_core.c"], optional=True,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-Werror", "-std=gnu11"],
)])
