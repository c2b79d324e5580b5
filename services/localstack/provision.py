"""Fetch and build the local servers from the package registries, once, into a cache.

- Apache Kafka: its runtime class path from Maven Central (``mvn
  dependency:copy-dependencies`` over a throwaway POM), plus the log4j2 backend
  that Kafka 4 does not ship as a runtime dependency.
- FerretDB v1 (MongoDB wire protocol over SQLite): the module from the Go module
  proxy, built locally. ``go install pkg@version`` cannot be used: the proxy
  refuses the version-list request it makes for the deprecation check, while
  ``go mod download`` of the exact version works.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
FERRETDB_MODULE = "github.com/FerretDB/FerretDB"
FERRETDB_VERSION = "v1.24.2"
# The local build carries three fixes to FerretDB's SQLite backend and one to its document
# decoding (see _FERRETDB_EDITS); its cache directory says so, so a build without them is
# never reused.
FERRETDB_BUILD = f"{FERRETDB_VERSION}-sqlite-id-index-batched-update-plain-strings"

_SQLITE = Path("internal/backends/sqlite")
# 1. FerretDB 1.24 looks documents up by ``_id`` with the expression
# ``_ferretdb_sjson->'$._id'`` while the unique ``_id`` index it creates is on
# ``_ferretdb_sjson->"_id"``. SQLite matches index expressions by their text, so every
# find, update and delete by ``_id`` scanned the whole table (EXPLAIN QUERY PLAN: SCAN),
# and replacing a stored page cost time proportional to the collection. ``->'_id'`` is the
# same JSON path and matches the index (SEARCH ... USING INDEX).
# 2. Only ``{_id: <string>}`` was pushed down to SQLite; ``{_id: {$in: [...]}}`` (how the
# sink looks up and deletes a batch of stored pages) scanned. The added case pushes a list
# of string or ObjectID ``_id``s down as an IN over the same index; the handler still
# filters what comes back, as for every pushdown.
# 3. An update of many documents (``update_many``: the sink's checked_at of a batch of
# unchanged pages) wrote each matched document in its own SQLite transaction, so a commit
# (a WAL fsync) per document: 3.0-3.6 ms a document against 0.6-0.9 ms to insert it. The
# modified documents are now written in one transaction per 500 (what a batch insert
# does); on an error part-way, those modified before it are written, as before.
# 4. Every document FerretDB reads (a find, the documents an update modifies) is decoded
# from its JSON text with encoding/json, and each string value twice: once as a raw value of
# its document, then again by a new json.Decoder of its own (a quarter of an update's CPU
# for pages of 40 KiB of text). A string literal that holds no escape, quote or control
# character and is valid UTF-8 decodes to its own bytes, so it is taken as is
# (``plainJSONString``); any other string goes through the decoder as before.
_UPDATE = Path("internal/handler/common/update.go")
_SJSON = Path("internal/handler/sjson")
_FERRETDB_EDITS = (
    (
        _SQLITE / "metadata" / "metadata.go",
        "IDColumn = DefaultColumn + \"->'$._id'\"",
        "IDColumn = DefaultColumn + \"->'_id'\"",
    ),
    (
        _SQLITE / "collection.go",
        "\t\tcase string, types.ObjectID:\n\t\t\twhereClause = ",
        "\t\tcase *types.Document:\n\t\t\twhereClause, args = idsInClause(v.(*types.Document))"
        "\n\t\tcase string, types.ObjectID:\n\t\t\twhereClause = ",
    ),
    (  # the same in explain, so that a query plan shows it
        _SQLITE / "collection.go",
        "\t\tcase string, types.ObjectID:\n\t\t\tfilterPushdown = true",
        "\t\tcase *types.Document:\n\t\t\twhereClause, args = idsInClause(v.(*types.Document))"
        '\n\t\t\tfilterPushdown = whereClause != ""'
        "\n\t\tcase string, types.ObjectID:\n\t\t\tfilterPushdown = true",
    ),
    (
        _UPDATE,
        "\tresult := new(UpdateResult)\n",
        "\tresult := new(UpdateResult)\n"
        "\n\tvar pending []*types.Document\n"
        "\tflush := func() error {\n"
        "\t\tif len(pending) == 0 {\n\t\t\treturn nil\n\t\t}\n"
        "\t\t_, err := c.UpdateAll(ctx, &backends.UpdateAllParams{Docs: pending})\n"
        "\t\tpending = nil\n"
        "\t\treturn err\n"
        "\t}\n"
        "\tdefer flush() //nolint:errcheck // an error path: earlier documents are written\n",
    ),
    (
        _UPDATE,
        "\t\t\tif !upsert {\n\t\t\t\treturn result, nil\n",
        "\t\t\tif !upsert {\n"
        "\t\t\t\tif err = flush(); err != nil {\n"
        "\t\t\t\t\treturn nil, lazyerrors.Error(err)\n\t\t\t\t}\n"
        "\t\t\t\treturn result, nil\n",
    ),
    (
        _UPDATE,
        "\t\t\t_, err := c.UpdateAll(ctx, &backends.UpdateAllParams{Docs: []*types.Document{doc}})"
        "\n\t\t\tif err != nil {",
        "\t\t\tpending = append(pending, doc)\n"
        "\t\t\tvar err error\n"
        "\t\t\tif len(pending) >= 500 {\n\t\t\t\terr = flush()\n\t\t\t}\n"
        "\t\t\tif err != nil {",
    ),
    (
        _SJSON / "string.go",
        "\tr := bytes.NewReader(data)\n\tdec := json.NewDecoder(r)\n\n\tvar o string\n",
        "\tif plain, ok := plainJSONString(data); ok {\n"
        "\t\t*str = stringType(plain)\n"
        "\t\treturn nil\n"
        "\t}\n\n"
        "\tr := bytes.NewReader(data)\n\tdec := json.NewDecoder(r)\n\n\tvar o string\n",
    ),
)
_FERRETDB_PLAIN_STRING = """package sjson

