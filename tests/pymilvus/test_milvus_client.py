#!/usr/bin/env python3
"""pymilvus's `MilvusClient`, unchanged, against a Milvus-compatible server.

The server is Vectorflow's `milvus.proto.milvus.MilvusService` (`vectorflow
serve`, `--uri http://HOST:PORT`), or real Milvus through milvus-lite
(`--uri /tmp/some/dir/milvus.db`), which checks the suite's own expectations.
Every call goes through `pymilvus.MilvusClient` and carries a `timeout=`, so
a server that makes pymilvus retry (it retries UNAVAILABLE, UNKNOWN and
INTERNAL for minutes) fails fast instead of hanging.

With `--vectorflow-bin PATH --vectorflow-addr HOST:PORT` the suite also asks
the same server through the `vectorflow.v1` API (the binary's `search` and
`query` client commands) and compares the answers with pymilvus's.

Plain `unittest`; run it as a program:

    python tests/pymilvus/test_milvus_client.py --uri http://127.0.0.1:19530 \
        [--vectorflow-bin target/debug/vectorflow --vectorflow-addr 127.0.0.1:19530]

It prints a summary and exits non-zero on any failure.

Where milvus-lite falls short of real Milvus (no HNSW, no nullable fields,
default values that misalign the column, no load/release enforcement), the
suite adapts on milvus-lite only; those places say so in a comment marked
`milvus-lite:`. Everything else follows real Milvus's observable behaviour.
"""

import argparse
import json
import logging
import math
import random
import struct
import subprocess
import sys
import time
import unittest

from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client.types import LoadState

# pymilvus logs every failed call with a traceback at ERROR level; the error
# tests fail calls on purpose, and their tracebacks would bury the summary.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)

# ---- configuration (set by main) ----

URI = ""
LITE = False  # the target is milvus-lite (a local `.db` path)
VF_BIN = None  # the vectorflow binary, for the vectorflow.v1 comparisons
VF_ADDR = None
PREFIX = "pmt"

# Every call's deadline (s). pymilvus bounds its retry loop by it too.
T = 20.0
# An error must come back within this many seconds (not after a retry loop).
ERROR_WITHIN = 5.0
# Past this many seconds every remaining test fails at once: a server that
# hangs calls would otherwise cost T per call (the suite takes ~10 s).
BUDGET = 200.0
STARTED = time.monotonic()

DIM = 8
ROWS = 300
SEED = 20240611

# The shared client and what the tests wrote (the reference for exact answers).
CLIENT = None
STATE = {}
# Calls that ran into their deadline: after one, the rest of the suite fails at once.
HUNG = []


def name(suffix):
    return f"{PREFIX}_{suffix}"


QUICK = "quick"
FULL = "full"
INDEXED_LATER = "index_later"
STRONG = "strong"
SCRATCH = "scratch"
HYBRID = "hybrid"
PARTS = "parts"
MISSING = "no_such_collection"


class Watchdog:
    """The client, noting any call that runs into its deadline (a server that
    hangs, or makes pymilvus retry until the deadline)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, attr):
        target = getattr(self._inner, attr)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            started = time.monotonic()
            try:
                return target(*args, **kwargs)
            except Exception as error:
                elapsed = time.monotonic() - started
                if elapsed >= 0.9 * T or "Retry timeout" in str(error):
                    HUNG.append(f"{attr} took {elapsed:.1f}s: {error}")
                raise

        return call


def client():
    return CLIENT


# ---- exact reference ----


def f32(values):
    """The values as the server stores them (float32)."""
    return list(struct.unpack(f"{len(values)}f", struct.pack(f"{len(values)}f", *values)))


def score(metric, q, v):
    """Milvus's score: squared L2 distance, inner product, or cosine similarity."""
    q, v = f32(q), f32(v)
    if metric == "L2":
        return sum((a - b) ** 2 for a, b in zip(q, v))
    dot = sum(a * b for a, b in zip(q, v))
    if metric == "IP":
        return dot
    norm = math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in v))
    return dot / norm if norm else 0.0


def reference(metric, rows, q, limit, offset=0, where=None):
    """The exact top `limit` after `offset` as (score, id), best first."""
    scored = [(score(metric, q, r["vector"]), pk) for pk, r in rows.items() if where is None or where(r)]
    if metric == "L2":
        scored.sort(key=lambda s: (s[0], s[1]))
    else:
        scored.sort(key=lambda s: (-s[0], s[1]))
    return scored[offset : offset + limit]


def close(a, b, rel=1e-3, abs_=1e-4):
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def random_vector(rnd):
    return [rnd.uniform(-1.0, 1.0) for _ in range(DIM)]


def count_of(result):
    """`count(*)` out of a query answer: [{'count(*)': n}]."""
    rows = list(result)
    assert len(rows) == 1 and "count(*)" in rows[0], f"not a count(*) answer: {rows!r}"
    return rows[0]["count(*)"]


def deleted_count(result):
    """A delete's count. Milvus (2.3.2 and later) returns {'delete_count': n};
    milvus-lite still returns the deleted keys as a list (the old form pymilvus
    keeps for compatibility)."""
    if isinstance(result, list):
        # Only milvus-lite answers this way; a server must give the count.
        assert LITE, f"a delete answered with keys {result}, not {{'delete_count': n}}"
        return len(result)
    return result["delete_count"]


def expect_error(test, call, what):
    """`call()` must raise MilvusException quickly (not via a retry loop)."""
    started = time.monotonic()
    try:
        result = call()
    except MilvusException as error:
        elapsed = time.monotonic() - started
        test.assertLess(elapsed, ERROR_WITHIN, f"{what}: the error took {elapsed:.1f}s ({error})")
        test.assertNotIn("Retry timeout", str(error.message), f"{what}: pymilvus retried until its deadline")
        test.assertNotIn("Retry run out", str(error.message), f"{what}: pymilvus retried until it gave up")
        return error
    test.fail(f"{what}: expected MilvusException, got {result!r}")
    return None


def check_budget():
    if HUNG:
        raise AssertionError(f"not run: an earlier call hung ({HUNG[0]})")
    elapsed = time.monotonic() - STARTED
    if elapsed > BUDGET:
        raise AssertionError(f"the suite's budget of {BUDGET:.0f}s is spent ({elapsed:.0f}s): is the server hanging?")


class Base(unittest.TestCase):
    maxDiff = 4000

    @classmethod
    def setUpClass(cls):
        check_budget()

    def setUp(self):
        check_budget()

    def check_hits(self, metric, rows, q, hits, limit, offset=0, where=None, label=""):
        """`hits` (one query's answer) must be the exact answer: the scores in
        order within tolerance, every hit's score the true score of its row,
        and the ids the exact ones except among ties."""
        expected = reference(metric, rows, q, limit, offset, where)
        got = [(h["distance"], h["id"]) for h in hits]
        self.assertEqual(len(got), len(expected), f"{label}: {len(got)} hits, expected {len(expected)}: {got}")
        self.assertEqual(len({pk for _, pk in got}), len(got), f"{label}: repeated ids {got}")
        for i, ((s, pk), (es, epk)) in enumerate(zip(got, expected)):
            self.assertTrue(close(s, es), f"{label}: hit {i} score {s} (id {pk}), expected {es} (id {epk})")
            self.assertIn(pk, rows, f"{label}: hit {i} id {pk} is not a live row")
            if where is not None:
                self.assertTrue(where(rows[pk]), f"{label}: hit {i} id {pk} does not pass the filter")
            true = score(metric, q, rows[pk]["vector"])
            self.assertTrue(close(s, true), f"{label}: hit {i} id {pk} has score {s}, its true score is {true}")
        # Ids may differ only among equal scores.
        boundary = {epk for es, epk in expected if close(es, expected[-1][0])} if expected else set()
        missing = {epk for _, epk in expected} - {pk for _, pk in got} - boundary
        self.assertFalse(missing, f"{label}: ids {sorted(missing)} are missing from {got}")
        better = (lambda a, b: a <= b) if metric == "L2" else (lambda a, b: a >= b)
        for (a, _), (b, _) in zip(got, got[1:]):
            self.assertTrue(better(a, b) or close(a, b), f"{label}: hits out of order: {got}")
        return got

    def assert_not_exist_state(self, collection):
        """Milvus answers GetLoadState of a missing collection with success and
        LoadStateNotExist (pymilvus: {'state': LoadState.NotExist}), not an error."""
        try:
            state = client().get_load_state(collection, timeout=T)["state"]
        except MilvusException as error:
            self.fail(f"get_load_state({collection!r}) raised {error}; Milvus answers state NotExist")
        self.assertEqual(state, LoadState.NotExist)


