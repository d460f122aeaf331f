//! End-to-end tests of `vectorflow serve`: the real binary on an ephemeral
//! loopback port, driven by the generated tonic client.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::ServerProcess;
use tonic::Code;
use tonic::transport::Channel;
use vectorflow::Value;
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;
use vectorflow_proto::v1::{self, field_data::Values};
use vectorflow_proto::{column_values, pack_vectors, pks_from_proto, pks_to_proto};

/// The server process and a client factory.
struct Server {
    process: ServerProcess,
    address: String,
}

impl Server {
    fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let process = ServerProcess::start(data_dir, extra);
        let address = format!("http://{}", process.address);
        Server { process, address }
    }

    async fn client(&self) -> VectorflowClient<Channel> {
        VectorflowClient::connect(self.address.clone()).await.expect("connects").max_decoding_message_size(1 << 30)
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        self.process.terminate()
    }
}

fn schema(name: &str) -> v1::CollectionSchema {
    common::wire::schema(name, 2, vec![common::wire::nullable_varchar("tag", 16)])
}

fn rows(ids: &[i64], tag: &str) -> v1::WriteRequest {
    let vectors: Vec<Vec<f32>> = ids.iter().map(|&i| vec![i as f32, (i % 7) as f32]).collect();
    v1::WriteRequest {
        collection: "docs".into(),
        columns: vec![
            v1::FieldData {
                name: "id".into(),
                nulls: vec![],
                values: Some(Values::Ints(v1::IntValues { values: ids.to_vec() })),
            },
            v1::FieldData { name: "v".into(), nulls: vec![], values: Some(Values::Vectors(pack_vectors(&vectors))) },
            v1::FieldData {
                name: "tag".into(),
                nulls: vec![],
                values: Some(Values::Strings(v1::StringValues { values: vec![tag.to_string(); ids.len()] })),
            },
        ],
        ..Default::default()
    }
}

fn search(vector: [f32; 2], k: u32) -> v1::SearchRequest {
    v1::SearchRequest {
        collection: "docs".into(),
        vectors: Some(pack_vectors(&[vector.to_vec()])),
        k,
        ..Default::default()
    }
}

fn keys(keys: Option<v1::PrimaryKeys>) -> Vec<i64> {
    pks_from_proto(keys).unwrap().into_iter().map(|pk| if let vectorflow::Pk::Int(v) = pk { v } else { -1 }).collect()
}

fn query(filter: &str) -> v1::QueryRequest {
    v1::QueryRequest { collection: "docs".into(), filter: filter.into(), ..Default::default() }
}

