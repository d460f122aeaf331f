//! The command-line client against the real server: `vectorflow serve` on an
//! ephemeral port, and `vectorflow collection|insert|search|query|sql|bench`
//! run as subprocesses.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Builder, Int32Array, ListBuilder, RecordBatch, StringArray};
use arrow::datatypes::{Field, Schema};
use common::ServerProcess;
use serde_json::{Value as J, json};

/// A running `vectorflow serve` on its own data directory.
struct Server {
    process: ServerProcess,
    _data: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let data = tempfile::tempdir().expect("a temporary directory");
        Server { process: ServerProcess::start(data.path(), extra), _data: data }
    }

    /// Runs `vectorflow <args> --addr <this server>`.
    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--addr", &self.process.address]);
        vf(&all)
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        succeeded(args, self.run(args))
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        failed(args, self.run(args))
    }
}

fn vf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the vectorflow binary runs")
}

fn succeeded(args: &[&str], output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "vectorflow {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn failed(args: &[&str], output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "vectorflow {args:?} should have failed:\n{}\n{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    stderr
}

/// Every line of `--json` output as a JSON value.
fn lines(stdout: &str) -> Vec<J> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line: {l:?}: {e}")))
        .collect()
}

fn ints(rows: &[J], key: &str) -> Vec<i64> {
    rows.iter().map(|r| r[key].as_i64().unwrap_or_else(|| panic!("{key} in {r}"))).collect()
}

/// `id` int64 key, `v` float_vector(3) L2, `tag` varchar(16) nullable,
/// `meta` JSON nullable, `weight` double with default 1.5.
const DOCS: &str = r#"{"name": "docs", "fields": [
    {"name": "id", "data_type": "Int64", "is_primary": true},
    {"name": "v", "data_type": {"FloatVector": {"dim": 3, "metric": "L2"}}},
    {"name": "tag", "data_type": {"VarChar": {"max_length": 16}}, "nullable": true},
    {"name": "meta", "data_type": "Json", "nullable": true},
    {"name": "weight", "data_type": "Double", "default_value": {"Float": 1.5}}
]}"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("the file is written");
    path
}