# ---- quick collection: COSINE, dynamic fields ----


class T01QuickCollection(Base):
    """`create_collection(name, dimension=8)`: id + vector, dynamic fields, COSINE."""

    @classmethod
    def setUpClass(cls):
        check_budget()
        c = client()
        cls.name = name(QUICK)
        c.drop_collection(cls.name, timeout=T)
        c.create_collection(cls.name, dimension=DIM, timeout=T)
        rnd = random.Random(SEED + 1)
        rows = {}
        for i in range(ROWS):
            row = {"id": i, "vector": random_vector(rnd), "color": ["red", "green", "blue"][i % 3]}
            if i % 5:
                row["n"] = i % 10
            if i % 50 == 0:
                row["extra"] = {"i": i, "tags": ["a", "b"]}
            rows[i] = row
        cls.insert_result = c.insert(cls.name, list(rows.values()), timeout=T)
        cls.rows = rows
        STATE["quick"] = rows
        cls.rnd = random.Random(SEED + 2)

    def test_01_describe(self):
        d = client().describe_collection(self.name, timeout=T)
        self.assertEqual(d["collection_name"], self.name)
        self.assertTrue(d["enable_dynamic_field"])
        self.assertFalse(d["auto_id"])
        # The dynamic field ($meta) is not listed among the fields.
        fields = [(f["name"], f["type"]) for f in d["fields"]]
        self.assertEqual(fields, [("id", DataType.INT64), ("vector", DataType.FLOAT_VECTOR)])
        self.assertTrue(d["fields"][0].get("is_primary"))
        self.assertEqual(d["fields"][1]["params"].get("dim"), DIM)
        if not LITE:
            # pymilvus sends Bounded (its default) and Milvus keeps it;
            # milvus-lite: always reports Strong.
            self.assertEqual(d["consistency_level_name"], "Bounded")

    def test_02_index_is_autoindex_cosine(self):
        c = client()
        self.assertEqual(c.list_indexes(self.name, timeout=T), ["vector"])
        index = c.describe_index(self.name, "vector", timeout=T)
        self.assertIsNotNone(index)
        self.assertEqual(index["index_type"], "AUTOINDEX")
        self.assertEqual(index["metric_type"], "COSINE")
        self.assertEqual(index["field_name"], "vector")
        self.assertEqual(index["index_name"], "vector")
        self.assertEqual(index["state"], "Finished")

    def test_03_loaded(self):
        state = client().get_load_state(self.name, timeout=T)
        self.assertEqual(state["state"], LoadState.Loaded)

    def test_04_insert_result(self):
        self.assertEqual(self.insert_result["insert_count"], ROWS)
        self.assertEqual(list(self.insert_result["ids"]), list(range(ROWS)))

    def test_05_search_single(self):
        q = random_vector(self.rnd)
        res = client().search(self.name, [q], limit=10, timeout=T)
        self.assertEqual(len(res), 1)
        self.check_hits("COSINE", self.rows, q, res[0], 10, label="single")
        for hit in res[0]:
            self.assertEqual(hit["entity"], {}, "no output fields asked, none given")

    def test_06_search_batch_with_offset(self):
        qs = [random_vector(self.rnd) for _ in range(3)]
        res = client().search(self.name, qs, limit=5, search_params={"offset": 3, "params": {"ef": 64}}, timeout=T)
        self.assertEqual(len(res), 3)
        for i, q in enumerate(qs):
            self.check_hits("COSINE", self.rows, q, res[i], 5, offset=3, label=f"batch query {i}")

    def test_07_search_filter_on_dynamic_field(self):
        qs = [random_vector(self.rnd) for _ in range(3)]
        res = client().search(
            self.name, qs, limit=7, filter='color == "red"', output_fields=["color", "n"], timeout=T
        )
        self.assertEqual(len(res), 3)
        for i, q in enumerate(qs):
            self.check_hits("COSINE", self.rows, q, res[i], 7, where=lambda r: r["color"] == "red", label=f"q{i}")
            for hit in res[i]:
                row = self.rows[hit["id"]]
                expected = {k: row[k] for k in ("color", "n") if k in row}
                self.assertEqual(dict(hit["entity"]), expected, f"hit {hit['id']}")

    def test_08_search_numeric_dynamic_filter(self):
        q = random_vector(self.rnd)
        res = client().search(self.name, [q], limit=10, filter="n > 3", output_fields=["n"], timeout=T)
        got = self.check_hits("COSINE", self.rows, q, res[0], 10, where=lambda r: r.get("n", -1) > 3)
        self.assertTrue(all(h["entity"]["n"] > 3 for h in res[0]), got)

    def test_09_query_dynamic_fields(self):
        res = client().query(self.name, filter='color == "red" and n > 3', output_fields=["color", "n"], timeout=T)
        expected = {pk for pk, r in self.rows.items() if r["color"] == "red" and r.get("n", -1) > 3}
        self.assertEqual({r["id"] for r in res}, expected)
        for r in res:
            self.assertEqual(r["color"], "red")
            self.assertEqual(r["n"], self.rows[r["id"]]["n"])

    def test_10_query_star_returns_vector_and_dynamic_keys(self):
        res = client().query(self.name, filter="id in [0, 50, 51]", output_fields=["*"], timeout=T)
        by_id = {r["id"]: r for r in res}
        self.assertEqual(set(by_id), {0, 50, 51})
        for pk, r in by_id.items():
            row = self.rows[pk]
            self.assertEqual(len(r["vector"]), DIM)
            for key in ("color", "n", "extra"):
                if key in row:
                    self.assertEqual(r[key], row[key], f"id {pk} {key}")
                else:
                    self.assertNotIn(key, r, f"id {pk} has no {key}")

    def test_10b_cosine_vectors_come_back_normalised(self):
        # A documented Vectorflow difference: a COSINE field stores its
        # vectors normalised (Milvus returns them as inserted), so the
        # returned vector is the inserted one's direction at unit length.
        res = client().get(self.name, ids=[3, 4], output_fields=["vector"], timeout=T)
        self.assertEqual(sorted(r["id"] for r in res), [3, 4])
        for r in res:
            inserted = f32(self.rows[r["id"]]["vector"])
            if LITE:
                want = inserted
            else:
                norm = math.sqrt(sum(x * x for x in inserted))
                want = [x / norm for x in inserted]
            same = all(close(a, b, 1e-5, 1e-5) for a, b in zip(r["vector"], want))
            self.assertTrue(same, f"id {r['id']}: got {r['vector']}, expected {want}")

    def test_11_count(self):
        c = client()
        self.assertEqual(count_of(c.query(self.name, output_fields=["count(*)"], timeout=T)), ROWS)
        blue = sum(1 for r in self.rows.values() if r["color"] == "blue")
        got = c.query(self.name, filter='color == "blue"', output_fields=["count(*)"], timeout=T)
        self.assertEqual(count_of(got), blue)

    def test_12_get(self):
        res = client().get(self.name, ids=[1, 2, 50, 999999], timeout=T)
        self.assertEqual(sorted(r["id"] for r in res), [1, 2, 50])
        for r in res:
            self.assertEqual(r["color"], self.rows[r["id"]]["color"])
            self.assertEqual(len(r["vector"]), DIM)

    def test_13_delete_by_filter_on_dynamic_field(self):
        c = client()
        green = [pk for pk, r in self.rows.items() if r["color"] == "green"]
        result = c.delete(self.name, filter='color == "green"', timeout=T)
        self.assertEqual(deleted_count(result), len(green))
        for pk in green:
            del self.rows[pk]
        self.assertEqual(count_of(c.query(self.name, output_fields=["count(*)"], timeout=T)), len(self.rows))
        q = random_vector(self.rnd)
        res = c.search(self.name, [q], limit=10, output_fields=["color"], timeout=T)
        self.check_hits("COSINE", self.rows, q, res[0], 10, label="after delete")
        self.assertTrue(all(h["entity"]["color"] != "green" for h in res[0]))