fn column_ints(columns: &[v1::FieldData], name: &str) -> Vec<i64> {
    let column = columns.iter().find(|c| c.name == name).expect("column present");
    column_values(column).iter().map(|v| v.as_i64().unwrap_or(-1)).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

#[test]
fn the_whole_lifecycle_through_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--seal-rows", "64"]);
    runtime().block_on(async {
        let mut client = server.client().await;
        assert_eq!(client.health(v1::Empty {}).await.unwrap().into_inner().status, "SERVING");
        let info = client
            .create_collection(v1::CreateCollectionRequest { schema: Some(schema("docs")) })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.schema.unwrap().fields.len(), 3);
        assert_eq!(client.list_collections(v1::Empty {}).await.unwrap().into_inner().names, vec!["docs"]);
        let described = client.describe_collection(v1::CollectionRef { name: "docs".into() }).await.unwrap();
        assert_eq!(described.into_inner().schema.unwrap().fields[1].dim, 2);

        // A Strong search right after each acknowledged insert sees it.
        let mut writes = Vec::new();
        for id in 0..40i64 {
            let write = client.insert(rows(&[id], "a")).await.unwrap().into_inner();
            assert_eq!(keys(write.keys.clone()), vec![id]);
            writes.push(write.ts);
            let hits = client.search(search([id as f32, (id % 7) as f32], 1)).await.unwrap().into_inner();
            assert_eq!(keys(hits.results[0].keys.clone()), vec![id], "insert {id} visible at once");
        }
        // Arrow IPC writes too.
        let batch = vectorflow_proto::columns_to_batch(rows(&[100, 101], "ipc").columns).unwrap();
        let ipc = v1::WriteRequest {
            collection: "docs".into(),
            columns: vec![],
            arrow_ipc: vectorflow_proto::batch_to_ipc(&batch).unwrap(),
            ..Default::default()
        };
        client.insert(ipc).await.unwrap();
        let counted = client.query(v1::QueryRequest { count_only: true, ..query("") }).await.unwrap().into_inner();
        assert_eq!(counted.count, 42);

        // Query with filter, output fields, limit and offset; get by keys.
        let page = client
            .query(v1::QueryRequest {
                output_fields: vec!["tag".into()],
                limit: 3,
                offset: 2,
                ..query("id >= 10 and id < 20")
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(column_ints(&page.columns, "id"), vec![12, 13, 14]);
        let tags = column_values(page.columns.iter().find(|c| c.name == "tag").unwrap());
        assert_eq!(tags, vec![Value::from("a"); 3]);
        let got = client
            .get(v1::GetRequest {
                collection: "docs".into(),
                keys: Some(pks_to_proto(&[vectorflow::Pk::Int(101), vectorflow::Pk::Int(999)])),
                output_fields: vec!["tag".into(), "v".into()],
                read: None,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(column_ints(&got.columns, "id"), vec![101]);
        assert_eq!(
            column_values(got.columns.iter().find(|c| c.name == "v").unwrap()),
            vec![Value::Vector(vec![101.0, 3.0])]
        );

        // Upsert, delete by keys and by filter, then time travel to before them.
        let before = writes[39] + 1;
        client.upsert(v1::WriteRequest { ..rows(&[5], "moved") }).await.unwrap();
        let deleted = client
            .delete(v1::DeleteRequest {
                collection: "docs".into(),
                target: Some(v1::delete_request::Target::Keys(pks_to_proto(&[vectorflow::Pk::Int(0)]))),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(deleted.ts > before);
        let by_filter = client
            .delete(v1::DeleteRequest {
                collection: "docs".into(),
                target: Some(v1::delete_request::Target::Filter("id >= 30 and id < 40".into())),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(keys(by_filter.keys).len(), 10);
        let now = client.query(v1::QueryRequest { count_only: true, ..query("") }).await.unwrap().into_inner();
        assert_eq!(now.count, 42 - 11);
        let then = v1::ReadOptions { as_of: before, ..Default::default() };
        let old = client
            .query(v1::QueryRequest { count_only: true, read: Some(then), ..query("") })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(old.count, 40, "as of `before`: the 40 single inserts, not the IPC rows");
        let old_hit =
            client.search(v1::SearchRequest { read: Some(then), ..search([0.0, 0.0], 1) }).await.unwrap().into_inner();
        assert_eq!(keys(old_hit.results[0].keys.clone()), vec![0], "the deleted row, as of before the delete");
        let moved =
            client.query(v1::QueryRequest { output_fields: vec!["tag".into()], ..query("id == 5") }).await.unwrap();
        assert_eq!(column_values(&moved.into_inner().columns[1]), vec![Value::from("moved")]);

        let flushed = client.flush(v1::CollectionRef { name: "docs".into() }).await.unwrap().into_inner();
        assert!(flushed.flush_ts > by_filter.ts);
        let stats = client
            .get_stats(v1::StatsRequest { collection: "docs".into(), consistency: v1::ConsistencyLevel::Strong as i32 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.live_rows, 31);
        // Fewer rows than a segment: the flush stored them without sealing.
        assert_eq!(stats.sealed_segments, 0);
        assert!(stats.growing_rows >= 31, "{stats:?}");

        client.drop_collection(v1::CollectionRef { name: "docs".into() }).await.unwrap();
        let gone = client.describe_collection(v1::CollectionRef { name: "docs".into() }).await.unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
    });
}

#[test]
fn bad_requests_get_precise_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-message-bytes", "200000"]);
    runtime().block_on(async {
        let mut client = server.client().await;
        client.create_collection(v1::CreateCollectionRequest { schema: Some(schema("docs")) }).await.unwrap();
        client.insert(rows(&[1, 2, 3], "a")).await.unwrap();
        let code_and_message = |result: Result<tonic::Response<_>, tonic::Status>| match result {
            Err(status) => (status.code(), status.message().to_string()),
            Ok(_) => (Code::Ok, String::new()),
        };

        let (code, message) = code_and_message(
            client
                .search(v1::SearchRequest {
                    vectors: Some(pack_vectors(&[vec![1.0, 2.0, 3.0]])),
                    ..search([0.0, 0.0], 1)
                })
                .await
                .map(|_| tonic::Response::new(())),
        );
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("`v`") && message.contains("dimension 3"), "{message}");

        let mut wrong_type = rows(&[4], "a");
        wrong_type.columns[2].values = Some(Values::Doubles(v1::DoubleValues { values: vec![1.5] }));
        let (code, message) = code_and_message(client.insert(wrong_type).await.map(|_| tonic::Response::new(())));
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("tag"), "{message}");

        let (code, message) =
            code_and_message(client.query(query("id > 1 and colour == 2")).await.map(|_| tonic::Response::new(())));
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("position 11") && message.contains("colour"), "{message}");

        let (code, _) = code_and_message(
            client
                .search(v1::SearchRequest { collection: "nope".into(), ..search([0.0, 0.0], 1) })
                .await
                .map(|_| tonic::Response::new(())),
        );
        assert_eq!(code, Code::NotFound);

        let (code, _) = code_and_message(
            client
                .create_collection(v1::CreateCollectionRequest { schema: Some(schema("docs")) })
                .await
                .map(|_| tonic::Response::new(())),
        );
        assert_eq!(code, Code::AlreadyExists);

        let ancient = v1::ReadOptions { as_of: 1 << 18, ..Default::default() };
        let (code, message) = code_and_message(
            client
                .search(v1::SearchRequest { read: Some(ancient), ..search([0.0, 0.0], 1) })
                .await
                .map(|_| tonic::Response::new(())),
        );
        assert_eq!(code, Code::FailedPrecondition);
        assert!(message.contains("retention"), "{message}");

        let future = v1::ReadOptions { as_of: u64::MAX / 2, ..Default::default() };
        let (code, _) = code_and_message(
            client.query(v1::QueryRequest { read: Some(future), ..query("") }).await.map(|_| tonic::Response::new(())),
        );
        assert_eq!(code, Code::OutOfRange);

        // Bigger than max_message_bytes (200,000): about 400 KB of vectors.
        let big: Vec<i64> = (1000..26_000).collect();
        let (code, message) =
            code_and_message(client.insert(rows(&big, "big")).await.map(|_| tonic::Response::new(())));
        assert_eq!(code, Code::ResourceExhausted, "{message}");
        // Far beyond it the transport refuses before our handler: the same code.
        let huge: Vec<i64> = (0..200_000).collect();
        let (code, message) =
            code_and_message(client.insert(rows(&huge, "huge")).await.map(|_| tonic::Response::new(())));
        assert_eq!(code, Code::ResourceExhausted, "{message}");

        // A session timestamp 30 s ahead cannot be waited for: OUT_OF_RANGE
        // at once, not a wait until the deadline.
        let ahead = (vectorflow::crates::core::time::wall_clock_ms() + 30_000) << 18;
        let waiting = v1::ReadOptions {
            consistency: v1::ConsistencyLevel::Session as i32,
            guarantee_ts: ahead,
            ..Default::default()
        };
        let mut request = tonic::Request::new(v1::SearchRequest { read: Some(waiting), ..search([0.0, 0.0], 1) });
        request.set_timeout(Duration::from_secs(10));
        let (code, message) = code_and_message(client.search(request).await.map(|_| tonic::Response::new(())));
        assert_eq!(code, Code::OutOfRange, "{message}");
        assert!(message.contains("in the future"), "{message}");

        // A deadline too short for any answer: the server refuses it at
        // once (under 20 ms leaves nothing after the margin kept for
        // answering). 10 ms, not less: tonic's own timer starts when the
        // request arrives, and on a loaded machine a 1 ms one fired before
        // the handler had the request's body (CANCELLED).
        let mut request = tonic::Request::new(search([0.0, 0.0], 1));
        request.set_timeout(Duration::from_millis(10));
        let (code, message) = code_and_message(client.search(request).await.map(|_| tonic::Response::new(())));
        assert_eq!(code, Code::DeadlineExceeded, "{message}");

        let (code, message) = code_and_message(
            client.search(v1::SearchRequest { k: 0, ..search([0.0, 0.0], 1) }).await.map(|_| tonic::Response::new(())),
        );
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("`k`"), "{message}");
        let (code, _) = code_and_message(
            client
                .search(v1::SearchRequest { vectors: None, ..search([0.0, 0.0], 1) })
                .await
                .map(|_| tonic::Response::new(())),
        );
        assert_eq!(code, Code::InvalidArgument);
        let (code, message) = code_and_message(
            client
                .sql(v1::SqlRequest { query: "SELECT nope FROM docs".into() })
                .await
                .map(|_| tonic::Response::new(())),
        );
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("nope"), "{message}");
        // The server is still serving after all of that.
        assert_eq!(client.health(v1::Empty {}).await.unwrap().into_inner().status, "SERVING");
    });
}

#[test]
fn sql_streams_the_same_rows_as_the_api_and_reflection_lists_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--seal-rows", "100"]);
    runtime().block_on(async {
        let mut client = server.client().await;
        client.create_collection(v1::CreateCollectionRequest { schema: Some(schema("docs")) }).await.unwrap();
        for chunk in (0..500i64).collect::<Vec<_>>().chunks(100) {
            client.insert(rows(chunk, if chunk[0] % 200 == 0 { "even" } else { "odd" })).await.unwrap();
        }
        let mut stream = client
            .sql(v1::SqlRequest { query: "SELECT id, tag FROM docs WHERE tag = 'odd' ORDER BY id".into() })
            .await
            .unwrap()
            .into_inner();
        let mut sql_ids = Vec::new();
        while let Some(message) = stream.message().await.unwrap() {
            let batch = vectorflow_proto::ipc_to_batch(&message.arrow_ipc).unwrap();
            let ids = batch.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
            sql_ids.extend(ids.values().iter().copied());
        }
        let api = client.query(query("tag == 'odd'")).await.unwrap().into_inner();
        let mut api_ids = column_ints(&api.columns, "id");
        api_ids.sort();
        assert_eq!(sql_ids.len(), 200);
        assert_eq!(sql_ids, api_ids);

        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let channel = Channel::from_shared(server.address.clone()).unwrap().connect().await.unwrap();
        let mut reflection = ServerReflectionClient::new(channel);
        let request = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses =
            reflection.server_reflection_info(futures::stream::iter(vec![request])).await.unwrap().into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("expected a service list")
        };
        assert!(list.service.iter().any(|s| s.name == "vectorflow.v1.Vectorflow"), "{list:?}");
    });
}

