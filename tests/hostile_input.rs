//! Hostile requests to the real `vectorflow serve` binary (issue 20): each
//! is answered INVALID_ARGUMENT with a short message naming the field, and
//! the server keeps serving correct answers afterwards.

mod common;

use std::path::Path;

use common::{ServerProcess, wire};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;
use vectorflow_proto::v1::{self, field_data::Values};
use vectorflow_proto::{pack_vectors, pks_from_proto, pks_to_proto};

/// The longest message a refusal may carry (gRPC sends it in a header).
const SHORT: usize = 1024;

struct Server {
    _process: ServerProcess,
    address: String,
}

impl Server {
    fn start(data_dir: &Path) -> Server {
        let process = ServerProcess::start(data_dir, &[]);
        let address = format!("http://{}", process.address);
        Server { _process: process, address }
    }

    async fn client(&self) -> VectorflowClient<Channel> {
        VectorflowClient::connect(self.address.clone()).await.expect("connects")
    }

    /// A client sending raw bytes as request bodies, for what the generated
    /// client cannot encode (strings that are not UTF-8, broken protobuf).
    async fn raw(&self) -> tonic::client::Grpc<Channel> {
        let channel =
            Channel::from_shared(self.address.clone()).expect("an address").connect().await.expect("connects");
        tonic::client::Grpc::new(channel)
    }
}

/// `id` int64, `v` float_vector(2) L2, `tag` varchar(16) nullable.
fn schema(name: &str) -> v1::CollectionSchema {
    wire::schema(name, 2, vec![wire::nullable_varchar("tag", 16)])
}

fn ids(values: &[i64]) -> v1::FieldData {
    v1::FieldData {
        name: "id".into(),
        nulls: vec![],
        values: Some(Values::Ints(v1::IntValues { values: values.to_vec() })),
    }
}

fn vectors(vectors: &[Vec<f32>]) -> v1::FieldData {
    v1::FieldData { name: "v".into(), nulls: vec![], values: Some(Values::Vectors(pack_vectors(vectors))) }
}

fn write(columns: Vec<v1::FieldData>) -> v1::WriteRequest {
    v1::WriteRequest { collection: "docs".into(), columns, ..Default::default() }
}

fn search(vector: Vec<f32>) -> v1::SearchRequest {
    v1::SearchRequest { collection: "docs".into(), vectors: Some(pack_vectors(&[vector])), k: 1, ..Default::default() }
}

fn query(filter: &str) -> v1::QueryRequest {
    v1::QueryRequest { collection: "docs".into(), filter: filter.into(), ..Default::default() }
}

fn int_keys(keys: Option<v1::PrimaryKeys>) -> Vec<i64> {
    pks_from_proto(keys).unwrap().into_iter().map(|pk| if let vectorflow::Pk::Int(v) = pk { v } else { -1 }).collect()
}

/// Asserts a refusal: INVALID_ARGUMENT, a short message, holding every
/// piece of `names` (the field and the problem).
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>, names: &[&str]) {
    let status = match result {
        Ok(answer) => panic!("{what}: accepted, answered {answer:?}"),
        Err(status) => status,
    };
    let message = status.message();
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {message}");
    assert!(message.len() < SHORT, "{what}: a message of {} bytes", message.len());
    for name in names {
        assert!(message.contains(name), "{what}: {message:?} does not say {name:?}");
    }
}

/// The server still answers a normal request, and correctly: the row
/// nearest to [2, 2] is id 2, and there are three rows.
async fn still_serving(client: &mut VectorflowClient<Channel>) {
    assert_eq!(client.health(v1::Empty {}).await.expect("health").into_inner().status, "SERVING");
    let hits = client.search(search(vec![2.0, 2.0])).await.expect("a normal search").into_inner();
    assert_eq!(int_keys(hits.results[0].keys.clone()), vec![2]);
    let count = client.query(v1::QueryRequest { count_only: true, ..query("") }).await.expect("a count");
    assert_eq!(count.into_inner().count, 3);
}