# ---- full schema: every scalar type, JSON, nullable, default, HNSW L2 ----


class T02FullSchema(Base):
    """`create_schema` + `add_field` + `prepare_index_params` (HNSW, L2) in one `create_collection`."""

    @classmethod
    def setUpClass(cls):
        check_budget()
        c = client()
        cls.name = name(FULL)
        c.drop_collection(cls.name, timeout=T)
        schema = MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description="full schema for the pymilvus suite"
        )
        schema.add_field("id", DataType.INT64, is_primary=True, description="primary key")
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM, description="embedding")
        schema.add_field("title", DataType.VARCHAR, max_length=64)
        schema.add_field("i32", DataType.INT32)
        schema.add_field("i64", DataType.INT64)
        schema.add_field("f32", DataType.FLOAT)
        schema.add_field("f64", DataType.DOUBLE)
        schema.add_field("flag", DataType.BOOL)
        schema.add_field("meta", DataType.JSON)
        # milvus-lite: "MilvusLite doesn't support nullable"; real Milvus does.
        cls.nullable = not LITE
        if cls.nullable:
            schema.add_field("note", DataType.VARCHAR, max_length=32, nullable=True)
        schema.add_field("rank", DataType.INT64, default_value=7)
        index_params = c.prepare_index_params()
        if LITE:
            # milvus-lite: "local mode only support FLAT IVF_FLAT AUTOINDEX".
            index_params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        else:
            index_params.add_index(
                field_name="vector", index_type="HNSW", metric_type="L2", params={"M": 16, "efConstruction": 200}
            )
        c.create_collection(cls.name, schema=schema, index_params=index_params, timeout=T)
        rnd = random.Random(SEED + 3)
        rows = {}
        for i in range(ROWS):
            row = {
                "id": i,
                "vector": random_vector(rnd),
                "title": f"title-{i}",
                "i32": i % 100,
                "i64": i * 1000 - 50000,
                "f32": i / 8,
                "f64": i / 3,
                "flag": i % 2 == 0,
                "meta": {"k": i % 5, "tag": f"t{i % 7}"},
            }
            if cls.nullable:
                row["note"] = None if i % 3 == 0 else f"note-{i}"
            # A missing value takes the default. milvus-lite: a row without the
            # field shifts the rest of the column (the compact column and
            # `valid_data` are misread), so there every row has it.
            if i % 4 or LITE:
                row["rank"] = i
            rows[i] = row
        cls.insert_result = c.insert(cls.name, list(rows.values()), timeout=T)
        cls.rows = rows
        STATE["full"] = rows
        cls.rnd = random.Random(SEED + 4)

    def expected_value(self, row, field):
        if field == "rank":
            return row.get("rank", 7)
        return row.get(field)

    def check_entity(self, pk, entity, fields):
        row = self.rows[pk]
        for field in fields:
            self.assertIn(field, entity, f"id {pk}: {field} missing from {entity}")
            got, want = entity[field], self.expected_value(row, field)
            if field in ("f32", "f64"):
                self.assertTrue(close(got, want, 1e-6, 1e-6), f"id {pk} {field}: {got} != {want}")
            elif field == "vector":
                self.assertTrue(all(close(a, b, 1e-6, 1e-6) for a, b in zip(got, want)), f"id {pk} vector")
            else:
                self.assertEqual(got, want, f"id {pk} {field}")

    def scalar_fields(self):
        fields = ["title", "i32", "i64", "f32", "f64", "flag", "meta", "rank"]
        return fields + (["note"] if self.nullable else [])

    def test_01_describe(self):
        d = client().describe_collection(self.name, timeout=T)
        self.assertEqual(d["collection_name"], self.name)
        self.assertEqual(d["description"], "full schema for the pymilvus suite")
        self.assertFalse(d["enable_dynamic_field"])
        self.assertFalse(d["auto_id"])
        types = {f["name"]: f["type"] for f in d["fields"]}
        expected = {
            "id": DataType.INT64,
            "vector": DataType.FLOAT_VECTOR,
            "title": DataType.VARCHAR,
            "i32": DataType.INT32,
            "i64": DataType.INT64,
            "f32": DataType.FLOAT,
            "f64": DataType.DOUBLE,
            "flag": DataType.BOOL,
            "meta": DataType.JSON,
            "rank": DataType.INT64,
        }
        if self.nullable:
            expected["note"] = DataType.VARCHAR
        self.assertEqual(types, expected)
        # In the order they were added.
        order = ["id", "vector", "title", "i32", "i64", "f32", "f64", "flag", "meta"]
        order += ["note", "rank"] if self.nullable else ["rank"]
        self.assertEqual([f["name"] for f in d["fields"]], order)
        by_name = {f["name"]: f for f in d["fields"]}
        self.assertTrue(by_name["id"].get("is_primary"))
        self.assertEqual(by_name["id"]["description"], "primary key")
        self.assertEqual(by_name["vector"]["description"], "embedding")
        self.assertEqual(by_name["vector"]["params"].get("dim"), DIM)
        self.assertEqual(by_name["title"]["params"].get("max_length"), 64)
        self.assertNotIn("is_primary", by_name["title"])
        if self.nullable:
            self.assertTrue(by_name["note"].get("nullable"))
            self.assertEqual(by_name["note"]["params"].get("max_length"), 32)
        self.assertNotIn("nullable", by_name["title"])
        # default_value is the schema's ValueField message.
        default = by_name["rank"].get("default_value")
        self.assertIsNotNone(default, by_name["rank"])
        self.assertEqual(default.long_data, 7)
        field_ids = [f["field_id"] for f in d["fields"]]
        self.assertEqual(len(set(field_ids)), len(field_ids), f"field ids repeat: {field_ids}")

    def test_02_describe_index(self):
        c = client()
        self.assertEqual(c.list_indexes(self.name, timeout=T), ["vector"])
        index = c.describe_index(self.name, "vector", timeout=T)
        self.assertIsNotNone(index)
        self.assertEqual(index["metric_type"], "L2")
        self.assertEqual(index["field_name"], "vector")
        self.assertEqual(index["index_name"], "vector")
        self.assertEqual(index["state"], "Finished")
        if LITE:
            self.assertEqual(index["index_type"], "FLAT")
        else:
            self.assertEqual(index["index_type"], "HNSW")
            # The build parameters come back as strings.
            self.assertEqual(str(index.get("M")), "16", index)
            self.assertEqual(str(index.get("efConstruction")), "200", index)

    def test_03_loaded_and_inserted(self):
        c = client()
        self.assertEqual(c.get_load_state(self.name, timeout=T)["state"], LoadState.Loaded)
        self.assertEqual(self.insert_result["insert_count"], ROWS)
        self.assertEqual(list(self.insert_result["ids"]), list(range(ROWS)))

    def test_04_flush_then_stats(self):
        c = client()
        c.flush(self.name, timeout=T)
        # Milvus's row_count can lag before a flush and counts deleted rows
        # until compaction; after a flush with no deletes it is exact.
        stats = c.get_collection_stats(self.name, timeout=T)
        self.assertEqual(stats["row_count"], ROWS, stats)

    def test_05_search_single_l2(self):
        q = random_vector(self.rnd)
        res = client().search(self.name, [q], limit=10, search_params={"params": {"ef": 64}}, timeout=T)
        self.check_hits("L2", self.rows, q, res[0], 10, label="L2 single")

    def test_06_search_batch_l2_with_offset(self):
        qs = [random_vector(self.rnd) for _ in range(3)]
        res = client().search(
            self.name, qs, limit=4, search_params={"metric_type": "L2", "offset": 6, "params": {"ef": 64}}, timeout=T
        )
        self.assertEqual(len(res), 3)
        for i, q in enumerate(qs):
            self.check_hits("L2", self.rows, q, res[i], 4, offset=6, label=f"L2 batch {i}")

    def test_07_search_filter_and_output_fields(self):
        qs = [random_vector(self.rnd) for _ in range(3)]
        fields = self.scalar_fields()
        res = client().search(
            self.name,
            qs,
            limit=8,
            filter="i32 > 50 and flag == true",
            output_fields=fields,
            search_params={"params": {"ef": 64}},
            timeout=T,
        )
        for i, q in enumerate(qs):
            self.check_hits(
                "L2", self.rows, q, res[i], 8, where=lambda r: r["i32"] > 50 and r["flag"], label=f"filtered {i}"
            )
            for hit in res[i]:
                self.check_entity(hit["id"], hit["entity"], fields)

    def test_08_search_json_filter(self):
        q = random_vector(self.rnd)
        res = client().search(self.name, [q], limit=5, filter='meta["k"] == 2', output_fields=["meta"], timeout=T)
        self.check_hits("L2", self.rows, q, res[0], 5, where=lambda r: r["meta"]["k"] == 2)

    def test_09_query_filter_output_fields(self):
        res = client().query(self.name, filter="i64 >= 0 and i64 < 100000", output_fields=["title", "i64"], timeout=T)
        expected = {pk for pk, r in self.rows.items() if 0 <= r["i64"] < 100000}
        self.assertEqual({r["id"] for r in res}, expected)
        for r in res:
            self.assertEqual(set(r), {"id", "title", "i64"}, "the primary key comes back with the asked fields")
            self.check_entity(r["id"], r, ["title", "i64"])

    def test_10_query_limit_offset(self):
        # Milvus answers a query in ascending primary-key order, so pages are stable.
        matching = sorted(pk for pk, r in self.rows.items() if r["i32"] < 10)
        c = client()
        page1 = c.query(self.name, filter="i32 < 10", output_fields=["i32"], limit=5, timeout=T)
        page2 = c.query(self.name, filter="i32 < 10", output_fields=["i32"], limit=5, offset=5, timeout=T)
        self.assertEqual([r["id"] for r in page1], matching[:5])
        self.assertEqual([r["id"] for r in page2], matching[5:10])

    def test_11_query_json_and_every_field(self):
        res = client().query(self.name, filter='meta["tag"] == "t3" and i32 < 40', output_fields=["*"], timeout=T)
        expected = {pk for pk, r in self.rows.items() if r["meta"]["tag"] == "t3" and r["i32"] < 40}
        self.assertEqual({r["id"] for r in res}, expected)
        for r in res:
            self.check_entity(r["id"], r, self.scalar_fields() + ["vector"])

    def test_12_nullable_and_default_values(self):
        res = client().get(self.name, ids=[0, 1, 2, 3, 4], output_fields=self.scalar_fields(), timeout=T)
        self.assertEqual(sorted(r["id"] for r in res), [0, 1, 2, 3, 4])
        for r in res:
            self.check_entity(r["id"], r, self.scalar_fields())
        if not LITE:
            by_id = {r["id"]: r for r in res}
            self.assertIsNone(by_id[0]["note"])
            self.assertEqual(by_id[0]["rank"], 7)
            self.assertEqual(by_id[4]["rank"], 7)
            self.assertEqual(by_id[1]["rank"], 1)

    def test_13_count(self):
        c = client()
        self.assertEqual(count_of(c.query(self.name, output_fields=["count(*)"], timeout=T)), len(self.rows))
        flagged = sum(1 for r in self.rows.values() if r["flag"])
        self.assertEqual(
            count_of(c.query(self.name, filter="flag == true", output_fields=["count(*)"], timeout=T)), flagged
        )

    def test_14_get(self):
        res = client().get(self.name, ids=[3, 4, 999999], timeout=T)
        self.assertEqual(sorted(r["id"] for r in res), [3, 4])
        for r in res:
            self.check_entity(r["id"], r, self.scalar_fields() + ["vector"])

    def test_15_upsert(self):
        c = client()
        rnd = random.Random(SEED + 5)
        changed = []
        for pk in (0, 1):
            row = dict(self.rows[pk], title=f"upserted-{pk}", vector=random_vector(rnd))
            changed.append(row)
        new = dict(self.rows[2], id=100000, title="brand new", vector=random_vector(rnd))
        changed.append(new)
        result = c.upsert(self.name, changed, timeout=T)
        self.assertEqual(result["upsert_count"], 3, result)
        for row in changed:
            self.rows[row["id"]] = row
        got = c.get(self.name, ids=[0, 1, 100000], output_fields=["title"], timeout=T)
        self.assertEqual({r["id"]: r["title"] for r in got}, {0: "upserted-0", 1: "upserted-1", 100000: "brand new"})
        self.assertEqual(count_of(c.query(self.name, output_fields=["count(*)"], timeout=T)), len(self.rows))
        # The upserted vectors are what search sees.
        q = changed[0]["vector"]
        res = c.search(self.name, [q], limit=3, timeout=T)
        self.assertEqual(res[0][0]["id"], 0)
        self.check_hits("L2", self.rows, q, res[0], 3, label="after upsert")

    def test_16_delete_by_ids(self):
        c = client()
        before = count_of(c.query(self.name, output_fields=["count(*)"], timeout=T))
        self.assertEqual(before, len(self.rows))
        result = c.delete(self.name, ids=[10, 11, 12], timeout=T)
        self.assertEqual(deleted_count(result), 3, result)
        for pk in (10, 11, 12):
            del self.rows[pk]
        self.assertEqual(count_of(c.query(self.name, output_fields=["count(*)"], timeout=T)), before - 3)
        self.assertEqual(c.get(self.name, ids=[10, 11, 12], timeout=T), [])

    def test_17_delete_by_filter(self):
        c = client()
        doomed = [pk for pk, r in self.rows.items() if r["i32"] == 7]
        self.assertTrue(doomed)
        result = c.delete(self.name, filter="i32 == 7", timeout=T)
        self.assertEqual(deleted_count(result), len(doomed), result)
        for pk in doomed:
            del self.rows[pk]
        self.assertEqual(count_of(c.query(self.name, output_fields=["count(*)"], timeout=T)), len(self.rows))
        self.assertEqual(
            count_of(c.query(self.name, filter="i32 == 7", output_fields=["count(*)"], timeout=T)), 0
        )
        # A filter that matches nothing deletes nothing.
        self.assertEqual(deleted_count(c.delete(self.name, filter="i32 > 1000", timeout=T)), 0)

    def test_18_search_after_deletes_and_flush(self):
        c = client()
        c.flush(self.name, timeout=T)
        qs = [random_vector(self.rnd) for _ in range(3)]
        res = c.search(self.name, qs, limit=10, filter="i32 < 20", search_params={"params": {"ef": 64}}, timeout=T)
        for i, q in enumerate(qs):
            self.check_hits("L2", self.rows, q, res[i], 10, where=lambda r: r["i32"] < 20, label=f"after flush {i}")
        self.assertEqual(count_of(c.query(self.name, output_fields=["count(*)"], timeout=T)), len(self.rows))
        stats = c.get_collection_stats(self.name, timeout=T)
        # Milvus may count deleted and replaced rows here until compaction:
        # between the live rows and every row written (300 inserted, 3 upserted).
        self.assertGreaterEqual(stats["row_count"], len(self.rows), stats)
        self.assertLessEqual(stats["row_count"], ROWS + 3, stats)

    def test_19_range_search(self):
        # L2: range_filter <= distance < radius. The range is cut midway
        # between exact neighbours, so the answer is exactly neighbours 3..15.
        q = random_vector(self.rnd)
        exact = reference("L2", self.rows, q, len(self.rows))
        radius = (exact[14][0] + exact[15][0]) / 2
        near = (exact[2][0] + exact[3][0]) / 2
        params = {"params": {"ef": 64, "radius": radius, "range_filter": near}}
        res = client().search(self.name, [q], limit=50, search_params=params, timeout=T)
        self.assertEqual([h["id"] for h in res[0]], [pk for _, pk in exact[3:15]])
        for hit in res[0]:
            self.assertTrue(near <= hit["distance"] < radius, hit)
        # The limit caps a range search.
        capped = client().search(self.name, [q], limit=4, search_params={"params": {"radius": radius}}, timeout=T)
        self.assertEqual([h["id"] for h in capped[0]], [pk for _, pk in exact[:4]])
        # A range_filter on the wrong side of the radius is refused by name.
        wrong = {"params": {"radius": near, "range_filter": radius}}
        error = expect_error(
            self, lambda: client().search(self.name, [q], limit=5, search_params=wrong, timeout=T), "range_filter"
        )
        self.assertIn("range_filter", str(error))

    def test_20_grouping_search(self):
        # Milvus's group_by_field: the best `limit` groups of i32 (three rows
        # each), each with its nearest `group_size` hits, group after group.
        q = random_vector(self.rnd)
        exact = reference("L2", self.rows, q, len(self.rows))
        groups = {}
        for _, pk in exact:
            key = self.rows[pk]["i32"]
            if key not in groups and len(groups) == 5:
                continue
            groups.setdefault(key, [])
            if len(groups[key]) < 2:
                groups[key].append(pk)
        expected = [pk for members in groups.values() for pk in members]
        res = client().search(
            self.name,
            [q],
            limit=5,
            group_by_field="i32",
            group_size=2,
            strict_group_size=True,
            output_fields=["i32"],
            timeout=T,
        )
        self.assertEqual([h["id"] for h in res[0]], expected)
        for hit in res[0]:
            self.assertEqual(hit["entity"]["i32"], self.rows[hit["id"]]["i32"])
        # One hit per group by default; a float field does not group.
        single = client().search(self.name, [q], limit=5, group_by_field="i32", timeout=T)
        self.assertEqual([h["id"] for h in single[0]], [members[0] for members in groups.values()])
        error = expect_error(
            self, lambda: client().search(self.name, [q], limit=5, group_by_field="f32", timeout=T), "group_by_field"
        )
        self.assertIn("group_by_field", str(error))


