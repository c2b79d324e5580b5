"""JSON Schemas of every topic's messages, loaded from the packaged ``schemas/``."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_NAMES = ("seed", "discovered", "fetch", "retry", "fetched", "page", "dlq")


class SchemaError(ValueError):
    """A message does not match its topic's schema."""


@cache
def load_schema(name: str) -> dict[str, Any]:
    text = resources.files("streamcrawl.schemas").joinpath(f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator(name: str) -> Draft202012Validator:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate(name: str, document: Any) -> None:
    """Raise :class:`SchemaError` naming the first offending field."""
    error = next(iter(_validator(name).iter_errors(document)), None)
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise SchemaError(f"{name} schema: {where}: {error.message[:300]}")
