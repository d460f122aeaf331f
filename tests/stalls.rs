//! Requests that used to stall the whole server (issue 20, rows 4–6), and the
//! read limits that bound them, through the real binary:
//! - a search too large for `max_search_hits` is refused with
//!   RESOURCE_EXHAUSTED before it reaches a worker;
//! - a heavy search whose deadline passes is stopped in the workers (the
//!   `reads_cancelled` count in `Health` shows it), and the server answers
//!   other reads at once;
//! - heavy searches and many small writes at once: every acknowledged write
//!   becomes visible to a Strong read, and the frontier watchdog reports no
//!   stall;
//! - `guarantee_ts` in the future is OUT_OF_RANGE at once; a query over
//!   `max_query_rows` is refused and asks for a limit.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{ServerProcess, wire};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use vectorflow_proto::pack_vectors;
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;
use vectorflow_proto::v1::{self, field_data::Values};

type Client = VectorflowClient<Channel>;

const DIM: usize = 16;
const BIG_ROWS: i64 = 12_000;
/// Limits of the test server: large enough for a search that keeps the
/// workers busy for seconds, small enough to test the query row bound.
const CONFIG: &str = "[limits]\nmax_search_hits = 4000000\nmax_query_rows = 5000\nmax_collections = 4\nmax_concurrent_requests = 8\nsql_timeout_ms = 1000\n\n[log]\nmax_in_flight_rows = 500\n";

fn vector(key: i64) -> Vec<f32> {
    (0..DIM as i64).map(|i| ((key * 37 + i * 101) % 997) as f32 / 97.0).collect()
}

fn insert(collection: &str, keys: std::ops::Range<i64>) -> v1::WriteRequest {
    let vectors: Vec<Vec<f32>> = keys.clone().map(vector).collect();
    wire::write(collection, vec![wire::ints("id", keys.collect()), wire::vectors("v", &vectors)])
}

fn strong() -> Option<v1::ReadOptions> {
    Some(v1::ReadOptions { consistency: v1::ConsistencyLevel::Strong as i32, as_of: 0, guarantee_ts: 0 })
}

fn heavy_search(nq: usize, k: u32) -> v1::SearchRequest {
    let queries: Vec<Vec<f32>> = (0..nq as i64).map(|q| vector(q * 13 + 5)).collect();
    v1::SearchRequest {
        collection: "big".into(),
        vectors: Some(pack_vectors(&queries)),
        k,
        read: strong(),
        ..Default::default()
    }
}

async fn count(client: &mut Client, collection: &str) -> Result<u64, tonic::Status> {
    let request =
        v1::QueryRequest { collection: collection.into(), count_only: true, read: strong(), ..Default::default() };
    Ok(client.query(request).await?.into_inner().count)
}

async fn health(client: &mut Client) -> v1::DataflowHealth {
    client.health(v1::Empty {}).await.expect("health").into_inner().dataflow.expect("dataflow health")
}

async fn connect(address: &str) -> Client {
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .expect("an address")
        .timeout(Duration::from_secs(120))
        .connect()
        .await
        .expect("connects");
    VectorflowClient::new(channel).max_decoding_message_size(1 << 30)
}

fn start(dir: &Path) -> ServerProcess {
    let config = dir.join("server.toml");
    std::fs::write(&config, CONFIG).expect("the config file");
    let data = dir.join("data");
    let config = config.display().to_string();
    ServerProcess::start(&data, &["--workers", "2", "--seal-rows", "3000", "--config", &config])
}