# ---- no index at creation: create_index later, IP ----


class T03IndexLifecycle(Base):
    """Created without index params; `create_index` (IP), insert, load, search,
    `describe_index`, `list_indexes`, release, `drop_index`."""

    @classmethod
    def setUpClass(cls):
        check_budget()
        c = client()
        cls.name = name(INDEXED_LATER)
        c.drop_collection(cls.name, timeout=T)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("tag", DataType.VARCHAR, max_length=16)
        c.create_collection(cls.name, schema=schema, timeout=T)
        cls.rows = {}
        cls.rnd = random.Random(SEED + 6)

    def test_01_no_index_yet(self):
        c = client()
        self.assertTrue(c.has_collection(self.name, timeout=T))
        self.assertEqual(c.list_indexes(self.name, timeout=T), [])
        self.assertIsNone(c.describe_index(self.name, "vector", timeout=T))
        if not LITE:
            # Milvus: a collection created without index params is not loaded.
            # milvus-lite: reports Loaded.
            self.assertEqual(c.get_load_state(self.name, timeout=T)["state"], LoadState.NotLoad)
        # Neither loaded nor indexed: Milvus refuses the search ("collection
        # not loaded"; milvus-lite: "index not found").
        expect_error(self, lambda: c.search(self.name, [[0.1] * DIM], limit=3, timeout=T), "search without index")

    def test_02_create_index(self):
        c = client()
        index_params = c.prepare_index_params()
        if LITE:
            index_params.add_index(field_name="vector", index_type="FLAT", metric_type="IP", index_name="vec_idx")
        else:
            index_params.add_index(
                field_name="vector",
                index_type="HNSW",
                metric_type="IP",
                index_name="vec_idx",
                params={"M": 8, "efConstruction": 64},
            )
        c.create_index(self.name, index_params, timeout=T)
        index = c.describe_index(self.name, "vec_idx", timeout=T)
        self.assertIsNotNone(index)
        self.assertEqual(index["metric_type"], "IP")
        self.assertEqual(index["index_type"], "FLAT" if LITE else "HNSW")
        self.assertEqual(index["field_name"], "vector")
        self.assertEqual(index["index_name"], "vec_idx")
        self.assertEqual(index["state"], "Finished")
        self.assertEqual(c.list_indexes(self.name, timeout=T), ["vec_idx"])
        self.assertEqual(c.list_indexes(self.name, field_name="vector", timeout=T), ["vec_idx"])
        self.assertEqual(c.list_indexes(self.name, field_name="tag", timeout=T), [])

    def test_03_insert_load_search_ip(self):
        c = client()
        rows = {}
        for i in range(ROWS):
            rows[i] = {"id": i, "vector": random_vector(self.rnd), "tag": "ab"[i % 2]}
        result = c.insert(self.name, list(rows.values()), timeout=T)
        self.assertEqual(result["insert_count"], ROWS)
        self.rows.update(rows)
        c.load_collection(self.name, timeout=T)
        self.assertEqual(c.get_load_state(self.name, timeout=T)["state"], LoadState.Loaded)
        q = random_vector(self.rnd)
        res = c.search(self.name, [q], limit=10, search_params={"params": {"ef": 64}}, timeout=T)
        self.check_hits("IP", self.rows, q, res[0], 10, label="IP single")
        qs = [random_vector(self.rnd) for _ in range(3)]
        res = c.search(self.name, qs, limit=6, filter='tag == "a"', output_fields=["tag"], timeout=T)
        self.assertEqual(len(res), 3)
        for i, q in enumerate(qs):
            self.check_hits("IP", self.rows, q, res[i], 6, where=lambda r: r["tag"] == "a", label=f"IP batch {i}")
            self.assertTrue(all(h["entity"] == {"tag": "a"} for h in res[i]))

    def test_04_release_and_drop_index(self):
        c = client()
        c.release_collection(self.name, timeout=T)
        self.assertEqual(c.get_load_state(self.name, timeout=T)["state"], LoadState.NotLoad)
        if not LITE:
            # Milvus refuses reads of a released collection ("collection not
            # loaded", code 101); milvus-lite answers them anyway.
            error = expect_error(self, lambda: c.search(self.name, [[0.1] * DIM], limit=3, timeout=T), "search released")
            self.assertEqual(error.code, 101, error)
            expect_error(self, lambda: c.query(self.name, filter="id >= 0", limit=3, timeout=T), "query released")
        # An index can be dropped once the collection is released.
        c.drop_index(self.name, "vec_idx", timeout=T)
        self.assertEqual(c.list_indexes(self.name, timeout=T), [])
        self.assertIsNone(c.describe_index(self.name, "vec_idx", timeout=T))


