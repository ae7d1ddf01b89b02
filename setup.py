"""Build hook: setuptools reads the project metadata from pyproject.toml; this file only
wires the cffi extension (csrc/) into the build, which pyproject.toml cannot express."""

from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
