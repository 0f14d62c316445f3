"""The one versioned-SQLite opener (fieldreid.storage.sqlite) and its two users: gallery and results database."""
from __future__ import annotations

import sqlite3

import pytest

from fieldreid.errors import FieldreidError
from fieldreid.gallery import Gallery
from fieldreid.gallery import schema as gallery_schema
from fieldreid.storage.sqlite import Schema, open_db
from fieldreid.watch.state import StateDB, StateError


class ToyError(FieldreidError):
    pass


def _toy(migrations) -> Schema:
    return Schema(kind="toy file", short="toy", application_id=0x544F5931, migrations=migrations, error=ToyError,
                  where="check the path", restore="restore it")


def _tables(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_migrations_run_in_order_once_and_a_newer_file_is_refused(tmp_path):
    path = tmp_path / "toy.db"
    seen = []
    v1 = ["CREATE TABLE a (x INTEGER)", "PRAGMA application_id = 1414486321"]
    con = open_db(path, _toy([v1]), on_create=lambda c: seen.append("create"))
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    assert str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"
    con.close()
    v2 = [lambda c: seen.append("v2"), "CREATE TABLE b (y INTEGER)"]
    for _ in range(2):  # the second open finds nothing to do
        con = open_db(path, _toy([v1, v2]), on_create=lambda c: seen.append("create"))
        assert _tables(con) == {"a", "b"} and con.execute("PRAGMA user_version").fetchone()[0] == 2
        con.close()
    assert seen == ["create", "v2"]
    with pytest.raises(ToyError, match="newer fieldreid .toy schema 2; this version knows up to 1"):
        open_db(path, _toy([v1]))


def test_a_failed_migration_leaves_the_file_at_its_old_version(tmp_path):
    path = tmp_path / "toy.db"
    v1 = ["CREATE TABLE a (x INTEGER)", "PRAGMA application_id = 1414486321"]
    open_db(path, _toy([v1])).close()
    with pytest.raises(ToyError, match="Cannot prepare toy"):
        open_db(path, _toy([v1, ["CREATE TABLE b (y INTEGER)", "CREATE TABLE b (z INTEGER)"]]))
    con = open_db(path, _toy([v1]))
    assert _tables(con) == {"a"} and con.execute("PRAGMA user_version").fetchone()[0] == 1


def test_other_files_are_refused_with_their_bytes_unchanged(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 10)
    with pytest.raises(ToyError, match="not a toy file .not a SQLite database.*check the path"):
        open_db(garbage, _toy([["CREATE TABLE a (x INTEGER)"]]))
    assert garbage.read_bytes() == b"not a database at all" * 10
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = other.read_bytes()
    with pytest.raises(ToyError, match="a SQLite database but not a toy file"):
        open_db(other, _toy([["CREATE TABLE a (x INTEGER)"]]))
    assert other.read_bytes() == before


def test_results_database_uses_the_same_checks(tmp_path):
    """A gallery given as the watch output, or a damaged results.db, is refused by the shared opener."""
    out = tmp_path / "out"
    out.mkdir()
    with Gallery(out / "results.db") as g:
        g.add_identity("zebra-1", "zebra")
    with pytest.raises(StateError, match="not a fieldreid results database.*another --out"):
        StateDB(out / "results.db")
    state = StateDB(tmp_path / "results.db")
    state.close()
    data = (tmp_path / "results.db").read_bytes()
    (tmp_path / "results.db").write_bytes(data[:150])  # cut inside the first page
    with pytest.raises(StateError, match="truncated or damaged.*move it aside"):
        StateDB(tmp_path / "results.db")
    assert (tmp_path / "results.db").read_bytes() == data[:150]


def test_a_new_gallery_holds_the_sync_tables_from_its_own_migrations(tmp_path):
    with Gallery(tmp_path / "g.db") as g:
        names = {r[0] for r in g.read("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"sync_state", "sync_outbox", "sync_chunks", "sync_field_ids"} <= names
        assert g.schema_version == gallery_schema.SCHEMA_VERSION >= 3


def test_v2_gallery_with_tables_made_by_an_old_sync_migrates_to_v3_keeping_them(tmp_path):
    """Before v3 sync created its tables itself, and early ones lack ``sync_chunks.rejected``."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path, isolation_level=None)
    for version in (0, 1):
        for step in gallery_schema.MIGRATIONS[version]:
            step(con) if callable(step) else con.execute(step)
    con.execute("PRAGMA user_version = 2")
    con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("version", "0"), ("structure", "0"), ("storage", "float32"), ("created", "x")])
    con.execute("CREATE TABLE sync_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("INSERT INTO sync_state VALUES ('gallery_uid', 'abc')")
    con.execute("CREATE TABLE sync_chunks (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, n INTEGER NOT NULL, "
                "created TEXT)")
    con.execute("INSERT INTO sync_chunks (key, seq, n) VALUES ('k1', 1, 5)")
    con.close()
    with Gallery(path) as g:
        assert g.schema_version == gallery_schema.SCHEMA_VERSION  # v3 and every later step applied
        assert g.read("SELECT value FROM sync_state WHERE key = 'gallery_uid'").fetchone()[0] == "abc"
        assert g.read("SELECT key, n, rejected FROM sync_chunks").fetchall() == [("k1", 5, None)]
        assert g.read("SELECT count(*) FROM sync_outbox").fetchone()[0] == 0


def test_decisions_and_file_states_are_stored_as_the_plain_words(tmp_path):
    """StrEnums in code, the same words on disk: files written before the enums read the same."""
    from fieldreid.types import DecisionKind, FileState

    assert list(DecisionKind) == ["known", "new", "uncertain"]
    assert list(FileState) == ["pending", "done", "failed", "duplicate"]
    state = StateDB(tmp_path / "results.db")
    try:
        with state.transaction() as con:
            state.upsert_file(con, "cam/a.jpg", "cam", 1, 2, FileState.DUPLICATE)
        assert state.con.execute("SELECT status, typeof(status) FROM files").fetchone() == ("duplicate", "text")
        assert state.counts() == {"pending": 0, "done": 0, "failed": 0, "duplicate": 1}
    finally:
        state.close()