# ---- consistency ----


class T04Consistency(Base):
    """A Strong read right after a write sees it."""

    @classmethod
    def setUpClass(cls):
        check_budget()
        c = client()
        cls.name = name(STRONG)
        c.drop_collection(cls.name, timeout=T)
        c.create_collection(cls.name, dimension=DIM, timeout=T)
        cls.rnd = random.Random(SEED + 7)
        cls.rows = {i: {"id": i, "vector": random_vector(cls.rnd)} for i in range(50)}
        c.insert(cls.name, list(cls.rows.values()), timeout=T)

    def test_01_strong_search_sees_the_insert(self):
        c = client()
        for round_ in range(5):
            pk = 1000 + round_
            v = random_vector(self.rnd)
            c.insert(self.name, [{"id": pk, "vector": v}], timeout=T)
            self.rows[pk] = {"id": pk, "vector": v}
            res = c.search(self.name, [v], limit=1, consistency_level="Strong", timeout=T)
            self.assertEqual(res[0][0]["id"], pk, f"round {round_}: {res}")
            self.assertTrue(close(res[0][0]["distance"], 1.0), res)
            got = c.query(self.name, output_fields=["count(*)"], consistency_level="Strong", timeout=T)
            self.assertEqual(count_of(got), len(self.rows))

    def test_02_strong_sees_deletes_and_upserts(self):
        c = client()
        c.delete(self.name, ids=[1000], timeout=T)
        del self.rows[1000]
        res = c.query(self.name, filter="id == 1000", consistency_level="Strong", timeout=T)
        self.assertEqual(list(res), [])
        v = random_vector(self.rnd)
        c.upsert(self.name, [{"id": 1001, "vector": v}], timeout=T)
        res = c.search(self.name, [v], limit=1, consistency_level="Strong", timeout=T)
        self.assertEqual(res[0][0]["id"], 1001)

    def test_03_default_consistency_reads_own_writes(self):
        # No level given: pymilvus sends the collection's default and the
        # timestamp of its last write (use_default_consistency, guarantee_ts).
        c = client()
        v = random_vector(self.rnd)
        c.insert(self.name, [{"id": 2000, "vector": v}], timeout=T)
        res = c.search(self.name, [v], limit=1, timeout=T)
        self.assertEqual(res[0][0]["id"], 2000, res)

    def test_04_time_travel_through_search_params(self):
        # Vectorflow only (Milvus 2.5 has no time travel): a search with
        # `travel_timestamp` in its params answers as of that hybrid
        # timestamp, made with pymilvus's own helper; a row deleted after it
        # is still found there, and gone now.
        if LITE:
            self.skipTest("milvus-lite has no time travel")
        from pymilvus import mkts_from_unixtime

        c = client()
        v = random_vector(self.rnd)
        c.insert(self.name, [{"id": 3000, "vector": v}], timeout=T)
        c.search(self.name, [v], limit=1, consistency_level="Strong", timeout=T)
        before_delete = mkts_from_unixtime(time.time())
        time.sleep(0.05)
        c.delete(self.name, ids=[3000], timeout=T)
        now = c.search(self.name, [v], limit=1, consistency_level="Strong", timeout=T)
        self.assertNotEqual(now[0][0]["id"], 3000, now)
        then = c.search(
            self.name,
            [v],
            limit=1,
            search_params={"params": {"ef": 64, "travel_timestamp": before_delete}},
            timeout=T,
        )
        self.assertEqual(then[0][0]["id"], 3000, then)
        self.assertTrue(close(then[0][0]["distance"], 1.0), then)