import "unicode/utf8"

// plainJSONString returns the value of a JSON string literal that needs no unescaping
// (quoted; no backslash, quote or control character inside; valid UTF-8): its bytes as
// they are, which is what encoding/json decodes it to. Added by streamcrawl's build.
func plainJSONString(data []byte) (string, bool) {
\tif len(data) < 2 || data[0] != '"' || data[len(data)-1] != '"' {
\t\treturn "", false
\t}
\tinner := data[1 : len(data)-1]
\tfor _, c := range inner {
\t\tif c == '\\\\' || c == '"' || c < 0x20 {
\t\t\treturn "", false
\t\t}
\t}
\tif !utf8.Valid(inner) {
\t\treturn "", false
\t}
\treturn string(inner), true
}
"""
_FERRETDB_IDS_IN = """package sqlite

import (
\t"fmt"
\t"strings"

\t"github.com/FerretDB/FerretDB/internal/backends/sqlite/metadata"
\t"github.com/FerretDB/FerretDB/internal/handler/sjson"
\t"github.com/FerretDB/FerretDB/internal/types"
)

// maxIDsIn keeps the statement well under SQLite's limit on bound parameters.
const maxIDsIn = 1000

// idsInClause returns a WHERE clause over the _id index for the filter value
// {$in: [strings or ObjectIDs]}, or nothing when the value is anything else.
// Added by streamcrawl's build of FerretDB.
func idsInClause(filter *types.Document) (string, []any) {
\tif filter.Len() != 1 {
\t\treturn "", nil
\t}
\tin, err := filter.Get("$in")
\tif err != nil {
\t\treturn "", nil
\t}
\tvalues, ok := in.(*types.Array)
\tif !ok || values.Len() == 0 || values.Len() > maxIDsIn {
\t\treturn "", nil
\t}
\tplaceholders := make([]string, values.Len())
\targs := make([]any, values.Len())
\tfor i := 0; i < values.Len(); i++ {
\t\tv, err := values.Get(i)
\t\tif err != nil {
\t\t\treturn "", nil
\t\t}
\t\tswitch v.(type) {
\t\tcase string, types.ObjectID:
\t\tdefault:
\t\t\treturn "", nil
\t\t}
\t\tencoded, err := sjson.MarshalSingleValue(v)
\t\tif err != nil {
\t\t\treturn "", nil
\t\t}
\t\tplaceholders[i] = "?"
\t\targs[i] = string(encoded)
\t}
\treturn fmt.Sprintf(` WHERE %s IN (%s)`, metadata.IDColumn, strings.Join(placeholders, ", ")), args
}
"""

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>streamcrawl.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <!-- Kafka 4 logs through slf4j 1.7 but ships no backend. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


class ProvisionError(RuntimeError):
    """A one-line, user-facing reason the local stack cannot be provisioned."""


def default_cache_dir() -> Path:
    override = os.environ.get("STREAMCRAWL_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamcrawl"


def require_tool(name: str, purpose: str, package_hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ProvisionError(f"'{name}' is not installed; it is needed {purpose} ({package_hint})")
    return path


def _run(
    cmd: list[str],
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1200,
) -> None:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ProvisionError(f"{what} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ProvisionError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


@dataclass(frozen=True)
class KafkaDistribution:
    libs: Path
    version: str = KAFKA_VERSION

    @property
    def classpath(self) -> str:
        return str(self.libs / "*")


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if needed) for a block: concurrent
    provisioning and ``stack up`` calls, in any process, wait for each other."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_kafka(cache: Path | None = None) -> KafkaDistribution:
    """Return the cached Kafka class path, downloading it from Maven Central if absent."""
    root = cache or default_cache_dir()
    with exclusive(root / ".provision.lock"):
        return _ensure_kafka(root)


def ensure_ferretdb(cache: Path | None = None) -> Path:
    """Return the path of a FerretDB binary, building it from the Go module proxy if absent."""
    root = cache or default_cache_dir()
    with exclusive(root / ".provision.lock"):
        return _ensure_ferretdb(root)


def _ensure_kafka(cache: Path) -> KafkaDistribution:
    home = cache / f"kafka-{KAFKA_VERSION}"
    libs = home / "libs"
    marker = home / ".complete"
    if marker.exists():
        return KafkaDistribution(libs)
    require_tool("java", "to run the Kafka broker", "apt-get install openjdk-17-jre-headless")
    mvn = require_tool("mvn", "to fetch Kafka from Maven Central", "apt-get install maven")
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs.", dir=home))
    (home / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
    log.info("downloading Kafka %s from Maven Central", KAFKA_VERSION)
    _run(
        [
            mvn,
            "-B",
            "-q",
            "-f",
            str(home / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ],
        f"downloading Kafka {KAFKA_VERSION} with Maven",
    )
    if not any(staging.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        raise ProvisionError(f"Maven finished but kafka_2.13-{KAFKA_VERSION}.jar is missing")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    marker.touch()
    return KafkaDistribution(libs)


def _ensure_ferretdb(cache: Path) -> Path:
    home = cache / f"ferretdb-{FERRETDB_BUILD}"
    binary = home / "ferretdb"
    if binary.exists():
        return binary
    go = require_tool("go", "to build FerretDB (the MongoDB-wire server)", "a Go toolchain >= 1.24")
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build.", dir=home))
    try:
        source = _download_module(go, work)
        # FerretDB embeds its version from a file its release tooling generates.
        (source / "build" / "version" / "version.txt").write_text(FERRETDB_VERSION + "\n")
        _patch_ferretdb(source)
        log.info("building FerretDB %s", FERRETDB_VERSION)
        env = {**os.environ, "GOFLAGS": "-mod=mod -buildvcs=false", "GOTOOLCHAIN": "local"}
        staged = home / "ferretdb.tmp"
        _run(
            [go, "build", "-trimpath", "-o", str(staged), "./cmd/ferretdb"],
            f"building FerretDB {FERRETDB_VERSION}",
            cwd=source,
            env=env,
        )
        staged.rename(binary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return binary


def _patch_ferretdb(source: Path) -> None:
    """Apply the SQLite backend fixes (see ``_FERRETDB_EDITS``) to the downloaded sources."""
    for relative, before, after in _FERRETDB_EDITS:
        path = source / relative
        text = path.read_text()
        if before not in text:
            raise ProvisionError(
                f"FerretDB {FERRETDB_VERSION}: {relative} no longer reads {before!r}; "
                "review the SQLite fixes before building another version"
            )
        path.write_text(text.replace(before, after))
    (source / _SQLITE / "streamcrawl_ids_in.go").write_text(_FERRETDB_IDS_IN)
    (source / _SJSON / "streamcrawl_plain_string.go").write_text(_FERRETDB_PLAIN_STRING)


def _download_module(go: str, work: Path) -> Path:
    module_home = work / "mod"
    module_home.mkdir()
    (module_home / "go.mod").write_text("module streamcrawl.local/ferretdb\n\ngo 1.24\n")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    proc = subprocess.run(
        [go, "mod", "download", "-json", f"{FERRETDB_MODULE}@{FERRETDB_VERSION}"],
        cwd=module_home,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise ProvisionError(
            f"downloading {FERRETDB_MODULE}@{FERRETDB_VERSION} failed: "
            f"{(proc.stdout + proc.stderr).strip().splitlines()[-1:]}"
        )
    info = json.loads(proc.stdout)
    source = work / "src"
    # The module cache is read-only; build from a writable copy.
    shutil.copytree(info["Dir"], source)
    for path in source.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o644)
    return source