fn s(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

#[test]
fn collections_are_created_listed_described_and_dropped() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let out = server.ok(&["collection", "create", "--schema", DOCS]);
    assert!(out.contains("created collection `docs`"), "{out}");
    // The same schema from a file, under another name.
    let other = DOCS.replace("\"docs\"", "\"other\"");
    let file = write(dir.path(), "other.json", &other);
    server.ok(&["collection", "create", "--schema", &format!("@{}", s(&file))]);

    let names: Vec<J> = lines(&server.ok(&["collection", "list", "--json"]));
    assert_eq!(names, vec![json!({"name": "docs"}), json!({"name": "other"})]);
    let table = server.ok(&["collection", "list"]);
    assert!(table.contains("| docs") && table.contains("| other"), "{table}");

    // describe --json gives the schema in the form `create` takes.
    let described = lines(&server.ok(&["collection", "describe", "docs", "--json"]));
    let expected: vectorflow::CollectionSchema = serde_json::from_str(DOCS).unwrap();
    let schema: vectorflow::CollectionSchema = serde_json::from_value(described[0]["schema"].clone()).unwrap();
    assert_eq!(schema, expected);
    assert!(described[0]["id"].as_u64().is_some() && described[0]["created_ts"].as_u64().is_some());
    let table = server.ok(&["collection", "describe", "docs"]);
    assert!(table.contains("FloatVector(3, L2)") && table.contains("VarChar(16)"), "{table}");

    let err = server.fails(&["collection", "create", "--schema", DOCS]);
    assert!(err.starts_with("error: ALREADY_EXISTS: "), "{err}");
    let err = server.fails(&["collection", "create", "--schema", r#"{"name": "x", "fields": [{"name": "id"}]}"#]);
    assert!(err.contains("--schema is not a collection schema"), "{err}");
    let err = server.fails(&["collection", "create", "--schema", r#"{"name": "x", "fields": []}"#]);
    assert!(err.starts_with("error: INVALID_ARGUMENT: "), "{err}");

    // Aliases, through the binary's gRPC API.
    let out = server.ok(&["alias", "create", "current", "-c", "docs"]);
    assert_eq!(out.trim(), "created alias `current` for collection `docs`");
    assert_eq!(
        lines(&server.ok(&["alias", "describe", "current", "--json"])),
        vec![json!({"alias": "current", "collection": "docs"})]
    );
    let described = lines(&server.ok(&["collection", "describe", "current", "--json"]));
    assert_eq!(described[0]["schema"]["name"], json!("docs"), "a collection described through its alias");
    let err = server.fails(&["collection", "drop", "docs"]);
    assert!(err.starts_with("error: INVALID_ARGUMENT: ") && err.contains("has aliases"), "{err}");
    server.ok(&["alias", "alter", "current", "-c", "other"]);
    assert_eq!(lines(&server.ok(&["alias", "list", "-c", "other", "--json"])), vec![json!({"alias": "current"})]);
    assert!(lines(&server.ok(&["alias", "list", "-c", "docs", "--json"])).is_empty());
    server.ok(&["alias", "drop", "current"]);
    let err = server.fails(&["alias", "describe", "current"]);
    assert_eq!(err.trim(), "error: NOT_FOUND: alias `current` not found");

    let out = server.ok(&["collection", "drop", "docs"]);
    assert!(out.contains("dropped collection `docs`"), "{out}");
    assert_eq!(lines(&server.ok(&["collection", "list", "--json"])), vec![json!({"name": "other"})]);
    let err = server.fails(&["collection", "describe", "docs"]);
    assert_eq!(err.trim(), "error: NOT_FOUND: collection `docs` not found");
}

/// RRF (k = 60) of the nearest 3 to x = 0.75 and the nearest 3 to x = 3.2.
const RRF_SQL: &str = "SELECT id, SUM(1.0 / (60 + r)) AS score FROM (
    SELECT id, row_number() OVER (ORDER BY d) AS r
      FROM (SELECT id, l2_distance(v, [0.75, 0.0, 0.0]) AS d FROM docs ORDER BY d LIMIT 3)
    UNION ALL
    SELECT id, row_number() OVER (ORDER BY d) AS r
      FROM (SELECT id, l2_distance(v, [3.2, 0.0, 0.0]) AS d FROM docs ORDER BY d LIMIT 3)
  ) GROUP BY id ORDER BY score DESC, id LIMIT 3";

/// Five rows as JSON lines (one leaves `weight` to its default, one gives
/// JSON in `meta`, a blank line in between).
const ROWS: &str = r#"{"id": 1, "v": [0.0, 0.0, 0.0], "tag": "a", "meta": {"n": 1}}
{"id": 2, "v": [1.0, 0.0, 0.0], "tag": "b", "weight": 2.5}
{"id": 3, "v": [2.0, 0.0, 0.0], "tag": "a"}

{"id": 4, "v": [3.0, 0.0, 0.0], "tag": null, "weight": 4}
{"id": 5, "v": [4.0, 0.0, 0.0]}
"#;

/// Rows 10..=14 as Parquet: `id` int32, `v` list<float64> (at x = id), `tag`.
fn write_parquet(path: &Path) {
    let ids: Vec<i32> = (10..15).collect();
    let mut vectors = ListBuilder::new(Float64Builder::new());
    for &id in &ids {
        vectors.values().append_slice(&[f64::from(id), 0.0, 0.0]);
        vectors.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int32Array::from(ids.clone())),
        Arc::new(vectors.finish()),
        Arc::new(StringArray::from_iter_values(ids.iter().map(|id| format!("p{id}")))),
    ];
    let schema = Schema::new(
        ["id", "v", "tag"]
            .iter()
            .zip(&columns)
            .map(|(n, c)| Field::new(*n, c.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    let batch = RecordBatch::try_new(Arc::new(schema), columns).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn inserted_rows_are_found_by_search_query_and_sql() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    server.ok(&["collection", "create", "--schema", DOCS]);

    // ---- insert: JSON lines in batches of 2, then Parquet ----
    let jsonl = write(dir.path(), "rows.jsonl", ROWS);
    let out = lines(&server.ok(&["insert", "-c", "docs", "--file", s(&jsonl), "--batch-rows", "2", "--json"]));
    assert_eq!(out[0]["rows"], json!(5), "{out:?}");
    let first_ts = out[0]["ts"].as_u64().expect("the last write's timestamp");
    let parquet = dir.path().join("rows.parquet");
    write_parquet(&parquet);
    let out = server.ok(&["insert", "-c", "docs", "--file", s(&parquet), "--batch-rows", "3"]);
    assert!(out.starts_with("inserted 5 rows into `docs`; last write ts "), "{out}");

    // ---- search ----
    let hits = lines(&server.ok(&[
        "search",
        "-c",
        "docs",
        "--vector",
        "[0.75, 0, 0]",
        "--k",
        "3",
        "--output-fields",
        "tag,weight,meta",
        "--json",
    ]));
    assert_eq!(ints(&hits, "id"), vec![2, 1, 3]);
    assert_eq!(hits[0], json!({"query": 0, "id": 2, "score": 0.0625, "tag": "b", "weight": 2.5, "meta": null}));
    assert_eq!(hits[1]["meta"], json!({"n": 1}), "JSON fields print as JSON");
    assert_eq!(hits[1]["weight"], json!(1.5), "the default filled the left-out field");
    // Two query vectors, a filter, an ef, a consistency level.
    let hits = lines(&server.ok(&[
        "search",
        "-c",
        "docs",
        "--vector",
        "[0, 0, 0]",
        "--vector",
        "[12.2, 0, 0]",
        "--k",
        "2",
        "--filter",
        "tag == \"a\" or id >= 10",
        "--ef",
        "32",
        "--consistency",
        "bounded",
        "--json",
    ]));
    assert_eq!(ints(&hits, "query"), vec![0, 0, 1, 1]);
    assert_eq!(ints(&hits, "id"), vec![1, 3, 12, 13]);
    // Range search: squared L2 distances in [1, 6) from x = 0.75 are ids 3 and 4.
    let hits = lines(&server.ok(&[
        "search",
        "-c",
        "docs",
        "--vector",
        "[0.75, 0, 0]",
        "--radius",
        "6",
        "--range-filter",
        "1",
        "--json",
    ]));
    assert_eq!(ints(&hits, "id"), vec![3, 4]);
    // Grouping by tag: group `b` (id 2) is nearest, then `a` with two hits.
    let hits = lines(&server.ok(&[
        "search",
        "-c",
        "docs",
        "--vector",
        "[0.75, 0, 0]",
        "--k",
        "2",
        "--group-by",
        "tag",
        "--group-size",
        "2",
        "--json",
    ]));
    assert_eq!(ints(&hits, "id"), vec![2, 1, 3]);
    assert_eq!(hits.iter().map(|h| h["tag"].clone()).collect::<Vec<_>>(), vec![json!("b"), json!("a"), json!("a")]);
    // Hybrid search, RRF (60): id 3 is third in both lists, 2 and 4 lead one each (ties in key order).
    let hits = lines(&server.ok(&[
        "hybrid-search",
        "-c",
        "docs",
        "--search",
        r#"{"vector": [0.75, 0, 0], "k": 3}"#,
        "--search",
        r#"{"field": "v", "vector": [3.2, 0, 0], "k": 3}"#,
        "--k",
        "3",
        "--json",
    ]));
    assert_eq!(ints(&hits, "id"), vec![3, 2, 4]);
    let rrf = hits[0]["score"].as_f64().unwrap();
    assert!((rrf - 2.0 / 63.0).abs() < 1e-6, "{hits:?}");
    let err = server.fails(&[
        "hybrid-search",
        "-c",
        "docs",
        "--search",
        r#"{"vector": [1, 0, 0], "k": 2}"#,
        "--weights",
        "1,2",
    ]);
    assert!(err.starts_with("error: INVALID_ARGUMENT: ") && err.contains("ranker.weights"), "{err}");
    // Partitions: a row written to one is found there and with the
    // collection, and is gone once the partition is dropped.
    server.ok(&["partition", "create", "recent", "-c", "docs"]);
    let names = lines(&server.ok(&["partition", "list", "-c", "docs", "--json"]));
    assert_eq!(names, vec![json!({"partition": "_default"}), json!({"partition": "recent"})]);
    let recent = write(dir.path(), "recent.jsonl", "{\"id\": 50, \"v\": [0.75, 0.0, 0.0]}\n");
    server.ok(&["insert", "-c", "docs", "--file", s(&recent), "--partition", "recent"]);
    let near = ["search", "-c", "docs", "--vector", "[0.75, 0, 0]", "--k", "1", "--json"];
    assert_eq!(ints(&lines(&server.ok(&near)), "id"), vec![50]);
    let only_default = [&near[..], &["--partitions", "_default"]].concat();
    assert_eq!(ints(&lines(&server.ok(&only_default)), "id"), vec![2]);
    let out = server.ok(&["partition", "drop", "recent", "-c", "docs"]);
    assert!(out.starts_with("dropped partition `recent` of `docs` at ts "), "{out}");
    assert_eq!(ints(&lines(&server.ok(&near)), "id"), vec![2]);
    let err = server.fails(&["search", "-c", "docs", "--vector", "[0, 0, 0]", "--partitions", "recent"]);
    assert!(err.starts_with("error: INVALID_ARGUMENT: ") && err.contains("partition `recent` not found"), "{err}");
    let err = server.fails(&["search", "-c", "docs", "--vector", "[0, 0, 0]", "--radius", "1", "--range-filter", "2"]);
    assert!(err.starts_with("error: INVALID_ARGUMENT: ") && err.contains("range_filter"), "{err}");
    // Query vectors from a file; a table by default.
    let vectors = write(dir.path(), "q.jsonl", "[14, 0, 0]\n");
    let table = server.ok(&["search", "-c", "docs", "--vectors-file", s(&vectors), "--k", "1", "--output-fields", "*"]);
    assert!(table.contains("| query | id | score | v"), "{table}");
    assert!(table.contains("| 14 ") && table.contains("[14.0, 0.0, 0.0]") && table.contains("p14"), "{table}");
    let err = server.fails(&["search", "-c", "docs", "--vector", "[1, 2]"]);
    assert!(err.contains("--vector #1: 2 numbers, but field `v` has dim 3"), "{err}");
    let err = server.fails(&["search", "-c", "docs", "--vector", "[1, 2, 3]", "--filter", "nope > 1"]);
    assert!(err.starts_with("error: INVALID_ARGUMENT: ") && err.contains("nope"), "{err}");

    // ---- query ----
    let rows = lines(&server.ok(&["query", "-c", "docs", "--filter", "id >= 10", "--output-fields", "tag", "--json"]));
    assert_eq!(rows, (10..15).map(|id| json!({"id": id, "tag": format!("p{id}")})).collect::<Vec<_>>());
    let rows = lines(&server.ok(&["query", "-c", "docs", "--limit", "2", "--offset", "1", "--json"]));
    assert_eq!(ints(&rows, "id"), vec![2, 3]);
    let count = lines(&server.ok(&["query", "-c", "docs", "--count", "--json"]));
    assert_eq!(count, vec![json!({"count": 10})]);
    let count = lines(&server.ok(&["query", "-c", "docs", "--count", "--filter", "tag == \"a\"", "--json"]));
    assert_eq!(count, vec![json!({"count": 2})]);
    // Time travel: as of the JSON lines insert, the Parquet rows are not there yet.
    let then = first_ts.to_string();
    let count = lines(&server.ok(&["query", "-c", "docs", "--count", "--as-of", &then, "--json"]));
    assert_eq!(count, vec![json!({"count": 5})]);
    let table = server.ok(&["query", "-c", "docs", "--filter", "id == 4", "--output-fields", "tag,weight"]);
    assert!(table.contains("| id | tag | weight |") && table.contains("| 4  |     | 4.0    |"), "{table}");
    let err = server.fails(&["query", "-c", "nope"]);
    assert_eq!(err.trim(), "error: NOT_FOUND: collection `nope` not found");

    // ---- sql --addr ----
    let table = server.ok(&["sql", "SELECT id, tag FROM docs WHERE id <= 2 ORDER BY id"]);
    assert!(
        table.contains("| id | tag |") && table.contains("| 1  | a   |") && table.contains("| 2  | b   |"),
        "{table}"
    );
    let rows = lines(&server.ok(&[
        "sql",
        "--json",
        "SELECT id, l2_distance(v, [0.0, 0.0, 0.0]) AS d FROM docs ORDER BY d LIMIT 3",
    ]));
    assert_eq!(rows, vec![json!({"id": 1, "d": 0.0}), json!({"id": 2, "d": 1.0}), json!({"id": 3, "d": 4.0})]);
    let rows = lines(&server.ok(&["sql", "--json", "SELECT count(*) AS n FROM docs"]));
    assert_eq!(rows, vec![json!({"n": 10})]);
    // Reciprocal rank fusion as an ordinary query over two ANN searches
    // (README, "Hybrid search"): the same answer as `hybrid-search` above.
    let fused = lines(&server.ok(&["sql", "--json", RRF_SQL]));
    assert_eq!(ints(&fused, "id"), vec![3, 2, 4], "{fused:?}");
    assert!((fused[0]["score"].as_f64().unwrap() - 2.0 / 63.0).abs() < 1e-9, "{fused:?}");

    let err = server.fails(&["sql", "SELECT nope FROM docs"]);
    assert!(err.starts_with("error: INVALID_ARGUMENT: ") && err.contains("nope"), "{err}");
}

#[test]
fn a_bad_json_line_fails_naming_the_line_and_the_field_and_writes_nothing() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    server.ok(&["collection", "create", "--schema", DOCS]);
    let cases = [
        ("{\"id\": 3, \"v\": [1, 2]}", "line 3: field `v`: dimension 2 does not match dim 3"),
        ("{\"id\": 3, \"v\": [1, 2, 3], \"colour\": 1}", "line 3: field `colour`: no such field in collection `docs`"),
        ("{\"id\": 3, \"v\": [1, 2, 3], \"tag\": 7}", "line 3: field `tag`: 7 does not fit type"),
        ("{\"id\": 3.5, \"v\": [1, 2, 3]}", "line 3: field `id`: 3.5 is not an integer"),
        ("{\"id\": 3, \"v\": [1, \"x\", 3]}", "line 3: field `v`: a vector holds something that is not a number"),
        ("{\"id\": 3, \"v\": [1, 2, 3], \"tag\": \"seventeen chars..\"}", "line 3: field `tag`"),
        ("{\"id\": 3}", "line 3: field `v`: missing"),
        ("{\"id\": 3, \"v\": [1, 2, 3]", "line 3: not JSON"),
        ("[1, 2, 3]", "line 3: expected a JSON object"),
    ];
    for (bad, expected) in cases {
        let text = format!("{{\"id\": 1, \"v\": [1, 2, 3]}}\n{{\"id\": 2, \"v\": [1, 2, 3]}}\n{bad}\n");
        let file = write(dir.path(), "bad.jsonl", &text);
        let err = server.fails(&["insert", "-c", "docs", "--file", s(&file), "--batch-rows", "1"]);
        assert!(err.starts_with("error: ") && err.contains(expected), "{bad}: {err}");
    }
    // Every line is checked before anything is sent.
    let count = lines(&server.ok(&["query", "-c", "docs", "--count", "--json"]));
    assert_eq!(count, vec![json!({"count": 0})]);
    // A Parquet file the server refuses: the error names the rows and the field.
    let file = dir.path().join("bad.parquet");
    write_parquet(&file);
    let err = server.fails(&["insert", "-c", "other", "--file", s(&file)]);
    assert!(err.starts_with("error: NOT_FOUND: collection `other` not found"), "{err}");
    server.ok(&[
        "collection",
        "create",
        "--schema",
        r#"{"name": "flat", "fields": [{"name": "id", "data_type": "Int64", "is_primary": true},
            {"name": "v", "data_type": {"FloatVector": {"dim": 2, "metric": "L2"}}},
            {"name": "tag", "data_type": {"VarChar": {"max_length": 4}}}]}"#,
    ]);
    let err = server.fails(&["insert", "-c", "flat", "--file", s(&file), "--batch-rows", "2"]);
    assert!(err.starts_with("error: INVALID_ARGUMENT: field `v`: row 0: dimension 3 does not match dim 2"), "{err}");
    assert!(err.contains("rows 1-2 of") && err.contains("0 rows before them were inserted"), "{err}");
}

#[test]
fn bad_addresses_and_arguments_are_clear_errors() {
    let err = failed(&["collection", "list"], vf(&["collection", "list", "--addr", "127.0.0.1:1"]));
    assert!(err.starts_with("error: cannot connect to http://127.0.0.1:1"), "{err}");
    assert!(err.contains("refused"), "{err}");
    let err = failed(&["query"], vf(&["query", "-c", "x", "--addr", "not an address"]));
    assert!(err.starts_with("error: invalid address `not an address`"), "{err}");
    let err = failed(&["sql"], vf(&["sql", "--addr", "127.0.0.1:1", "SELECT 1"]));
    assert!(err.starts_with("error: cannot connect to http://127.0.0.1:1"), "{err}");
    // sql takes exactly one of --addr and --data-dir.
    let err = failed(&["sql"], vf(&["sql", "SELECT 1"]));
    assert!(err.contains("--data-dir") && err.contains("--addr"), "{err}");
    let err = failed(&["sql"], vf(&["sql", "--addr", "127.0.0.1:1", "--data-dir", "/tmp", "SELECT 1"]));
    assert!(err.contains("cannot be used with"), "{err}");
    let err = failed(&["search"], vf(&["search", "-c", "x", "--addr", "127.0.0.1:1"]));
    assert!(err.contains("no query vector"), "{err}");
    let err = failed(&["search"], vf(&["search", "-c", "x", "--vector", "[1, oops]", "--addr", "127.0.0.1:1"]));
    assert!(err.contains("--vector #1: not JSON"), "{err}");
}

// ---- bench --addr, on a small synthetic dataset ----

/// Writes a `.npy` v1.0 file of little-endian 4-byte values (`<f4` or `<i4`).
fn write_npy(path: &Path, descr: &str, rows: usize, cols: usize, data: &[[u8; 4]]) {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    data.iter().for_each(|x| out.extend_from_slice(x));
    std::fs::write(path, out).unwrap();
}

/// A dataset folder (README layout): 600 unit vectors of dim 8, 20 queries,
/// a `month` attribute, ground truths `unfiltered` and `even` (`month % 2 = 0`).
fn synthetic_dataset(dir: &Path) {
    let (n, nq, dim, k) = (600usize, 20usize, 8usize, 10usize);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut unit = |count: usize| -> Vec<f32> {
        let mut data: Vec<f32> = (0..count * dim).map(|_| random()).collect();
        for v in data.chunks_exact_mut(dim) {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
        }
        data
    };
    let base = unit(n);
    let queries = unit(nq);
    let f32s = |v: &[f32]| v.iter().map(|x| x.to_le_bytes()).collect::<Vec<_>>();
    write_npy(&dir.join("base.npy"), "<f4", n, dim, &f32s(&base));
    write_npy(&dir.join("queries.npy"), "<f4", nq, dim, &f32s(&queries));
    let months: Vec<i32> = (0..n as i32).map(|i| i % 7).collect();
    let attrs = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", arrow::datatypes::DataType::Int32, false),
            Field::new("month", arrow::datatypes::DataType::Int32, false),
        ])),
        vec![Arc::new(Int32Array::from_iter_values(0..n as i32)), Arc::new(Int32Array::from(months.clone()))],
    )
    .unwrap();
    let file = std::fs::File::create(dir.join("base_attrs.parquet")).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, attrs.schema(), None).unwrap();
    writer.write(&attrs).unwrap();
    writer.close().unwrap();
    let mut truths = serde_json::Map::new();
    for (name, expression, passes) in [
        ("unfiltered", None, Box::new(|_: usize| true) as Box<dyn Fn(usize) -> bool>),
        ("even", Some("month % 2 = 0"), Box::new(|i: usize| months[i] % 2 == 0)),
    ] {
        let (mut ids, mut dists) = (Vec::new(), Vec::new());
        for q in queries.chunks_exact(dim) {
            let mut scored: Vec<(f32, i32)> = (0..n)
                .filter(|&i| passes(i))
                .map(|i| (base[i * dim..(i + 1) * dim].iter().zip(q).map(|(a, b)| a * b).sum::<f32>(), i as i32))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            ids.extend(scored[..k].iter().map(|s| s.1.to_le_bytes()));
            dists.extend(scored[..k].iter().map(|s| s.0.to_le_bytes()));
        }
        write_npy(&dir.join(format!("gt_{name}_ids.npy")), "<i4", nq, k, &ids);
        write_npy(&dir.join(format!("gt_{name}_dists.npy")), "<f4", nq, k, &dists);
        truths.insert(
            name.into(),
            json!({"expression": expression, "ids_file": format!("gt_{name}_ids.npy"),
                   "dists_file": format!("gt_{name}_dists.npy")}),
        );
    }
    let info = json!({"n_base": n, "n_queries": nq, "dim": dim, "k": k, "metric": "COSINE", "ground_truth": truths});
    std::fs::write(dir.join("filters.json"), info.to_string()).unwrap();
}

