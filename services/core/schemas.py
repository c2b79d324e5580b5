"""JSON Schemas of every topic's messages, generated from the types in :mod:`.messages`.

``schemas/NAME.json`` is the public contract (for kcat users and other readers of the
topics); the code validates with the ``msgspec`` types themselves. Regenerate the files
after changing a type: ``python -m streamcrawl.core.schemas [DIR]`` (default ``schemas``).
"""

from __future__ import annotations

import inspect
import json
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from .messages import SCHEMA_TYPES

SCHEMA_NAMES = tuple(SCHEMA_TYPES)
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _clean(node: Any) -> Any:
    """Every ``description`` as prose: docstring indentation dropped, each paragraph on one line."""
    if isinstance(node, list):
        return [_clean(item) for item in node]
    if not isinstance(node, dict):
        return node
    cleaned = {key: _clean(value) for key, value in node.items()}
    text = cleaned.get("description")
    if isinstance(text, str):
        paragraphs = inspect.cleandoc(text).split("\n\n")
        cleaned["description"] = "\n\n".join(" ".join(p.split("\n")) for p in paragraphs)
    return cleaned


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of one topic's type: the type's own definition at the top level, the
    types it uses under ``$defs``."""
    kind = SCHEMA_TYPES[name]
    (root,), components = msgspec.json.schema_components([kind], ref_template="#/$defs/{name}")
    if root != {"$ref": f"#/$defs/{kind.__name__}"}:
        raise AssertionError(f"unexpected root schema for {name}: {root}")
    schema: dict[str, Any] = {"$schema": DRAFT, "$id": f"streamcrawl/{name}.json"}
    schema.update(components.pop(kind.__name__))
    if components:
        schema["$defs"] = components
    cleaned: dict[str, Any] = _clean(schema)
    return cleaned


def schema_text(name: str) -> str:
    """What ``schemas/NAME.json`` holds."""
    return json.dumps(json_schema(name), indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    written = []
    for name in SCHEMA_NAMES:
        path = directory / f"{name}.json"
        path.write_text(schema_text(name), "utf-8")
        written.append(path)
    return written


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The packaged (committed) schema file of one topic."""
    text = resources.files("streamcrawl.schemas").joinpath(f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


if __name__ == "__main__":  # python -m streamcrawl.core.schemas [DIR]
    for written in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")):
        print(written)
