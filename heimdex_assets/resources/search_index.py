"""The scene search index: BM25 over scene text, in OpenSearch or in an embedded SQLite FTS5 file.

Each search-step version has its own index, ``<prefix>-<version>``; searches read the one the
alias ``<prefix>`` points at, so a new version is built beside the old one and switched to in one
step. With ``opensearch_url`` set the index lives in OpenSearch (opensearch-py); without it, in a
SQLite file whose FTS5 tables rank with the same BM25 formula.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg
from pydantic import PrivateAttr

from heimdex_assets.db.embedded import default_home

DOCUMENT_FIELDS = (
    "owner_id",
    "video_id",
    "scene_id",
    "scene_index",
    "start_s",
    "end_s",
    "transcript",
    "visual_description",
    "tags",
    "summary",
)
TEXT_FIELDS = ("transcript", "visual_description", "tags", "summary")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")  # valid in OpenSearch index names and SQLite alike
HIGHLIGHT = ("<em>", "</em>")
PERMANENT_HTTP_STATUSES = (400, 413)  # the same request would be refused the same way


def index_mapping(prefix: str, version: str) -> dict[str, Any]:
    """The OpenSearch mapping of one version's index; ``_meta`` says whose index it is."""
    english = {"type": "text", "analyzer": "english"}
    return {
        "mappings": {
            "dynamic": "strict",  # a misspelt field is an error, not a silently unsearchable one
            "_meta": {"heimdex_prefix": prefix, "heimdex_version": version},
            "properties": {
                "owner_id": {"type": "keyword"},
                "video_id": {"type": "keyword"},
                "scene_id": {"type": "keyword"},
                "scene_index": {"type": "integer"},
                "start_s": {"type": "float"},
                "end_s": {"type": "float"},
                "transcript": english,
                "visual_description": english,
                "summary": english,
                # ignore_above: an overlong tag stays searchable as text instead of failing its document.
                "tags": english | {"fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
            },
        }
    }


class SearchIndexError(RuntimeError):
    """The search index refused or could not be reached; one line, never with credentials."""


@dataclass
class BulkReport:
    """What a bulk upsert did: documents sent, indexed, item retries, and those that failed for good."""

    index: str
    documents: int = 0
    indexed: int = 0
    attempts: int = 0
    retries: int = 0
    failed: dict[str, str] = field(default_factory=dict)


class BulkIndexError(SearchIndexError):
    """Some documents could not be indexed after every retry; ``report.failed`` maps id to reason."""

    def __init__(self, report: BulkReport) -> None:
        self.report = report
        shown = sorted(report.failed.items())[:20]
        more = len(report.failed) - len(shown)
        listed = "; ".join(f"{doc_id} ({reason})" for doc_id, reason in shown) + (f"; and {more} more" if more else "")
        super().__init__(
            f"{len(report.failed)} of {report.documents} document(s) could not be indexed into {report.index} "
            f"after {report.attempts} attempt(s): {listed}"
        )


@dataclass(frozen=True)
class Hit:
    """One scene found by a search, best first; ``snippet`` marks matched words with <em>."""

    scene_id: str
    video_id: str
    score: float
    snippet: str


@dataclass(frozen=True)
class ItemFailure:
    """Why one document was not written in one attempt, and whether another attempt may succeed."""

    reason: str
    retryable: bool


def redact_url(url: str) -> str:
    """``scheme://host:port`` of ``url``: no credentials, path or query."""
    parsed = urlparse(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.hostname or ''}{port}"


def document_id(doc: dict[str, Any]) -> str:
    return str(doc["scene_id"])


class SearchIndex(dg.ConfigurableResource):
    """BM25 search over scene transcript, visual description, tags and summary, one index per version.

    ``opensearch_url`` (``HEIMDEX_OPENSEARCH_URL``, may carry credentials) selects OpenSearch;
    when it is empty, an SQLite FTS5 file at ``sqlite_path`` (default
    ``<HEIMDEX_HOME>/search/scenes.sqlite``) holds the index. Bulk items that fail are retried
    ``bulk_retries`` times with exponential backoff from ``bulk_backoff_s``; those still failing
    raise BulkIndexError naming them. Items the engine rejects as malformed (HTTP 400) are not
    retried: they would fail the same way.
    """

    opensearch_url: str | None = None
    sqlite_path: str | None = None
    index_prefix: str = "heimdex-scenes"
    bulk_retries: int = 3
    bulk_backoff_s: float = 0.5
    bulk_chunk_size: int = 500
    timeout_s: float = 30.0

    _backend: Any = PrivateAttr(default=None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    @property
    def backend(self) -> OpenSearchBackend | SqliteBackend:
        if self._backend is None:
            if self.opensearch_url:
                self._backend = OpenSearchBackend(self.opensearch_url, self.timeout_s)
            else:
                path = Path(self.sqlite_path).expanduser() if self.sqlite_path else default_sqlite_path()
                self._backend = SqliteBackend(path, self.timeout_s)
        return self._backend

    def describe(self) -> str:
        """Where the index lives, without credentials."""
        return self.backend.describe()

    def index_name(self, version: str) -> str:
        """The index of one search-step version: ``<prefix>-<version>``."""
        if not NAME_PATTERN.match(self.index_prefix):
            raise ValueError(f"invalid index prefix {self.index_prefix!r}: lowercase letters, digits, '.', '_', '-'")
        if not NAME_PATTERN.match(version):
            raise ValueError(f"invalid search index version {version!r}: lowercase letters, digits, '.', '_', '-'")
        return f"{self.index_prefix}-{version}"

    @property
    def alias(self) -> str:
        """The name searches read; it points at the active version's index."""
        return self.index_prefix

    def ensure_index(self, version: str) -> str:
        """Create the version's index with its mapping unless it exists; returns its name."""
        name = self.index_name(version)
        self.backend.create(name, self.index_prefix, version)
        return name

    def upsert_documents(self, version: str, docs: list[dict[str, Any]]) -> BulkReport:
        """Index ``docs`` (id = ``scene_id``), retrying failed items, then refresh.

        Raises BulkIndexError (with the report) when some documents still fail.
        """
        name = self.index_name(version)
        pending = {document_id(d): d for d in docs}
        report = BulkReport(index=name, documents=len(pending))
        final: dict[str, str] = {}
        for attempt in range(self.bulk_retries + 1):
            if attempt:
                time.sleep(self.bulk_backoff_s * 2 ** (attempt - 1))
                report.retries += len(pending)
            report.attempts += 1
            batch = list(pending.values())
            failures: dict[str, ItemFailure] = {}
            for start in range(0, len(batch), self.bulk_chunk_size):
                failures |= self.backend.write(name, batch[start : start + self.bulk_chunk_size])
            report.indexed += len(pending) - len(failures)
            final |= {doc_id: f.reason for doc_id, f in failures.items() if not f.retryable}
            pending = {doc_id: pending[doc_id] for doc_id, f in failures.items() if f.retryable}
            if not pending:
                break
        final |= {doc_id: failures[doc_id].reason for doc_id in pending}
        if report.indexed:
            self.backend.refresh(name)  # searchable before the caller records them as indexed
        report.failed = final
        if final:
            raise BulkIndexError(report)
        return report

    def delete_video_documents_except(
        self, version: str, video_ids: Collection[str], keep_scene_ids: Collection[str]
    ) -> int:
        """Delete the documents of ``video_ids`` whose scene is not in ``keep_scene_ids``; returns how many."""
        if not video_ids:
            return 0
        return self.backend.delete(
            [self.index_name(version)], [str(v) for v in video_ids], [str(s) for s in keep_scene_ids]
        )

    def delete_videos(self, version: str | None, video_ids: Collection[str]) -> int:
        """Delete every document of ``video_ids`` at ``version``, or in every version when it is None."""
        if not video_ids:
            return 0
        names = [self.index_name(version)] if version is not None else [self.index_name(v) for v in self.versions()]
        return self.backend.delete(names, [str(v) for v in video_ids], []) if names else 0

    def activate(self, version: str) -> None:
        """Point the alias at ``version``'s index, atomically (searches see the old or the new)."""
        self.backend.set_alias(self.alias, self.index_name(version))

    def active_version(self) -> str | None:
        """The version the alias points at, or None before any activation."""
        target = self.backend.alias_target(self.alias)
        return target.removeprefix(f"{self.index_prefix}-") if target else None

    def index_identity(self, version: str) -> str | None:
        """Which index of ``version`` exists now, or None when there is none; never creates it.

        ``<backend>:<index name>@<id>``, where the id is new each time the index is created (OpenSearch's
        ``index.uuid``; for SQLite a uuid4 stored when the index is created), so a document recorded under
        one identity is known to be gone once the index is wiped or recreated, on a new cluster too.
        One request; no URL, host or credentials in it.
        """
        name = self.index_name(version)
        found = self.backend.identity(name)
        return f"{self.backend.kind}:{name}@{found}" if found else None

    def versions(self) -> list[str]:
        """Every version that has an index under this prefix, oldest first."""
        return sorted(self.backend.versions(self.index_prefix))

    def drop_version(self, version: str) -> None:
        """Delete a version's index (pruning); the active version cannot be dropped."""
        if version == self.active_version():
            raise SearchIndexError(f"{self.index_name(version)} is the active search index; activate another first")
        self.backend.drop(self.index_name(version))

    def search(self, owner_id: str, query: str, limit: int = 20, video_ids: Collection[str] | None = None) -> list[Hit]:
        """BM25 hits of ``query`` among ``owner_id``'s scenes in the active version, best first."""
        if not query.strip() or limit <= 0 or (video_ids is not None and not video_ids):
            return []
        return self.backend.search(
            self.alias, str(owner_id), query, limit, None if video_ids is None else [str(v) for v in video_ids]
        )

    def count(self, version: str, owner_id: str | None = None) -> int:
        """Documents in a version's index, all or one owner's (0 when the index does not exist)."""
        return self.backend.count(self.index_name(version), None if owner_id is None else str(owner_id))

    def get_documents(self, version: str, ids: Collection[str]) -> dict[str, dict[str, Any]]:
        """The stored documents with these ids (missing ids are absent from the result)."""
        return self.backend.get(self.index_name(version), [str(i) for i in ids]) if ids else {}


def default_sqlite_path() -> Path:
    """Where the embedded index lives when ``sqlite_path`` is not set."""
    return default_home() / "search" / "scenes.sqlite"


# -- OpenSearch ------------------------------------------------------------------------------------


class OpenSearchBackend:
    """The index operations on an OpenSearch cluster; every error becomes a one-line SearchIndexError."""

    kind = "opensearch"

    def __init__(self, url: str, timeout_s: float) -> None:
        from opensearchpy import OpenSearch

        self.where = f"OpenSearch at {redact_url(url)}"
        self.timeout_s = timeout_s
        self.client = OpenSearch(hosts=[url], timeout=timeout_s, max_retries=2, retry_on_timeout=True)

    def describe(self) -> str:
        return self.where

    def close(self) -> None:
        self.client.close()

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from opensearchpy import exceptions

        try:
            yield
        except exceptions.ConnectionError as exc:  # also timeouts; str(exc) names the host, maybe credentials
            raise SearchIndexError(f"cannot reach {self.where}: {type(exc).__name__}") from None
        except exceptions.TransportError as exc:
            raise SearchIndexError(f"{self.where} failed to {what}: {_transport_reason(exc)}") from None

    def create(self, name: str, prefix: str, version: str) -> None:
        from opensearchpy import exceptions

        with self._errors(f"create index {name}"):
            if self.client.indices.exists(index=name):
                return
            try:
                self.client.indices.create(index=name, body=index_mapping(prefix, version))
            except exceptions.RequestError as exc:
                if exc.error != "resource_already_exists_exception":  # lost a race: fine
                    raise

    def write(self, name: str, docs: list[dict[str, Any]]) -> dict[str, ItemFailure]:
        """One bulk request; the items that failed, each with whether a retry may help."""
        from opensearchpy import exceptions

        body: list[dict[str, Any]] = []
        for doc in docs:
            body += [{"index": {"_index": name, "_id": document_id(doc)}}, doc]
        try:
            response = self.client.bulk(body=body, request_timeout=self.timeout_s)
        except exceptions.ConnectionError as exc:
            return {document_id(d): ItemFailure(f"cannot reach {self.where}: {type(exc).__name__}", True) for d in docs}
        except exceptions.TransportError as exc:
            retryable = exc.status_code not in PERMANENT_HTTP_STATUSES
            return {document_id(d): ItemFailure(_transport_reason(exc), retryable) for d in docs}
        failures = {}
        for item in response["items"]:
            result = item["index"]
            if result.get("error"):
                error = result["error"]
                reason = f"HTTP {result['status']} {error.get('type')}: {error.get('reason')}"
                failures[result["_id"]] = ItemFailure(reason, result["status"] not in PERMANENT_HTTP_STATUSES)
        return failures

    def refresh(self, name: str) -> None:
        with self._errors(f"refresh {name}"):
            self.client.indices.refresh(index=name)

    def delete(self, names: list[str], video_ids: list[str], keep_ids: list[str]) -> int:
        """Find the matching ids page by page and delete them in bulk.

        Not ``_delete_by_query``: it lives in the reindex module, which minimal distributions lack.
        """
        from opensearchpy import exceptions

        query: dict[str, Any] = {"bool": {"filter": [{"terms": {"video_id": video_ids}}]}}
        if keep_ids:
            query["bool"]["must_not"] = [{"ids": {"values": keep_ids}}]
        deleted = 0
        for name in names:
            seen: set[str] = set()
            while True:
                with self._errors(f"find documents to delete in {name}"):
                    try:
                        found = self.client.search(
                            index=name, body={"query": query, "size": 1000, "_source": False, "sort": ["_doc"]}
                        )
                    except exceptions.NotFoundError:
                        break
                ids = [h["_id"] for h in found["hits"]["hits"]]
                if not ids:
                    break
                if seen.intersection(ids):
                    raise SearchIndexError(f"{self.where} kept documents it was asked to delete from {name}")
                seen.update(ids)
                with self._errors(f"delete documents from {name}"):
                    response = self.client.bulk(
                        body=[{"delete": {"_index": name, "_id": i}} for i in ids], refresh="true"
                    )
                failed = [
                    f"{item['delete']['_id']} (HTTP {item['delete']['status']})"
                    for item in response["items"]
                    if item["delete"].get("error")
                ]
                if failed:
                    raise SearchIndexError(f"{self.where} failed to delete from {name}: {'; '.join(failed[:20])}")
                deleted += sum(item["delete"].get("result") == "deleted" for item in response["items"])
        return deleted

    def set_alias(self, alias: str, name: str) -> None:
        with self._errors(f"point alias {alias} at {name}"):
            if not self.client.indices.exists(index=name):
                raise SearchIndexError(f"cannot activate {name} in {self.where}: no such index")
            current = self._alias_holders(alias)
            actions = [{"remove": {"index": i, "alias": alias}} for i in current if i != name]
            actions.append({"add": {"index": name, "alias": alias}})
            self.client.indices.update_aliases(body={"actions": actions})  # one call: atomic

    def _alias_holders(self, alias: str) -> list[str]:
        found = self.client.indices.get_alias(name=alias, ignore=404)  # 404: no alias yet, an answer
        return sorted(name for name, body in found.items() if isinstance(body, dict) and "aliases" in body)

    def alias_target(self, alias: str) -> str | None:
        with self._errors(f"read alias {alias}"):
            holders = self._alias_holders(alias)
        return holders[-1] if holders else None

    def versions(self, prefix: str) -> list[str]:
        with self._errors(f"list the indexes of {prefix}"):
            found = self.client.indices.get_mapping(index=f"{prefix}-*")
        out = []
        for body in found.values():
            meta = body.get("mappings", {}).get("_meta", {})
            if meta.get("heimdex_prefix") == prefix:  # not another prefix that starts with ours
                out.append(meta["heimdex_version"])
        return out

    def drop(self, name: str) -> None:
        with self._errors(f"delete index {name}"):
            self.client.indices.delete(index=name, ignore_unavailable=True)

    def identity(self, name: str) -> str | None:
        """The index's ``index.uuid`` (new at each creation), or None when there is no index ``name``."""
        from opensearchpy import exceptions

        with self._errors(f"read the settings of {name}"):
            try:
                found = self.client.indices.get_settings(
                    index=name, name="index.uuid", params={"filter_path": "*.settings.index.uuid"}
                )
            except exceptions.NotFoundError:
                return None
        # Keyed by the concrete index: an alias of that name pointing elsewhere is not this index.
        entry = found.get(name) if isinstance(found, dict) else None
        return (entry or {}).get("settings", {}).get("index", {}).get("uuid") or None

    def search(self, alias: str, owner_id: str, query: str, limit: int, video_ids: list[str] | None) -> list[Hit]:
        from opensearchpy import exceptions

        filters: list[dict[str, Any]] = [{"term": {"owner_id": owner_id}}]
        if video_ids is not None:
            filters.append({"terms": {"video_id": video_ids}})
        body = {
            "size": limit,
            "_source": ["scene_id", "video_id"],
            "query": {
                "bool": {
                    "must": [{"multi_match": {"query": query, "fields": list(TEXT_FIELDS), "type": "best_fields"}}],
                    "filter": filters,  # a filter clause: never scored, never optional
                }
            },
            "highlight": {
                "fields": {f: {} for f in TEXT_FIELDS},
                "fragment_size": 160,
                "number_of_fragments": 1,
                "pre_tags": [HIGHLIGHT[0]],
                "post_tags": [HIGHLIGHT[1]],
            },
        }
        with self._errors(f"search {alias}"):
            try:
                response = self.client.search(index=alias, body=body)
            except exceptions.NotFoundError:  # no version activated yet
                return []
        hits = []
        for h in response["hits"]["hits"]:
            highlight = h.get("highlight", {})
            snippet = next((highlight[f][0] for f in TEXT_FIELDS if highlight.get(f)), "")
            hits.append(Hit(h["_source"]["scene_id"], h["_source"]["video_id"], float(h["_score"]), snippet))
        return hits

    def count(self, name: str, owner_id: str | None) -> int:
        from opensearchpy import exceptions

        body = {"query": {"term": {"owner_id": owner_id}} if owner_id else {"match_all": {}}}
        with self._errors(f"count {name}"):
            try:
                return int(self.client.count(index=name, body=body)["count"])
            except exceptions.NotFoundError:
                return 0

    def get(self, name: str, ids: list[str]) -> dict[str, dict[str, Any]]:
        from opensearchpy import exceptions

        with self._errors(f"read documents of {name}"):
            try:
                response = self.client.mget(index=name, body={"ids": ids})
            except exceptions.NotFoundError:
                return {}
        return {d["_id"]: d["_source"] for d in response["docs"] if d.get("found")}


def _transport_reason(exc: Any) -> str:
    """``HTTP <status> <type>: <reason>`` of an OpenSearch error, first line only."""
    info = exc.info if isinstance(exc.info, dict) else {}
    error = info.get("error") if isinstance(info.get("error"), dict) else {}
    cause = (error.get("root_cause") or [error])[0] if error else {}
    reason = cause.get("reason") or str(exc.error)
    return f"HTTP {exc.status_code} {cause.get('type') or exc.error}: {str(reason).splitlines()[0][:300]}"


# -- SQLite FTS5 -----------------------------------------------------------------------------------

_COLUMNS = ("scene_id", "owner_id", "video_id", "scene_index", "start_s", "end_s", *TEXT_FIELDS)


class SqliteBusyError(SearchIndexError):
    """The SQLite file stayed locked by another writer for longer than the timeout."""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqliteBackend:
    """The index operations on an SQLite file: per version, a STRICT table of documents with an FTS5
    index over their text (porter-stemmed, ranked by FTS5's ``bm25()``), and the alias in a table.
    Each index has a uuid4, drawn when it is created and deleted with it: its identity."""

    kind = "sqlite"

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect(write=False) as conn:  # a reader: does not wait for a busy writer
            # The newest metadata table: a file without it (new, or older) is set up or upgraded below.
            ready = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'heimdex_index_ids'").fetchone()
        if ready:
            return
        try:
            with closing(sqlite3.connect(path, timeout=timeout_s)) as conn:
                conn.execute("PRAGMA journal_mode=WAL")  # persistent; readers then never wait for a writer
        except sqlite3.Error as exc:
            raise SearchIndexError(f"cannot open {self.describe()}: {exc}") from None
        with self._connect() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS heimdex_indexes (name TEXT PRIMARY KEY, prefix TEXT NOT NULL,"
                " version TEXT NOT NULL) STRICT"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS heimdex_aliases (alias TEXT PRIMARY KEY, name TEXT NOT NULL) STRICT"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS heimdex_index_ids (name TEXT PRIMARY KEY, id TEXT NOT NULL) STRICT"
            )
            # Indexes made before identities were kept get theirs now, once.
            for (name,) in conn.execute(
                "SELECT name FROM heimdex_indexes WHERE name NOT IN (SELECT name FROM heimdex_index_ids)"
            ).fetchall():
                self._give_identity(conn, name)

    def describe(self) -> str:
        return f"SQLite FTS5 index at {self.path}"

    def close(self) -> None:
        """Nothing held: each operation opens its own connection (safe across threads)."""

    @contextmanager
    def _connect(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A connection whose block is one transaction; errors become a one-line SearchIndexError."""
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise SearchIndexError(f"cannot open {self.describe()}: {exc}") from None
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")  # writers queue here, not mid-way
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            raise (SqliteBusyError if busy else SearchIndexError)(
                f"{self.describe()}: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            conn.close()  # without a COMMIT, closing discards the transaction

    def _exists(self, conn: sqlite3.Connection, name: str) -> bool:
        return conn.execute("SELECT 1 FROM heimdex_indexes WHERE name = ?", (name,)).fetchone() is not None

    def _identity(self, conn: sqlite3.Connection, name: str) -> str | None:
        row = conn.execute(
            "SELECT u.id FROM heimdex_indexes i JOIN heimdex_index_ids u ON u.name = i.name WHERE i.name = ?",
            (name,),
        ).fetchone()
        return row[0] if row else None

    @staticmethod
    def _give_identity(conn: sqlite3.Connection, name: str) -> None:
        """A new uuid4 for the index ``name``, unless it has one."""
        conn.execute("INSERT OR IGNORE INTO heimdex_index_ids VALUES (?, ?)", (name, str(uuid.uuid4())))

    def identity(self, name: str) -> str | None:
        """The uuid4 drawn when the index was created, or None when there is no index ``name``."""
        with self._connect(write=False) as conn:
            try:
                return self._identity(conn, name)
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # the file was wiped under us: no index at all
                    return None
                raise

    def create(self, name: str, prefix: str, version: str) -> None:
        docs, fts = _quote(name), _quote(f"{name}__fts")
        text = ", ".join(TEXT_FIELDS)
        new = ", ".join(f"new.{c}" for c in TEXT_FIELDS)
        old = ", ".join(f"old.{c}" for c in TEXT_FIELDS)
        with self._connect(write=False) as conn:  # the usual case, without waiting for a writer
            if self._identity(conn, name):
                return
        with self._connect() as conn:
            if self._exists(conn, name):
                self._give_identity(conn, name)  # made by an older writer without one
                return
            for statement in (
                f"""CREATE TABLE {docs} (
                    rid INTEGER PRIMARY KEY, scene_id TEXT NOT NULL UNIQUE, owner_id TEXT NOT NULL,
                    video_id TEXT NOT NULL, scene_index INTEGER, start_s REAL, end_s REAL, transcript TEXT,
                    visual_description TEXT, tags TEXT, summary TEXT, document TEXT NOT NULL
                ) STRICT""",
                f"CREATE INDEX {_quote(name + '__owner')} ON {docs} (owner_id)",
                f"CREATE INDEX {_quote(name + '__video')} ON {docs} (video_id)",
                f"""CREATE VIRTUAL TABLE {fts} USING fts5(
                    {text}, content={docs}, content_rowid=rid, tokenize='porter unicode61 remove_diacritics 2'
                )""",
                # External-content FTS5 is kept in step by triggers (the SQLite manual's recipe).
                f"""CREATE TRIGGER {_quote(name + "__ai")} AFTER INSERT ON {docs} BEGIN
                    INSERT INTO {fts} (rowid, {text}) VALUES (new.rid, {new});
                END""",
                f"""CREATE TRIGGER {_quote(name + "__ad")} AFTER DELETE ON {docs} BEGIN
                    INSERT INTO {fts} ({fts}, rowid, {text}) VALUES ('delete', old.rid, {old});
                END""",
                f"""CREATE TRIGGER {_quote(name + "__au")} AFTER UPDATE ON {docs} BEGIN
                    INSERT INTO {fts} ({fts}, rowid, {text}) VALUES ('delete', old.rid, {old});
                    INSERT INTO {fts} (rowid, {text}) VALUES (new.rid, {new});
                END""",
            ):
                conn.execute(statement)
            conn.execute("INSERT INTO heimdex_indexes VALUES (?, ?, ?)", (name, prefix, version))
            conn.execute("DELETE FROM heimdex_index_ids WHERE name = ?", (name,))  # a stale one: a new index
            self._give_identity(conn, name)

    def write(self, name: str, docs: list[dict[str, Any]]) -> dict[str, ItemFailure]:
        """One transaction; an item the table rejects fails alone, a locked file fails them all (retryable)."""
        cols = ", ".join((*_COLUMNS, "document"))
        updates = ", ".join(f"{c} = excluded.{c}" for c in (*_COLUMNS[1:], "document"))
        sql = (
            f"INSERT INTO {_quote(name)} ({cols}) VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})"
            f" ON CONFLICT (scene_id) DO UPDATE SET {updates}"
        )
        failures: dict[str, ItemFailure] = {}
        try:
            with self._connect() as conn:
                if not self._exists(conn, name):
                    raise SearchIndexError(f"{self.describe()}: no index {name}")
                for doc in docs:
                    doc_id = document_id(doc)
                    unknown = set(doc) - set(DOCUMENT_FIELDS)
                    if unknown:  # as OpenSearch's strict mapping does
                        failures[doc_id] = ItemFailure(f"unknown field(s) {', '.join(sorted(unknown))}", False)
                        continue
                    row = _sqlite_row(doc)
                    conn.execute("SAVEPOINT item")
                    try:
                        conn.execute(sql, row)
                        conn.execute("RELEASE item")
                    except sqlite3.IntegrityError as exc:  # e.g. a non-integer scene_index in the STRICT table
                        conn.execute("ROLLBACK TO item")
                        conn.execute("RELEASE item")
                        failures[doc_id] = ItemFailure(f"rejected: {exc}", False)
        except SqliteBusyError as exc:  # another writer held the file past the timeout
            return {document_id(d): ItemFailure(str(exc), True) for d in docs}
        return failures

    def refresh(self, name: str) -> None:
        """Committed writes are visible at once."""

    def delete(self, names: list[str], video_ids: list[str], keep_ids: list[str]) -> int:
        deleted = 0
        with self._connect() as conn:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS del_videos (id TEXT PRIMARY KEY)")
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS keep_scenes (id TEXT PRIMARY KEY)")
            conn.executemany("INSERT OR IGNORE INTO del_videos VALUES (?)", [(v,) for v in video_ids])
            conn.executemany("INSERT OR IGNORE INTO keep_scenes VALUES (?)", [(s,) for s in keep_ids])
            for name in names:
                if self._exists(conn, name):
                    deleted += conn.execute(
                        f"DELETE FROM {_quote(name)} WHERE video_id IN (SELECT id FROM del_videos)"
                        " AND scene_id NOT IN (SELECT id FROM keep_scenes)"
                    ).rowcount
        return deleted

    def set_alias(self, alias: str, name: str) -> None:
        with self._connect() as conn:
            if not self._exists(conn, name):
                raise SearchIndexError(f"cannot activate {name} in {self.describe()}: no such index")
            conn.execute(
                "INSERT INTO heimdex_aliases VALUES (?, ?) ON CONFLICT (alias) DO UPDATE SET name = excluded.name",
                (alias, name),
            )

    def _target(self, conn: sqlite3.Connection, alias: str) -> str | None:
        row = conn.execute("SELECT name FROM heimdex_aliases WHERE alias = ?", (alias,)).fetchone()
        return row[0] if row else None

    def alias_target(self, alias: str) -> str | None:
        with self._connect(write=False) as conn:
            return self._target(conn, alias)

    def versions(self, prefix: str) -> list[str]:
        with self._connect(write=False) as conn:
            return [r[0] for r in conn.execute("SELECT version FROM heimdex_indexes WHERE prefix = ?", (prefix,))]

    def drop(self, name: str) -> None:
        with self._connect() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {_quote(name + '__fts')}")
            conn.execute(f"DROP TABLE IF EXISTS {_quote(name)}")  # its indexes and triggers go with it
            conn.execute("DELETE FROM heimdex_indexes WHERE name = ?", (name,))
            conn.execute("DELETE FROM heimdex_index_ids WHERE name = ?", (name,))

    def search(self, alias: str, owner_id: str, query: str, limit: int, video_ids: list[str] | None) -> list[Hit]:
        terms = re.findall(r"\w+", query.lower())
        if not terms:
            return []
        # Any of the words, as OpenSearch's match query does; quoted so none is read as FTS5 syntax.
        match = " OR ".join(f'"{t}"' for t in dict.fromkeys(terms))
        with self._connect(write=False) as conn:
            name = self._target(conn, alias)
            if name is None:
                return []
            docs, fts = _quote(name), _quote(f"{name}__fts")
            where, params = "d.owner_id = ?", [match, owner_id]
            if video_ids is not None:
                where += f" AND d.video_id IN ({', '.join('?' * len(video_ids))})"
                params += video_ids
            rows = conn.execute(
                f"SELECT d.scene_id, d.video_id, -bm25({fts}) AS score,"
                f" snippet({fts}, -1, '{HIGHLIGHT[0]}', '{HIGHLIGHT[1]}', '…', 24)"
                f" FROM {fts} JOIN {docs} d ON d.rid = {fts}.rowid"
                f" WHERE {fts} MATCH ? AND {where} ORDER BY score DESC, d.scene_id LIMIT ?",
                [*params, limit],
            ).fetchall()
        return [Hit(scene_id, video_id, float(score), snippet or "") for scene_id, video_id, score, snippet in rows]

    def count(self, name: str, owner_id: str | None) -> int:
        with self._connect(write=False) as conn:
            if not self._exists(conn, name):
                return 0
            if owner_id is None:
                return conn.execute(f"SELECT count(*) FROM {_quote(name)}").fetchone()[0]
            return conn.execute(f"SELECT count(*) FROM {_quote(name)} WHERE owner_id = ?", (owner_id,)).fetchone()[0]

    def get(self, name: str, ids: list[str]) -> dict[str, dict[str, Any]]:
        with self._connect(write=False) as conn:
            if not self._exists(conn, name):
                return {}
            marks = ", ".join("?" * len(ids))
            rows = conn.execute(f"SELECT scene_id, document FROM {_quote(name)} WHERE scene_id IN ({marks})", ids)
            return {scene_id: json.loads(document) for scene_id, document in rows}


def _sqlite_row(doc: dict[str, Any]) -> tuple:
    """The table row of a document: its fields (tags as lines of text for FTS5) and the document itself."""
    values = {c: doc.get(c) for c in _COLUMNS}
    values["tags"] = "\n".join(doc.get("tags") or ())
    for c in ("scene_id", "owner_id", "video_id"):
        values[c] = str(values[c]) if values[c] is not None else None
    return (*values.values(), json.dumps(doc, ensure_ascii=False))