#[test]
fn bench_with_an_address_measures_grpc_next_to_the_engine() {
    let server = Server::start(&["--seal-rows", "200"]);
    let dataset = tempfile::tempdir().unwrap();
    synthetic_dataset(dataset.path());
    let out = tempfile::tempdir().unwrap();
    let args = [
        "bench",
        "--dataset",
        s(dataset.path()),
        "--out",
        s(out.path()),
        "--workers",
        "1",
        "--seal-rows",
        "200",
        "--ef",
        "32",
        "--clients",
        "1",
        "--grpc-clients",
        "1,2",
        "--exact-queries",
        "10",
    ];
    // A `bench_grpc` left from before (another schema, one row) is dropped and made anew.
    let dir = tempfile::tempdir().unwrap();
    server.ok(&["collection", "create", "--schema", &DOCS.replace("\"docs\"", "\"bench_grpc\"")]);
    let old = write(dir.path(), "old.jsonl", "{\"id\": 1, \"v\": [1, 2, 3]}\n");
    server.ok(&["insert", "-c", "bench_grpc", "--file", s(&old)]);
    let stdout = server.ok(&args);
    assert!(stdout.contains("vs engine"), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("grpc ") && l.trim_end().ends_with("none")), "{stdout}");
    let results: J = serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();
    assert!(results.pointer("/grpc_ingest/rows_per_s").and_then(J::as_f64).is_some_and(|r| r > 0.0), "{results}");
    let points = results["grpc"].as_array().expect("a list of grpc points");
    assert_eq!(points.len(), 4, "2 filters x 1 ef x 2 client counts: {points:?}");
    for point in points {
        for key in ["filter", "ef", "clients", "qps", "recall_at_k", "p50_ms", "p99_ms", "qps_vs_engine"] {
            assert!(point.get(key).is_some(), "a grpc point lacks {key}: {point}");
        }
        let recall = point["recall_at_k"].as_f64().unwrap();
        assert!(recall >= 0.9, "gRPC recall {recall} on 600 rows: {point}");
        // The engine ran 1 client only: a ratio there, none at 2 clients.
        assert_eq!(point["qps_vs_engine"].is_f64(), point["clients"] == json!(1), "{point}");
    }
    let count = lines(&server.ok(&["query", "-c", "bench_grpc", "--count", "--json"]));
    assert_eq!(count, vec![json!({"count": 600})]);
}