#[test]
fn heavy_and_hostile_reads_neither_stall_nor_starve_the_server() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let mut client = connect(&server.address).await;
        for name in ["big", "small", "writes"] {
            client
                .create_collection(v1::CreateCollectionRequest { schema: Some(wire::schema(name, DIM as u32, vec![])) })
                .await
                .expect("created");
        }
        for first in (0..BIG_ROWS).step_by(2000) {
            client.insert(insert("big", first..first + 2000)).await.expect("rows of big");
        }
        client.insert(insert("small", 0..200)).await.expect("rows of small");

        // Over max_search_hits: refused before any work, naming the limit.
        let refused = client.search(heavy_search(2000, 16_384)).await.expect_err("too many hits");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(refused.message().contains("max_search_hits"), "{}", refused.message());

        // A heavy search whose deadline passes: the workers stop its work.
        let cancelled_before = health(&mut client).await.reads_cancelled;
        let mut request = Request::new(heavy_search(200, 16_384));
        request.set_timeout(Duration::from_millis(300));
        let timed_out = client.search(request).await.expect_err("the deadline passes first");
        assert_eq!(timed_out.code(), Code::DeadlineExceeded, "{timed_out:?}");
        let mut stopped = false;
        for _ in 0..600 {
            if health(&mut client).await.reads_cancelled > cancelled_before {
                stopped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(stopped, "the workers never stopped the search whose deadline passed");
        assert_eq!(count(&mut client, "small").await.expect("a Strong count after the cancelled search"), 200);

        // Heavy searches while 4 clients write small batches to another
        // collection: every acknowledged write becomes visible.
        let done = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let searchers: Vec<_> = (0..2)
            .map(|_| {
                let (mut client, done) = (client.clone(), done.clone());
                tokio::spawn(async move {
                    let mut answered = 0;
                    while !done.load(Ordering::SeqCst) {
                        client.search(heavy_search(40, 16_384)).await.expect("a heavy search within the limits");
                        answered += 1;
                    }
                    answered
                })
            })
            .collect();
        let writers: Vec<_> = (0..4i64)
            .map(|writer| {
                let (mut client, acknowledged) = (client.clone(), acknowledged.clone());
                tokio::spawn(async move {
                    for batch in 0..150i64 {
                        let first = writer * 1_000_000 + batch * 10;
                        client.insert(insert("writes", first..first + 10)).await.expect("a write");
                        acknowledged.fetch_add(10, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("a writer");
        }
        done.store(true, Ordering::SeqCst);
        let mut searches = 0;
        for searcher in searchers {
            searches += searcher.await.expect("a searcher");
        }
        assert!(searches > 0, "no heavy search finished");
        let visible = count(&mut client, "writes").await.expect("a Strong count after the writes");
        assert_eq!(visible, acknowledged.load(Ordering::SeqCst), "every acknowledged write is visible");
        let dataflow = health(&mut client).await;
        assert_eq!(dataflow.frontier_stall_reports, 0, "{dataflow:?}");
        assert!(dataflow.applied_frontier > 0 && dataflow.rows_in_flight == 0, "{dataflow:?}");

        // A session token from the future cannot be waited for.
        let future = v1::ReadOptions {
            consistency: v1::ConsistencyLevel::Session as i32,
            as_of: 0,
            guarantee_ts: dataflow.next_ts + (3_600_000 << 18),
        };
        let request =
            v1::QueryRequest { collection: "small".into(), count_only: true, read: Some(future), ..Default::default() };
        let status = client.query(request).await.expect_err("a future guarantee_ts");
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

        // Query answers are bounded by max_query_rows (5,000 here).
        let unbounded = v1::QueryRequest { collection: "big".into(), read: strong(), ..Default::default() };
        let status = client.query(unbounded.clone()).await.expect_err("more rows than max_query_rows");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("max_query_rows"), "{}", status.message());
        let status = client
            .query(v1::QueryRequest { limit: 4000, offset: 2000, ..unbounded.clone() })
            .await
            .expect_err("limit + offset over max_query_rows");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let page =
            client.query(v1::QueryRequest { limit: 5000, ..unbounded.clone() }).await.expect("a page at the limit");
        assert_eq!(
            page.into_inner().columns.iter().find(|c| c.name == "id").map(|c| match &c.values {
                Some(Values::Ints(ints)) => ints.values.len(),
                _ => 0,
            }),
            Some(5000)
        );
        let filtered = v1::QueryRequest { filter: "id < 100".into(), ..unbounded };
        assert!(client.query(filtered).await.is_ok(), "a query under the limit needs no limit");
        assert_eq!(count(&mut client, "big").await.expect("count is not bounded by max_query_rows"), BIG_ROWS as u64);

        // Load shedding: 24 heavy searches at once against 8 permits; the
        // calls over the limit are refused at once, the others answer, and
        // health checks are always served.
        let calls: Vec<_> = (0..24)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move { client.search(heavy_search(20, 16_384)).await.map(|_| ()) })
            })
            .collect();
        let health_while_loaded = health(&mut client).await;
        let (mut answered, mut shed) = (0, 0);
        for call in calls {
            match call.await.expect("a search task") {
                Ok(()) => answered += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(status.message().contains("max_concurrent_requests"), "{}", status.message());
                    shed += 1;
                }
            }
        }
        assert!(answered >= 1 && shed >= 1, "{answered} answered, {shed} shed");
        assert!(health_while_loaded.applied_frontier > 0);

        // The catalog is bounded too (4 collections here).
        let create = |name: &str| v1::CreateCollectionRequest { schema: Some(wire::schema(name, DIM as u32, vec![])) };
        client.create_collection(create("fourth")).await.expect("the fourth collection");
        let status = client.create_collection(create("fifth")).await.expect_err("over max_collections");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("max_collections"), "{}", status.message());

        // SQL errors keep their class: a statement past sql_timeout_ms
        // (1 s here) is DEADLINE_EXCEEDED, a bad one INVALID_ARGUMENT.
        let sql = |query: &str| v1::SqlRequest { query: query.into() };
        // 12,000^2 = 144 million joined rows, a sine each: seconds of work
        // in any build (a third table would hit the memory limit first).
        let slow = "SELECT count(*) FROM big a, big b WHERE sin(a.id + b.id) > 2";
        let outcome = match client.sql(sql(slow)).await {
            Err(status) => Err(status),
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut outcome = Ok(());
                while let Some(item) = tokio_stream::StreamExt::next(&mut stream).await {
                    if let Err(status) = item {
                        outcome = Err(status);
                        break;
                    }
                }
                outcome
            }
        };
        let status = outcome.expect_err("144 million sines are past a 1 s timeout");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        let status = client.sql(sql("SELECT nope FROM small")).await.expect_err("an unknown column");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(client.sql(sql("SELECT count(*) FROM small")).await.is_ok());
    });
}
