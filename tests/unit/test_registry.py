"""The registry is the one list of stages, and the package's shape holds: no stage imports
another, the core imports no stage, and no module imports itself back through others."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from streamcrawl.core.messages import StageName
from streamcrawl.core.runtime import BatchStage, StreamStage
from streamcrawl.registry import STAGE_NAMES, STAGES, stage_class

PACKAGE = Path(__file__).resolve().parents[2] / "services"


# Registry entries that run themselves (a faust worker, the scheduler), not through the
# stage runtime.
SELF_RUNNING = {"stats", "scheduler"}


def test_every_registered_stage_is_a_stage_class_named_as_registered() -> None:
    groups = set()
    for name in STAGES:
        cls = stage_class(name)
        assert cls.name == name
        if name in SELF_RUNNING:
            assert callable(getattr(cls, "run", None)), name
            continue
        assert issubclass(cls, BatchStage | StreamStage), name
        groups.add(cls.group)
    assert len(groups) == len(STAGES) - len(SELF_RUNNING), "each stage has its own group"


def test_dead_letters_name_exactly_the_registered_stages() -> None:
    assert set(typing.get_args(StageName)) == set(STAGE_NAMES)


def _module_name(path: Path) -> str:
    parts = ["streamcrawl", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The streamcrawl modules ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(name for name in [target, *names] if name.startswith("streamcrawl"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("streamcrawl"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in _imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_no_stage_imports_another_and_the_core_imports_none() -> None:
    stages = {f"streamcrawl.{name}" for name in STAGES}
    for module, targets in _graph().items():
        owner = next((stage for stage in stages if module.startswith(stage + ".")), None)
        for target in targets:
            into = next((stage for stage in stages if target.startswith(stage + ".")), None)
            if module.startswith("streamcrawl.core."):
                assert into is None, f"{module} (core) imports the stage module {target}"
            if owner is not None and into is not None:
                assert into == owner, f"{module} imports another stage's module {target}"


def test_no_import_cycles() -> None:
    graph = _graph()
    # The graph sees relative imports (so the check below can fail).
    assert "streamcrawl.core.messages" in graph["streamcrawl.core.runtime"]
    assert "streamcrawl.fetcher.retry" in graph["streamcrawl.fetcher.service"]
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in graph.get(module, ()):
            visit(target, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_pipelines_with_different_topic_prefixes_never_share_a_consumer_group() -> None:
    from streamcrawl.core.topics import DEFAULT_TOPIC_PREFIX, FETCHER_GROUP, group_id

    assert group_id(DEFAULT_TOPIC_PREFIX, FETCHER_GROUP) == FETCHER_GROUP  # what KEDA watches
    names = {group_id(prefix, FETCHER_GROUP) for prefix in (DEFAULT_TOPIC_PREFIX, "t1.", "t2.")}
    assert len(names) == 3
    assert group_id("t1.", FETCHER_GROUP) == "streamcrawl-fetcher-t1"