# ---- errors ----


class T05Errors(Base):
    """Failures raise MilvusException at once, with a useful message."""

    def test_01_missing_collection(self):
        c = client()
        missing = name(MISSING)
        self.assertFalse(c.has_collection(missing, timeout=T))
        vector = [0.1] * DIM
        calls = {
            "describe_collection": lambda: c.describe_collection(missing, timeout=T),
            "insert": lambda: c.insert(missing, [{"id": 1, "vector": vector}], timeout=T),
            "upsert": lambda: c.upsert(missing, [{"id": 1, "vector": vector}], timeout=T),
            "delete": lambda: c.delete(missing, ids=[1], timeout=T),
            "search": lambda: c.search(missing, [vector], limit=3, timeout=T),
            "query": lambda: c.query(missing, filter="id > 0", timeout=T),
            "count": lambda: c.query(missing, output_fields=["count(*)"], timeout=T),
            "get": lambda: c.get(missing, ids=[1], timeout=T),
            "get_collection_stats": lambda: c.get_collection_stats(missing, timeout=T),
            "load_collection": lambda: c.load_collection(missing, timeout=T),
            "list_indexes": lambda: c.list_indexes(missing, timeout=T),
            "describe_index": lambda: c.describe_index(missing, "vector", timeout=T),
        }
        for what, call in calls.items():
            with self.subTest(what):
                error = expect_error(self, call, what)
                # 100 = collection not found (has_collection relies on it).
                self.assertEqual(error.code, 100, f"{what}: {error}")
        # Milvus: the load state of a missing collection is NotExist (no
        # error), and dropping it is a no-op (drop is idempotent).
        self.assert_not_exist_state(missing)
        c.drop_collection(missing, timeout=T)

    def test_02_wrong_dimension(self):
        c = client()
        full = name(FULL)
        row = dict(STATE["full"][next(iter(STATE["full"]))], id=777777, vector=[0.5] * (DIM - 1))
        error = expect_error(self, lambda: c.insert(full, [row], timeout=T), "insert with dim 7")
        message = error.message.lower()
        # Milvus says "the length(7) of float data should divide the dim(8)",
        # which names the dimension but not the field; Vectorflow names the field.
        self.assertIn("dim", message, error)
        if not LITE:
            self.assertIn("vector", message, f"the message should name the field: {error}")
        expect_error(self, lambda: c.search(full, [[0.5] * (DIM - 1)], limit=3, timeout=T), "search with dim 7")
        self.assertEqual(c.get(full, ids=[777777], timeout=T), [])

    def test_03_bad_filters(self):
        c = client()
        full, quick = name(FULL), name(QUICK)
        vector = [0.1] * DIM
        calls = {
            "query syntax": lambda: c.query(full, filter="i32 >>> 3", timeout=T),
            "search syntax": lambda: c.search(full, [vector], filter="i32 >>> 3", limit=3, timeout=T),
            "delete syntax": lambda: c.delete(full, filter="i32 >>> 3", timeout=T),
            # (Milvus's parser recovers from an unclosed "(", so that is no test.)
            "count syntax": lambda: c.query(full, filter="i32 ==", output_fields=["count(*)"], timeout=T),
            "type mismatch": lambda: c.query(full, filter='i32 > "x"', timeout=T),
            "unknown field": lambda: c.query(full, filter="no_such_field > 3", timeout=T),
            "dynamic collection syntax": lambda: c.query(quick, filter='color == "red" and', timeout=T),
            "unknown output field": lambda: c.query(full, filter="id > 0", output_fields=["no_such_field"], timeout=T),
        }
        for what, call in calls.items():
            with self.subTest(what):
                error = expect_error(self, call, what)
                self.assertTrue(error.message, f"{what}: an empty message")
        # On a collection with dynamic fields an unknown name is a dynamic key: no error, no match.
        self.assertEqual(list(c.query(quick, filter="no_such_key > 3", timeout=T)), [])

    def test_04_create_existing_with_another_schema(self):
        c = client()
        expect_error(self, lambda: c.create_collection(name(FULL), dimension=DIM, timeout=T), "create again")


# ---- comparison with the vectorflow.v1 API (--vectorflow-bin) ----


