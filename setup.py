"""Package discovery only; every other piece of metadata is in pyproject.toml.

The ``streamcrawl`` package lives in ``services/`` and its JSON Schemas in ``schemas/``.
setuptools' ``find`` directive cannot put a prefix in front of the names it finds, so the
subpackages are listed here: a new ``services/<name>/__init__.py`` is packaged without
anyone touching a list.
"""

from setuptools import find_packages, setup

setup(
    package_dir={"streamcrawl": "services", "streamcrawl.schemas": "schemas"},
    packages=[
        "streamcrawl",
        "streamcrawl.schemas",
        *("streamcrawl." + name for name in find_packages("services")),
    ],
)
