"""sql.query: results and types, read-only enforcement, limits, time limit, grants, and a database file
replaced by atomic rename while in use."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from tests.edge import wire
from tests.edge.conftest import make_products
from wasm_gateway.edge import EdgeData, ErrorCode, SqlDatabaseConfig
from wasm_gateway.exceptions import ConfigError


def query_fn(path: Path, **limits: int) -> object:
    edge = EdgeData(None, {}, {"shop": SqlDatabaseConfig(name="shop", path=path, **limits)})
    return edge.functions("f", sql=("shop",))["sql.query"]


def test_rows_and_types(products_db: Path) -> None:
    q = query_fn(products_db)
    columns, rows = wire.rows(q(wire.sql_query("shop", "SELECT * FROM products WHERE id = ?", 7)))
    assert columns == ["id", "name", "price", "image", "note"]
    assert rows == [(7, "product 7", 10.5, b"\x07\x07\x07", None)]
    columns, rows = wire.rows(
        q(wire.sql_query("shop", "SELECT ?, ?, ?, ?, ?", None, -(2**63), 0.25, "é", b"\x00\xff"))
    )
    assert rows == [(None, -(2**63), 0.25, "é", b"\x00\xff")]
    _, rows = wire.rows(q(wire.sql_query("shop", "SELECT id FROM products WHERE id > 1000")))
    assert rows == []
    _, rows = wire.rows(
        q(
            wire.sql_query(
                "shop", "WITH t(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM t WHERE x < 3) SELECT x FROM t"
            )
        )
    )
    assert rows == [(1,), (2,), (3,)]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO products (id, name) VALUES (1000, 'x')",
        "UPDATE products SET name = 'x'",
        "DELETE FROM products",
        "DROP TABLE products",
        "CREATE TABLE t (x)",
        "ATTACH DATABASE ':memory:' AS other",
        "PRAGMA query_only = 0",
        "PRAGMA journal_mode = DELETE",
        "BEGIN IMMEDIATE",
        "WITH t AS (SELECT 1) DELETE FROM products",
        "VACUUM",
    ],
)
def test_only_reads_are_accepted(products_db: Path, sql: str) -> None:
    q = query_fn(products_db)
    code, reason = wire.error(q(wire.sql_query("shop", sql)))
    assert code == ErrorCode.DENIED, reason
    _, rows = wire.rows(q(wire.sql_query("shop", "SELECT count(*) FROM products")))
    assert rows == [(100,)]


def test_errors(products_db: Path) -> None:
    q = query_fn(products_db)
    for sql, params, expected in [
        ("SELEC 1", (), "syntax error"),
        ("SELECT * FROM missing", (), "no such table"),
        ("SELECT ?", (), "bindings"),
        ("SELECT 1; SELECT 2", (), "one statement"),
    ]:
        code, reason = wire.error(q(wire.sql_query("shop", sql, *params)))
        assert code == ErrorCode.BAD_REQUEST and expected in reason, reason
    code, reason = wire.error(q(wire.sql_query("shop", "SELECT 1")[:-2]))
    assert code == ErrorCode.BAD_REQUEST and "arguments end inside" in reason
    code, reason = wire.error(q(b"\x01" + wire.b("shop") + wire.b("SELECT ?") + b"\x01\x00\x00\x00\x09"))
    assert code == ErrorCode.BAD_REQUEST and "unknown value type 9" in reason


def test_grants(products_db: Path, tmp_path: Path) -> None:
    other = make_products(tmp_path / "other.db", rows=1)
    edge = EdgeData(
        None,
        {},
        {
            "shop": SqlDatabaseConfig(name="shop", path=products_db),
            "other": SqlDatabaseConfig(name="other", path=other),
        },
    )
    q = edge.functions("f", sql=("shop",))["sql.query"]
    assert wire.rows(q(wire.sql_query("shop", "SELECT 1")))[1] == [(1,)]
    code, reason = wire.error(q(wire.sql_query("other", "SELECT 1")))
    assert code == ErrorCode.DENIED and "database 'other' is not granted to filter 'f'" in reason
    code, reason = wire.error(q(wire.sql_query("nope", "SELECT 1")))
    assert code == ErrorCode.DENIED and "no database 'nope' is declared" in reason
    edge.close()
    with pytest.raises(ConfigError, match=r"sql\.gone\.path: .* does not exist"):
        EdgeData(None, {}, {"gone": SqlDatabaseConfig(name="gone", path=tmp_path / "gone.db")})


def test_limits_and_time_limit(products_db: Path) -> None:
    q = query_fn(products_db, max_rows=10, max_bytes=200, timeout_ms=30)
    assert len(wire.rows(q(wire.sql_query("shop", "SELECT id FROM products LIMIT 10")))[1]) == 10
    code, reason = wire.error(q(wire.sql_query("shop", "SELECT id FROM products LIMIT 11")))
    assert code == ErrorCode.LIMIT and "more than sql.shop.max_rows (10) rows" in reason
    code, reason = wire.error(q(wire.sql_query("shop", "SELECT ?", "x" * 300)))
    assert code == ErrorCode.LIMIT and "max_bytes (200)" in reason
    for sql in ("SELECT zeroblob(1000000000)", "SELECT randomblob(1000000000)"):
        code, reason = wire.error(q(wire.sql_query("shop", sql)))  # refused before a gigabyte is allocated
        assert code == ErrorCode.LIMIT and "too big" in reason, reason
    endless = "WITH RECURSIVE t(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM t) SELECT count(*) FROM t"
    code, reason = wire.error(q(wire.sql_query("shop", endless)))
    assert code == ErrorCode.TIMEOUT and "timeout_ms (30)" in reason
    assert wire.rows(q(wire.sql_query("shop", "SELECT 1")))[1] == [(1,)]  # the connection is still good


def test_replaced_by_atomic_rename_is_reopened(products_db: Path, tmp_path: Path) -> None:
    edge = EdgeData(None, {}, {"shop": SqlDatabaseConfig(name="shop", path=products_db)})
    q = edge.functions("f", sql=("shop",))["sql.query"]
    assert wire.rows(q(wire.sql_query("shop", "SELECT count(*) FROM products")))[1] == [(100,)]
    fresh = make_products(tmp_path / "next.db", rows=3)
    os.replace(fresh, products_db)
    assert wire.rows(q(wire.sql_query("shop", "SELECT count(*) FROM products")))[1] == [(3,)]
    assert edge.databases["shop"].reopened == 1
    os.unlink(products_db)
    code, reason = wire.error(q(wire.sql_query("shop", "SELECT 1")))
    assert code == ErrorCode.UNAVAILABLE and "No such file" in reason
    make_products(products_db, rows=2)
    assert wire.rows(q(wire.sql_query("shop", "SELECT count(*) FROM products")))[1] == [(2,)]
    edge.close()


def test_a_wal_database_is_read_while_written(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.execute("INSERT INTO t VALUES (1)")
    q = query_fn(path)
    assert wire.rows(q(wire.sql_query("shop", "SELECT count(*) FROM t")))[1] == [(1,)]
    writer.execute("INSERT INTO t VALUES (2)")
    assert wire.rows(q(wire.sql_query("shop", "SELECT count(*) FROM t")))[1] == [(2,)]
    writer.close()


def test_check_names_a_missing_database(products_db: Path, tmp_path: Path) -> None:
    from wasm_gateway.config import parse_config
    from wasm_gateway.filtering import check_filters

    text = f'[sql.shop]\npath = "{products_db}"\n[sql.gone]\npath = "gone.db"\n'
    config = parse_config(text, source="gateway.toml", base_dir=tmp_path, env={})
    assert check_filters(config) == [
        f"gateway.toml: sql.gone.path: {tmp_path / 'gone.db'} does not exist (a database is opened read-only: "
        "create it first)"
    ]
