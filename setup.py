"""Builds loopwatch's optional C accelerator (``loopwatch/_accel.c``); the metadata is in setup.cfg.

``optional=True``: where it cannot be compiled (no C compiler, no Python headers) the install still
succeeds and loopwatch runs its pure-Python twin of the same code (``loopwatch.accelerated`` is False).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("loopwatch._accel", ["loopwatch/_accel.c"], optional=True,
                             extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-missing-field-initializers"],
                             libraries=["dl", "rt"])])
