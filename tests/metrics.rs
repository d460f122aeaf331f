//! Prometheus `/metrics` of the real binary: calls by method and code,
//! engine figures, credentials when `[auth]` is on, and the loopback rule.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{ServerProcess, wire};
use sha2::Digest;
use tonic::Code;
use tonic::transport::Endpoint;
use vectorflow_proto::pack_vectors;
use vectorflow_proto::v1::{self, vectorflow_client::VectorflowClient};

/// `GET /metrics` over a plain TCP connection: (status line, body).
fn get_metrics(address: &str, authorization: Option<&str>) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(address).expect("connects to the metrics port");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("a read timeout");
    let mut request = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some(value) = authorization {
        request.push_str(&format!("Authorization: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("sends the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("reads the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The address from the server's `vectorflow metrics on http://ADDRESS/metrics` line.
fn metrics_address(server: &ServerProcess) -> String {
    let line = server.next_stdout_line(Duration::from_secs(60)).expect("the metrics line");
    line.trim()
        .strip_prefix("vectorflow metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_string()
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn calls_are_counted_by_method_and_code_and_the_engine_is_reported() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = ServerProcess::start(&dir.path().join("data"), &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_address(&server);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let channel = Endpoint::from_shared(format!("http://{}", server.address)).unwrap().connect().await.unwrap();
        let mut client = VectorflowClient::new(channel);
        client
            .create_collection(v1::CreateCollectionRequest { schema: Some(wire::schema("docs", 2, vec![])) })
            .await
            .expect("created");
        let vectors: Vec<Vec<f32>> = (0..100).map(|i| vec![i as f32, 1.0]).collect();
        client
            .insert(wire::write("docs", vec![wire::ints("id", (0..100).collect()), wire::vectors("v", &vectors)]))
            .await
            .expect("inserted");
        for _ in 0..3 {
            let search = v1::SearchRequest {
                collection: "docs".into(),
                vectors: Some(pack_vectors(&[vec![1.0, 1.0]])),
                k: 5,
                read: Some(v1::ReadOptions {
                    consistency: v1::ConsistencyLevel::Strong as i32,
                    as_of: 0,
                    guarantee_ts: 0,
                }),
                ..Default::default()
            };
            client.search(search).await.expect("a search");
        }
        let refused = client
            .search(v1::SearchRequest { collection: "docs".into(), k: 1, ..Default::default() })
            .await
            .expect_err("a search without query vectors");
        assert_eq!(refused.code(), Code::InvalidArgument);
    });

    let (status, body) = get_metrics(&metrics, None);
    assert!(status.contains("200"), "{status}\n{body}");
    let search = r#"method="/vectorflow.v1.Vectorflow/Search""#;
    assert_eq!(sample(&body, &format!(r#"vectorflow_grpc_requests_total{{code="0",{search}}}"#)), Some(3.0), "{body}");
    assert_eq!(sample(&body, &format!(r#"vectorflow_grpc_requests_total{{code="3",{search}}}"#)), Some(1.0), "{body}");
    assert_eq!(
        sample(&body, &format!(r#"vectorflow_grpc_request_duration_seconds_count{{code="0",{search}}}"#)),
        Some(3.0)
    );
    assert!(sample(&body, r#"vectorflow_engine_total{what="rows_ingested"}"#).is_some_and(|rows| rows >= 100.0));
    assert_eq!(sample(&body, "vectorflow_collections"), Some(1.0));
    assert_eq!(sample(&body, r#"vectorflow_collection{collection="docs",what="live_rows"}"#), Some(100.0));
    assert!(sample(&body, r#"vectorflow_engine{what="visible_lag_seconds"}"#).is_some());
    assert!(body.contains(r#"vectorflow_segments{collection="docs",state="sealed"}"#), "{body}");
}

#[test]
fn scrapes_need_credentials_when_auth_is_on_and_exposure_follows_the_grpc_rule() {
    const TOKEN: &str = "metrics-token-51d0";
    let dir = tempfile::tempdir().expect("a temp dir");
    let token_hash: String = sha2::Sha256::digest(TOKEN.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let config = dir.path().join("auth.toml");
    std::fs::write(
        &config,
        format!("[auth]\nenabled = true\n[[auth.tokens]]\ntoken_hash = \"{token_hash}\"\nrole = \"read\"\n"),
    )
    .expect("the config");
    let config = config.display().to_string();
    let server =
        ServerProcess::start(&dir.path().join("data"), &["--metrics-listen", "127.0.0.1:0", "--config", &config]);
    let metrics = metrics_address(&server);
    let (status, _) = get_metrics(&metrics, None);
    assert!(status.contains("401"), "{status}");
    let (status, _) = get_metrics(&metrics, Some("Bearer wrong"));
    assert!(status.contains("401"), "{status}");
    let (status, body) = get_metrics(&metrics, Some(&format!("Bearer {TOKEN}")));
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("vectorflow_collections 0"), "{body}");
    drop(server);

    // Without auth, a metrics port beyond loopback is refused, as the gRPC port is.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("open"))
        .output()
        .expect("the server runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("0.0.0.0:0") && stderr.contains("--insecure"), "{stderr}");
}