def vectorflow(*args):
    """Runs a vectorflow.v1 client command with --json; its JSON lines."""
    command = [VF_BIN, *args, "--addr", VF_ADDR, "--json", "--timeout", str(T)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


class T06VectorflowV1(Base):
    """pymilvus and the vectorflow.v1 API give the same answers on one collection."""

    def setUp(self):
        super().setUp()
        if not VF_BIN:
            self.skipTest("no --vectorflow-bin")
        self.rnd = random.Random(SEED + 8)

    def compare_search(self, collection, metric, rows, filter_, where, limit):
        qs = [random_vector(self.rnd) for _ in range(3)]
        fields = ["i32"] if metric == "L2" else None
        res = client().search(
            collection, qs, limit=limit, filter=filter_, output_fields=fields, search_params={"params": {"ef": 64}}, timeout=T
        )
        args = ["search", "-c", collection, "--k", str(limit), "--ef", "64"]
        for q in qs:
            args += ["--vector", json.dumps(f32(q))]
        if filter_:
            args += ["--filter", filter_]
        if metric == "L2":
            args += ["--output-fields", "i32"]
        lines = vectorflow(*args)
        for i, q in enumerate(qs):
            theirs = [line for line in lines if line["query"] == i]
            ours = res[i]
            self.assertEqual(len(theirs), len(ours), f"query {i}: vectorflow.v1 {theirs} vs pymilvus {ours}")
            for a, b in zip(ours, theirs):
                self.assertTrue(close(a["distance"], b["score"]), f"query {i}: {a} vs {b}")
                if metric == "L2":
                    self.assertEqual(a["entity"]["i32"], b["i32"], f"query {i}: {a} vs {b}")
            for a, b in zip(ours, theirs):
                if a["id"] != b["id"]:
                    # Only among equal scores.
                    tied = {x["id"] for x in theirs if close(x["score"], b["score"])}
                    self.assertIn(a["id"], tied, f"query {i}: ids differ: {ours} vs {theirs}")
            # And both are the exact answer.
            self.check_hits(metric, rows, q, ours, limit, where=where, label=f"query {i}")

    def test_01_search_l2(self):
        self.compare_search(name(FULL), "L2", STATE["full"], "i32 > 20", lambda r: r["i32"] > 20, 10)
        self.compare_search(name(FULL), "L2", STATE["full"], "", None, 5)

    def test_02_search_cosine(self):
        self.compare_search(name(QUICK), "COSINE", STATE["quick"], "", None, 10)

    def test_03_query(self):
        c = client()
        ours = c.query(name(FULL), filter="i32 < 30", output_fields=["i32", "title"], timeout=T)
        theirs = vectorflow("query", "-c", name(FULL), "--filter", "i32 < 30", "--output-fields", "i32,title")
        self.assertEqual(
            sorted((r["id"], r["i32"], r["title"]) for r in ours),
            sorted((r["id"], r["i32"], r["title"]) for r in theirs),
        )
        page = c.query(name(FULL), filter="i32 < 30", output_fields=["i32"], limit=7, offset=4, timeout=T)
        theirs = vectorflow("query", "-c", name(FULL), "--filter", "i32 < 30", "--limit", "7", "--offset", "4")
        self.assertEqual([r["id"] for r in page], [r["id"] for r in theirs])

    def test_04_count(self):
        c = client()
        for filter_ in ("", "flag == true", "i32 >= 50"):
            with self.subTest(filter_ or "all"):
                args = ["query", "-c", name(FULL), "--count"] + (["--filter", filter_] if filter_ else [])
                theirs = vectorflow(*args)
                ours = count_of(c.query(name(FULL), filter=filter_, output_fields=["count(*)"], timeout=T))
                self.assertEqual([{"count": ours}], theirs)


# ---- hybrid search: two vector fields, RRF and weighted rankers ----


class T065HybridSearch(Base):
    """`hybrid_search` with one `AnnSearchRequest` per vector field."""

    @classmethod
    def setUpClass(cls):
        check_budget()
        c = client()
        cls.name = name(HYBRID)
        c.drop_collection(cls.name, timeout=T)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("small", DataType.FLOAT_VECTOR, dim=4)
        schema.add_field("n", DataType.INT64)
        index_params = c.prepare_index_params()
        index_params.add_index(field_name="dense", index_type="AUTOINDEX", metric_type="COSINE")
        index_params.add_index(field_name="small", index_type="AUTOINDEX", metric_type="L2")
        c.create_collection(cls.name, schema=schema, index_params=index_params, timeout=T)
        rnd = random.Random(SEED + 11)
        cls.rows = {
            i: {"id": i, "dense": random_vector(rnd), "small": [rnd.uniform(-1, 1) for _ in range(4)], "n": i % 10}
            for i in range(200)
        }
        c.insert(cls.name, list(cls.rows.values()), timeout=T)
        cls.rnd = random.Random(SEED + 12)

    def exact(self, field, metric, q, limit, where=None):
        rows = {pk: {"vector": r[field], **r} for pk, r in self.rows.items()}
        return reference(metric, rows, q, limit, where=where)

    def fused(self, lists, rank):
        """Milvus's fusion of exact answers [(metric, [(score, id)])]: RRF
        sum of 1/(k + rank), or weights of normalised scores."""
        total = {}
        for i, (metric, hits) in enumerate(lists):
            for r, (s, pk) in enumerate(hits):
                if rank[0] == "rrf":
                    add = 1.0 / (rank[1] + r + 1)
                else:
                    norm = (1 + s) / 2 if metric == "COSINE" else 1 - 2 * math.atan(s) / math.pi
                    add = rank[1][i] * norm
                total[pk] = total.get(pk, 0.0) + add
        return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))

    def test_01_rrf_and_weighted_fuse_the_exact_answers(self):
        from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

        for _ in range(3):
            qd, qs = random_vector(self.rnd), [self.rnd.uniform(-1, 1) for _ in range(4)]
            where = lambda r: r["n"] < 7  # noqa: E731
            reqs = [
                AnnSearchRequest(data=[qd], anns_field="dense", param={"params": {"ef": 64}}, limit=20),
                AnnSearchRequest(data=[qs], anns_field="small", param={}, limit=15, expr="n < 7"),
            ]
            lists = [
                ("COSINE", self.exact("dense", "COSINE", qd, 20)),
                ("L2", self.exact("small", "L2", qs, 15, where)),
            ]
            for ranker, rank in ((RRFRanker(60), ("rrf", 60)), (WeightedRanker(0.6, 0.4), ("weighted", [0.6, 0.4]))):
                res = client().hybrid_search(self.name, reqs, ranker, limit=10, output_fields=["n"], timeout=T)
                expected = self.fused(lists, rank)[:10]
                got = [(h["id"], h["distance"]) for h in res[0]]
                self.assertEqual(len(got), len(expected), f"{rank[0]}: {got} vs {expected}")
                for (pk, s), (epk, es) in zip(got, expected):
                    self.assertTrue(close(s, es, 1e-5, 1e-6), f"{rank[0]}: {got} vs {expected}")
                    if pk != epk:
                        tied = {p for p, x in expected if close(x, es, 1e-5, 1e-6)}
                        self.assertIn(pk, tied, f"{rank[0]}: {got} vs {expected}")
                for hit in res[0]:
                    self.assertEqual(hit["entity"]["n"], self.rows[hit["id"]]["n"])
        # A ranker that does not fit the searches is refused by name.
        from pymilvus import WeightedRanker as W

        error = expect_error(
            self, lambda: client().hybrid_search(self.name, reqs, W(1.0), limit=5, timeout=T), "one weight"
        )
        self.assertIn("weights", str(error))


# ---- partitions and partition keys ----


class T066Partitions(Base):
    """`create_partition`, writes and reads by `partition_name(s)`, release and
    drop; a collection with a partition key."""

    @classmethod
    def setUpClass(cls):
        check_budget()
        c = client()
        cls.name = name(PARTS)
        c.drop_collection(cls.name, timeout=T)
        c.create_collection(cls.name, dimension=DIM, metric_type="L2", timeout=T)
        c.create_partition(cls.name, "p1", timeout=T)
        rnd = random.Random(SEED + 21)
        cls.rows = {i: {"id": i, "vector": random_vector(rnd)} for i in list(range(50)) + list(range(100, 150))}
        c.insert(cls.name, [r for i, r in cls.rows.items() if i < 100], timeout=T)
        c.insert(cls.name, [r for i, r in cls.rows.items() if i >= 100], partition_name="p1", timeout=T)
        cls.rnd = random.Random(SEED + 22)

    def test_01_list_and_has(self):
        c = client()
        self.assertEqual(sorted(c.list_partitions(self.name, timeout=T)), ["_default", "p1"])
        self.assertTrue(c.has_partition(self.name, "p1", timeout=T))
        self.assertFalse(c.has_partition(self.name, "p9", timeout=T))
        self.assertEqual(c.get_partition_stats(self.name, "p1", timeout=T)["row_count"], 50)

    def test_02_reads_restricted_to_partitions(self):
        c = client()
        q = random_vector(self.rnd)
        p1 = {pk: r for pk, r in self.rows.items() if pk >= 100}
        res = c.search(self.name, [q], limit=5, partition_names=["p1"], timeout=T)
        self.check_hits("L2", p1, q, res[0], 5, label="partition p1")
        res = c.search(self.name, [q], limit=5, timeout=T)
        self.check_hits("L2", self.rows, q, res[0], 5, label="whole collection")
        got = c.query(self.name, filter="id >= 0", partition_names=["_default"], output_fields=["id"], timeout=T)
        self.assertEqual(sorted(r["id"] for r in got), list(range(50)))

    def test_03_release_then_drop(self):
        c = client()
        error = expect_error(self, lambda: c.drop_partition(self.name, "p1", timeout=T), "drop a loaded partition")
        self.assertIn("release", str(error))
        c.release_partitions(self.name, ["p1"], timeout=T)
        q = random_vector(self.rnd)
        res = c.search(self.name, [q], limit=60, timeout=T)
        self.assertTrue(all(h["id"] < 100 for h in res[0]), "a released partition is left out")
        expect_error(self, lambda: c.search(self.name, [q], limit=5, partition_names=["p1"], timeout=T), "released")
        c.drop_partition(self.name, "p1", timeout=T)
        self.assertEqual(c.list_partitions(self.name, timeout=T), ["_default"])

    def test_04_partition_key(self):
        c = client()
        keyed = name(PARTS + "_key")
        c.drop_collection(keyed, timeout=T)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("tenant", DataType.INT64, is_partition_key=True)
        index_params = c.prepare_index_params()
        index_params.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="L2")
        c.create_collection(keyed, schema=schema, index_params=index_params, num_partitions=8, timeout=T)
        self.assertEqual(len(c.list_partitions(keyed, timeout=T)), 8)
        rnd = random.Random(SEED + 23)
        rows = {i: {"id": i, "vector": random_vector(rnd), "tenant": i % 20} for i in range(200)}
        c.insert(keyed, list(rows.values()), timeout=T)
        q = random_vector(self.rnd)
        res = c.search(keyed, [q], limit=20, filter="tenant == 3", output_fields=["tenant"], timeout=T)
        mine = {pk: r for pk, r in rows.items() if r["tenant"] == 3}
        self.check_hits("L2", mine, q, res[0], 20, label="tenant 3")
        self.assertTrue(all(h["entity"]["tenant"] == 3 for h in res[0]))
        expect_error(self, lambda: c.create_partition(keyed, "extra", timeout=T), "a partition key's partitions")
        c.drop_collection(keyed, timeout=T)