/// Request bodies as raw bytes; answers are not decoded (only the status matters).
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buffer: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buffer, &item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = bytes::Buf::copy_to_bytes(buffer, bytes::Buf::remaining(buffer));
        Ok(Some(bytes.to_vec()))
    }
}

/// A length-delimited protobuf field (`tag` with wire type 2) holding `bytes`.
fn field_bytes(tag: u8, bytes: &[u8]) -> Vec<u8> {
    assert!(bytes.len() < 128, "one-byte lengths only");
    let mut out = vec![(tag << 3) | 2, bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

async fn unary(grpc: &mut tonic::client::Grpc<Channel>, method: &str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    grpc.ready().await.expect("the channel is ready");
    let path = http::uri::PathAndQuery::try_from(format!("/vectorflow.v1.Vectorflow/{method}")).expect("a path");
    grpc.unary(tonic::Request::new(body), path, RawCodec).await.map(tonic::Response::into_inner)
}

#[test]
fn hostile_requests_are_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = server.client().await;
        client.create_collection(v1::CreateCollectionRequest { schema: Some(schema("docs")) }).await.unwrap();
        client
            .insert(write(vec![ids(&[1, 2, 3]), vectors(&[vec![1.0, 1.0], vec![2.0, 2.0], vec![3.0, 3.0]])]))
            .await
            .unwrap();
        still_serving(&mut client).await;

        // Row 7: 16 bytes declaring 2 GiB of IPC metadata.
        let mut hostile = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        hostile.extend([0; 8]);
        let ipc = v1::WriteRequest { collection: "docs".into(), arrow_ipc: hostile, ..Default::default() };
        assert_refused("2 GiB of IPC metadata", client.insert(ipc).await, &["arrow_ipc", "2147483647 bytes"]);
        still_serving(&mut client).await;

        // Row 9: long names and defaults are quoted, not echoed.
        let long = schema(&"c".repeat(10_000));
        let created = client.create_collection(v1::CreateCollectionRequest { schema: Some(long) }).await;
        assert_refused("a 10,000-character collection name", created, &["collection name", "(10000 characters)"]);
        let mut defaulted = schema("defaults");
        defaulted.fields[2].default_json = format!("\"{}\"", "d".repeat(1 << 20));
        let created = client.create_collection(v1::CreateCollectionRequest { schema: Some(defaulted) }).await;
        assert_refused("a 1 MiB default", created, &["`tag`", "does not fit"]);
        let mut long_column = ids(&[4]);
        long_column.name = "n".repeat(10_000);
        let written = client.insert(write(vec![long_column, vectors(&[vec![4.0, 4.0]])])).await;
        assert_refused("a 10,000-character column name", written, &["no such field", "(10000 characters)"]);
        let described = client.describe_collection(v1::CollectionRef { name: "x".repeat(10_000) }).await;
        let status = described.expect_err("no such collection");
        assert_eq!(status.code(), Code::NotFound, "{}", status.message());
        assert!(status.message().len() < SHORT, "a message of {} bytes", status.message().len());
        still_serving(&mut client).await;

        // Row 10: evaluation errors of a filter are the filter's fault.
        assert_refused("division by zero in a filter", client.query(query("id / 0 > 1")).await, &["filter", "by zero"]);
        // Bodies that do not decode: names, filters and SQL that are not
        // UTF-8, and bytes that are not protobuf at all.
        let mut raw = server.raw().await;
        let not_utf8 = [b'd', 0xff, 0xfe];
        let described = unary(&mut raw, "DescribeCollection", field_bytes(1, &not_utf8)).await;
        assert_refused("a collection name that is not UTF-8", described, &["CollectionRef.name", "UTF-8"]);
        let mut body = field_bytes(1, b"docs");
        body.extend(field_bytes(2, &not_utf8));
        let queried = unary(&mut raw, "Query", body).await;
        assert_refused("a filter that is not UTF-8", queried, &["QueryRequest.filter", "UTF-8"]);
        raw.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/vectorflow.v1.Vectorflow/Sql");
        let streamed = raw.server_streaming(tonic::Request::new(field_bytes(1, &not_utf8)), path, RawCodec).await;
        assert_refused("SQL that is not UTF-8", streamed.map(|_| ()), &["SqlRequest.query", "UTF-8"]);
        // Field 1 of CollectionRef as a varint: the wrong wire type.
        let wrong_wire_type = unary(&mut raw, "DescribeCollection", vec![0x08, 0x01]).await;
        assert_refused("a name with the wrong wire type", wrong_wire_type, &["CollectionRef.name", "wire type"]);
        let truncated = unary(&mut raw, "DescribeCollection", vec![0x0a, 0x20, b'd']).await;
        assert_refused("a truncated body", truncated, &["decode"]);
        still_serving(&mut client).await;

        // Row 11: what was silently accepted.
        let twice = client.insert(write(vec![ids(&[5]), vectors(&[vec![5.0, 5.0]]), ids(&[6])])).await;
        assert_refused("the id column twice", twice, &["`id`", "given twice"]);
        let mut null_vector = vectors(&[vec![5.0, 5.0]]);
        null_vector.nulls = vec![true];
        let nulls = client.insert(write(vec![ids(&[5]), null_vector])).await;
        assert_refused("a null for a non-nullable vector", nulls, &["`v`", "null"]);
        let unknown = v1::ReadOptions { consistency: 99, ..Default::default() };
        let read = client.search(v1::SearchRequest { read: Some(unknown), ..search(vec![1.0, 1.0]) }).await;
        assert_refused("consistency 99", read, &["read.consistency", "99"]);
        let stats = client.get_stats(v1::StatsRequest { collection: "docs".into(), consistency: 99 }).await;
        assert_refused("stats with consistency 99", stats, &["consistency", "99"]);
        let mut metric = schema("metrics");
        metric.fields[1].metric = 99;
        let created = client.create_collection(v1::CreateCollectionRequest { schema: Some(metric) }).await;
        assert_refused("metric 99", created, &["`v`", "unknown metric 99"]);
        let string_keys = pks_to_proto(&[vectorflow::Pk::from("1")]);
        let got = client
            .get(v1::GetRequest { collection: "docs".into(), keys: Some(string_keys.clone()), ..Default::default() })
            .await;
        assert_refused("string keys on an int64 key", got, &["`id`", "int64"]);
        let target = Some(v1::delete_request::Target::Keys(string_keys));
        let deleted =
            client.delete(v1::DeleteRequest { collection: "docs".into(), target, ..Default::default() }).await;
        assert_refused("deleting string keys on an int64 key", deleted, &["`id`", "int64"]);
        let huge = client.insert(write(vec![ids(&[7]), vectors(&[vec![3e38, 0.0]])])).await;
        assert_refused("a vector whose score overflows", huge, &["`v`", "overflow f32"]);
        let huge = client.search(search(vec![3e38, 3e38])).await;
        assert_refused("a query vector whose score overflows", huge, &["`v`", "query 0", "overflow f32"]);
        let infinite = client.insert(write(vec![ids(&[7]), vectors(&[vec![f32::INFINITY, 0.0]])])).await;
        assert_refused("an infinite vector", infinite, &["`v`", "finite"]);
        still_serving(&mut client).await;
    });
}

/// Row 11's last case: an integer overflow while evaluating a filter is an
/// error of the filter, not a wrapped value that silently selects rows.
#[test]
fn integer_overflow_in_a_filter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = server.client().await;
        client.create_collection(v1::CreateCollectionRequest { schema: Some(schema("docs")) }).await.unwrap();
        client
            .insert(write(vec![ids(&[1, 2, 3]), vectors(&[vec![1.0, 1.0], vec![2.0, 2.0], vec![3.0, 3.0]])]))
            .await
            .unwrap();
        let overflowing = client.query(query("9223372036854775807 + id > 0")).await;
        assert_refused("9223372036854775807 + id", overflowing, &["filter", "overflow"]);
        still_serving(&mut client).await;
    });
}