#[test]
fn eight_concurrent_clients_mixing_writes_and_searches_finish_with_correct_counts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--seal-rows", "200"]);
    runtime().block_on(async {
        let mut client = server.client().await;
        client.create_collection(v1::CreateCollectionRequest { schema: Some(schema("docs")) }).await.unwrap();
        let mut tasks = Vec::new();
        for c in 0..8i64 {
            let mut client = server.client().await;
            tasks.push(tokio::spawn(async move {
                for batch in 0..10i64 {
                    let ids: Vec<i64> = (0..10).map(|i| c * 1000 + batch * 10 + i).collect();
                    client.insert(rows(&ids, "t")).await.unwrap();
                    let hit =
                        client.search(search([ids[3] as f32, (ids[3] % 7) as f32], 1)).await.unwrap().into_inner();
                    assert_eq!(keys(hit.results[0].keys.clone()), vec![ids[3]], "client {c} sees its write");
                }
                let mine = client
                    .query(v1::QueryRequest {
                        count_only: true,
                        ..query(&format!("id >= {} and id < {}", c * 1000, c * 1000 + 1000))
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(mine.count, 100);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let all = client.query(v1::QueryRequest { count_only: true, ..query("") }).await.unwrap().into_inner();
        assert_eq!(all.count, 800);
    });
}

#[test]
fn sigterm_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let acknowledged = runtime().block_on(async {
        let mut client = server.client().await;
        client.create_collection(v1::CreateCollectionRequest { schema: Some(schema("docs")) }).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..4i64 {
            let mut client = server.client().await;
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut id = w * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    match client.insert(rows(&[id, id + 1], "w")).await {
                        Ok(_) => acked.extend([id, id + 1]),
                        Err(_) => break,
                    }
                    id += 2;
                }
                acked
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = tokio::task::spawn_blocking(move || {
            let status = server.terminate();
            (status, server)
        });
        let (status, server_after) = status.await.unwrap();
        assert!(status.success(), "graceful shutdown exits cleanly: {status:?}");
        drop(server_after);
        stop.store(true, Ordering::Relaxed);
        let mut acked = Vec::new();
        for writer in writers {
            acked.extend(writer.await.unwrap());
        }
        acked
    });
    assert!(acknowledged.len() > 20, "writes were acknowledged before SIGTERM: {}", acknowledged.len());
    let restarted = Server::start(dir.path(), &[]);
    runtime().block_on(async {
        let mut client = restarted.client().await;
        let all = client.query(v1::QueryRequest { limit: 0, ..query("") }).await.unwrap().into_inner();
        let mut present = column_ints(&all.columns, "id");
        present.sort();
        let mut expected = acknowledged.clone();
        expected.sort();
        let missing: Vec<_> = expected.iter().filter(|id| present.binary_search(id).is_err()).take(5).collect();
        assert!(missing.is_empty(), "acknowledged writes missing after restart: {missing:?}");
    });
}

/// `Subscribe` through the real server: the first event is the answer,
/// a write shows up as a change at the write's timestamp within the time a
/// Strong read takes; a changefeed subscriber that stops reading is ended
/// with RESOURCE_EXHAUSTED while the writes go on; `vectorflow subscribe`
/// prints the events.
#[test]
fn subscriptions_stream_changes_and_a_slow_subscriber_is_ended() {
    use v1::subscribe_event::Event;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    runtime().block_on(async {
        let mut client = server.client().await;
        client.create_collection(v1::CreateCollectionRequest { schema: Some(schema("docs")) }).await.unwrap();
        client.insert(rows(&[1, 2, 3], "a")).await.unwrap();
        let request = v1::SubscribeRequest {
            collection: "docs".into(),
            vectors: Some(pack_vectors(&[vec![10.0, 3.0]])),
            k: 2,
            output_fields: vec!["tag".into()],
            ..Default::default()
        };
        let mut events = client.subscribe(request).await.unwrap().into_inner();
        let first = events.message().await.unwrap().unwrap();
        let Some(Event::Snapshot(snapshot)) = first.event else { panic!("first event: {first:?}") };
        assert_eq!(keys(snapshot.results[0].keys.clone()), vec![3, 2]);

        let started = Instant::now();
        let write = client.insert(rows(&[10], "b")).await.unwrap().into_inner();
        let change = loop {
            let event =
                tokio::time::timeout(Duration::from_secs(10), events.message()).await.unwrap().unwrap().unwrap();
            match event.event {
                Some(Event::Progress(_)) => continue,
                Some(Event::Changed(changed)) => break (event.ts, changed),
                other => panic!("unexpected event {other:?}"),
            }
        };
        let visible_after = started.elapsed();
        assert_eq!(change.0, write.ts, "the change carries the write's timestamp");
        let changed = &change.1.changes[0];
        assert_eq!(keys(changed.added.clone().and_then(|h| h.keys)), vec![10]);
        assert_eq!(keys(changed.removed.clone().and_then(|h| h.keys)), vec![2]);
        // Within what a Strong read of it takes, with room for a loaded machine.
        let strong_started = Instant::now();
        client.search(search([10.0, 3.0], 1)).await.unwrap();
        assert!(visible_after < strong_started.elapsed() + Duration::from_secs(2), "{visible_after:?}");

        drop(events);

        // A changefeed on a connection of its own (with small transport
        // windows) that reads nothing while 4,000 rows are written: the
        // windows fill, then the subscription's buffer, and the server ends
        // it; the writes go on.
        let small_windows = tonic::transport::Endpoint::from_shared(server.address.clone())
            .unwrap()
            .initial_stream_window_size(Some(4096))
            .initial_connection_window_size(Some(4096));
        let mut other = VectorflowClient::new(small_windows.connect().await.unwrap());
        let feed = v1::SubscribeRequest {
            collection: "docs".into(),
            output_fields: vec!["v".into(), "tag".into()],
            buffer: 2,
            ..Default::default()
        };
        let mut slow = other.subscribe(feed).await.unwrap().into_inner();
        for batch in 0..40 {
            let ids: Vec<i64> = (0..100).map(|i| 1_000 + batch * 100 + i).collect();
            client.insert(rows(&ids, "c")).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let ended = loop {
            assert!(Instant::now() < deadline, "the slow subscription was not ended within 60 s");
            match tokio::time::timeout(Duration::from_secs(30), slow.message()).await.unwrap() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the slow subscription ended without an error"),
                Err(status) => break status,
            }
        };
        assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
        assert!(ended.message().contains("subscription_buffer"), "{}", ended.message());
        let count = v1::QueryRequest { count_only: true, ..query("") };
        assert_eq!(client.query(count).await.unwrap().into_inner().count, 4_004);
    });
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(["subscribe", "--addr", &server.address, "-c", "docs", "--vector", "[10, 3]", "--k", "1"])
        .args(["--events", "1", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout} {}", String::from_utf8_lossy(&output.stderr));
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap_or_default()).unwrap();
    assert_eq!((line["change"].as_str(), line["id"].as_i64()), (Some("snapshot"), Some(10)));
}