# ---- collection lifecycle (last: it drops what the others made) ----


class T07Lifecycle(Base):
    def test_01_list_has_describe_drop(self):
        c = client()
        scratch = name(SCRATCH)
        c.drop_collection(scratch, timeout=T)
        c.create_collection(scratch, dimension=DIM, metric_type="L2", timeout=T)
        self.assertEqual(c.describe_index(scratch, "vector", timeout=T)["metric_type"], "L2")
        names = c.list_collections(timeout=T)
        for suffix in (QUICK, FULL, INDEXED_LATER, STRONG, SCRATCH):
            self.assertIn(name(suffix), names)
            self.assertTrue(c.has_collection(name(suffix), timeout=T))
        self.assertEqual(c.describe_collection(scratch, timeout=T)["collection_name"], scratch)
        self.assertEqual(c.get_collection_stats(scratch, timeout=T)["row_count"], 0)
        c.drop_collection(scratch, timeout=T)
        self.assertFalse(c.has_collection(scratch, timeout=T))
        self.assertNotIn(scratch, c.list_collections(timeout=T))
        self.assert_not_exist_state(scratch)
        expect_error(self, lambda: c.describe_collection(scratch, timeout=T), "describe dropped")

    def test_01b_aliases_name_collections_and_swap_atomically(self):
        c = client()
        blue, green, live = name("blue"), name("green"), name("live")
        for collection, pk in ((blue, 1), (green, 2)):
            c.drop_collection(collection, timeout=T)
            c.create_collection(collection, dimension=DIM, metric_type="L2", timeout=T)
            c.insert(collection, [{"id": pk, "vector": [float(pk)] * DIM}], timeout=T)
        c.create_alias(blue, live, timeout=T)
        self.assertEqual(c.describe_alias(live, timeout=T)["collection_name"], blue)
        self.assertEqual(c.list_aliases(blue, timeout=T)["aliases"], [live])
        self.assertEqual(c.describe_collection(live, timeout=T)["collection_name"], blue)

        def only_id():
            res = c.search(live, [[0.0] * DIM], limit=5, consistency_level="Strong", timeout=T)
            return [hit["id"] for hit in res[0]]

        self.assertEqual(only_id(), [1])
        # A write through the alias lands in the collection it names.
        c.insert(live, [{"id": 11, "vector": [1.5] * DIM}], timeout=T)
        self.assertEqual(count_of(c.query(blue, output_fields=["count(*)"], consistency_level="Strong", timeout=T)), 2)
        c.alter_alias(green, live, timeout=T)
        self.assertEqual(only_id(), [2])
        self.assertEqual(c.list_aliases(blue, timeout=T)["aliases"], [])
        self.assertEqual(c.list_aliases(green, timeout=T)["aliases"], [live])
        expect_error(self, lambda: c.create_alias(blue, live, timeout=T), "an alias taken")
        expect_error(self, lambda: c.create_alias(blue, green, timeout=T), "an alias named like a collection")
        expect_error(self, lambda: c.drop_collection(green, timeout=T), "dropping an aliased collection")
        expect_error(self, lambda: c.drop_collection(live, timeout=T), "dropping through an alias")
        c.drop_alias(live, timeout=T)
        expect_error(self, lambda: c.describe_alias(live, timeout=T), "describe a dropped alias")
        expect_error(self, lambda: c.search(live, [[0.0] * DIM], limit=1, timeout=T), "search a dropped alias")
        for collection in (blue, green):
            c.drop_collection(collection, timeout=T)

    def test_02_load_release_cycle(self):
        c = client()
        quick = name(QUICK)
        c.release_collection(quick, timeout=T)
        self.assertEqual(c.get_load_state(quick, timeout=T)["state"], LoadState.NotLoad)
        c.load_collection(quick, timeout=T)
        self.assertEqual(c.get_load_state(quick, timeout=T)["state"], LoadState.Loaded)
        q = [0.3] * DIM
        res = c.search(quick, [q], limit=5, timeout=T)
        self.check_hits("COSINE", STATE["quick"], q, res[0], 5, label="after reload")

    def test_03_drop_everything(self):
        c = client()
        for suffix in (QUICK, FULL, INDEXED_LATER, STRONG, HYBRID, PARTS):
            c.drop_collection(name(suffix), timeout=T)
            self.assertFalse(c.has_collection(name(suffix), timeout=T))
        left = [n for n in c.list_collections(timeout=T) if n.startswith(PREFIX + "_")]
        self.assertEqual(left, [])


ORDER = [
    T01QuickCollection,
    T02FullSchema,
    T03IndexLifecycle,
    T04Consistency,
    T05Errors,
    T06VectorflowV1,
    T065HybridSearch,
    T066Partitions,
    T07Lifecycle,
]


def main():
    global URI, LITE, VF_BIN, VF_ADDR, PREFIX, CLIENT, STARTED
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", required=True, help="http://HOST:PORT, or a milvus-lite file path ending in .db")
    parser.add_argument("--vectorflow-bin", help="the vectorflow binary: also compare with its vectorflow.v1 answers")
    parser.add_argument("--vectorflow-addr", help="HOST:PORT of the same server's vectorflow.v1 API")
    parser.add_argument("--prefix", default="pmt", help="collection names start with PREFIX_ (default pmt)")
    parser.add_argument(
        "--milvus-lite",
        action="store_true",
        help="the server is milvus-lite served over TCP: expect its limits (implied by a .db URI)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="one character per test")
    args = parser.parse_args()
    if bool(args.vectorflow_bin) != bool(args.vectorflow_addr):
        parser.error("--vectorflow-bin and --vectorflow-addr go together")
    URI, VF_BIN, VF_ADDR, PREFIX = args.uri, args.vectorflow_bin, args.vectorflow_addr, args.prefix
    LITE = args.milvus_lite or (not URI.startswith(("http://", "https://", "tcp://", "grpc://")) and URI.endswith(".db"))
    started = STARTED = time.monotonic()
    print(f"pymilvus MilvusClient suite against {URI} ({'milvus-lite' if LITE else 'server'})", flush=True)
    try:
        CLIENT = Watchdog(MilvusClient(uri=URI, timeout=T))
    except Exception as error:  # noqa: BLE001
        print(f"FAILED: cannot connect to {URI}: {error}", flush=True)
        return 1
    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for case in ORDER:
        suite.addTests(loader.loadTestsFromTestCase(case))
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=1 if args.quiet else 2)
    result = runner.run(suite)
    try:
        CLIENT.close()
    except Exception:  # noqa: BLE001
        pass
    elapsed = time.monotonic() - started
    failed = len(result.failures) + len(result.errors)
    print(
        f"SUMMARY: {result.testsRun} tests, {failed} failed "
        f"({len(result.failures)} failures, {len(result.errors)} errors), "
        f"{len(result.skipped)} skipped, {elapsed:.1f}s against {URI}",
        flush=True,
    )
    for test, _ in result.failures + result.errors:
        print(f"  FAILED {test.id()}", flush=True)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
