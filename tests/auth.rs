//! Authentication and roles against the real `vectorflow serve`: a server with
//! `[auth]` (users of each role, hashed here with argon2, and a bearer token),
//! driven by the generated tonic client with hand-made `authorization`
//! metadata, by the standard health and reflection clients, and by the CLI.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use common::{ServerProcess, phc, wire};
use futures::StreamExt;
use sha2::Digest;
use tonic::transport::Channel;
use tonic::{Code, Request};
use vectorflow_proto::pack_vectors;
use vectorflow_proto::v1;
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;

const TOKEN: &str = "tok-6f1d2c9a8b7e4f3a";

/// A config with `reader`, `writer` and `root` (password = name + "-pw") and a write token.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let token_hash: String = sha2::Sha256::digest(TOKEN.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let mut toml = String::from("[auth]\nenabled = true\n");
    for (name, role) in [("reader", "read"), ("writer", "write"), ("root", "admin")] {
        let hash = phc(&format!("{name}-pw"));
        toml.push_str(&format!("[[auth.users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\nrole = \"{role}\"\n"));
    }
    toml.push_str(&format!("[[auth.tokens]]\ntoken_hash = \"{token_hash}\"\nrole = \"write\"\n"));
    let path = dir.join("auth.toml");
    std::fs::write(&path, toml).expect("writing the config");
    path
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// What pymilvus sends: base64 of `user:password`, no scheme.
fn bare(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

fn with<T>(message: T, authorization: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.parse().expect("ASCII metadata"));
    }
    request
}

fn schema() -> v1::CreateCollectionRequest {
    v1::CreateCollectionRequest { schema: Some(wire::schema("docs", 2, vec![])) }
}

fn rows(ids: &[i64]) -> v1::WriteRequest {
    let vectors: Vec<Vec<f32>> = ids.iter().map(|&i| vec![i as f32, 1.0]).collect();
    wire::write("docs", vec![wire::ints("id", ids.to_vec()), wire::vectors("v", &vectors)])
}

fn search() -> v1::SearchRequest {
    v1::SearchRequest {
        collection: "docs".into(),
        vectors: Some(pack_vectors(&[vec![0.0, 1.0]])),
        k: 3,
        ..Default::default()
    }
}

fn query() -> v1::QueryRequest {
    v1::QueryRequest { collection: "docs".into(), count_only: true, ..Default::default() }
}

fn docs() -> v1::CollectionRef {
    v1::CollectionRef { name: "docs".into() }
}

fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn vf(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vectorflow"));
    command.args(args).env("RUST_LOG", "warn");
    // The caller's own credentials must not leak into a test.
    for name in ["VECTORFLOW_USER", "VECTORFLOW_PASSWORD", "VECTORFLOW_TOKEN"] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied()).output().expect("the vectorflow binary runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_credential_forms_against_the_real_server() {
    let data = tempfile::tempdir().expect("a temporary directory");
    let config = write_config(data.path());
    let config = config.to_str().expect("a UTF-8 path");
    let server = ServerProcess::start(&data.path().join("data"), &["--config", config]);
    let address = format!("http://{}", server.address);
    let mut client: VectorflowClient<Channel> = VectorflowClient::connect(address.clone()).await.expect("connects");
    let (reader, writer, root) = (basic("reader", "reader-pw"), basic("writer", "writer-pw"), basic("root", "root-pw"));

    // No credentials: UNAUTHENTICATED, with a message that says what to send.
    let missing = client.create_collection(with(schema(), None)).await.expect_err("no credentials");
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(missing.message().contains("authorization"), "{}", missing.message());
    assert_eq!(code(client.search(with(search(), None)).await), Code::Unauthenticated);
    // Wrong password, unknown user, unknown token, garbage: UNAUTHENTICATED too.
    assert_eq!(code(client.search(with(search(), Some(&basic("reader", "nope")))).await), Code::Unauthenticated);
    assert_eq!(code(client.search(with(search(), Some(&basic("nobody", "reader-pw")))).await), Code::Unauthenticated);
    assert_eq!(code(client.search(with(search(), Some("Bearer not-the-token"))).await), Code::Unauthenticated);
    assert_eq!(code(client.search(with(search(), Some("Basic %%%"))).await), Code::Unauthenticated);

    // Only an admin creates; a reader and a writer may not.
    assert_eq!(code(client.create_collection(with(schema(), Some(&reader))).await), Code::PermissionDenied);
    assert_eq!(code(client.create_collection(with(schema(), Some(&writer))).await), Code::PermissionDenied);
    client.create_collection(with(schema(), Some(&root))).await.expect("an admin creates");

    // A reader reads, and may not write or drop.
    client.search(with(search(), Some(&reader))).await.expect("a reader searches");
    client.query(with(query(), Some(&reader))).await.expect("a reader queries");
    client.list_collections(with(v1::Empty {}, Some(&reader))).await.expect("a reader lists");
    let denied = client.insert(with(rows(&[1]), Some(&reader))).await.expect_err("a reader may not insert");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("write"), "{}", denied.message());
    assert_eq!(code(client.drop_collection(with(docs(), Some(&reader))).await), Code::PermissionDenied);

    // A writer writes, and may not drop.
    client.insert(with(rows(&[1, 2]), Some(&writer))).await.expect("a writer inserts");
    client.flush(with(docs(), Some(&writer))).await.expect("a writer flushes");
    assert_eq!(code(client.drop_collection(with(docs(), Some(&writer))).await), Code::PermissionDenied);

    // A bearer token (role write), and pymilvus' bare base64.
    client.insert(with(rows(&[3]), Some(&format!("Bearer {TOKEN}")))).await.expect("the token inserts");
    assert_eq!(
        code(client.drop_collection(with(docs(), Some(&format!("Bearer {TOKEN}")))).await),
        Code::PermissionDenied
    );
    let counted = client.query(with(query(), Some(&bare("reader", "reader-pw")))).await.expect("bare base64 works");
    assert_eq!(counted.into_inner().count, 3);
    // Repeated calls hit the cache and keep working.
    for _ in 0..3 {
        client.search(with(search(), Some(&reader))).await.expect("a cached credential");
    }

    // Health, ours and the standard one, without credentials.
    client.health(with(v1::Empty {}, None)).await.expect("vectorflow.v1 Health is open");
    let channel = Channel::from_shared(address.clone()).expect("an address").connect().await.expect("connects");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "vectorflow.v1.Vectorflow"] {
        let check = tonic_health::pb::HealthCheckRequest { service: service.into() };
        let status = health.check(check).await.expect("grpc.health.v1 Check is open").into_inner().status;
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }

    // Reflection v1alpha (grpcio, older grpcurl) lists the services, without credentials.
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let answer = answers.next().await.expect("an answer").expect("a reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["vectorflow.v1.Vectorflow", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }

    // The CLI: credentials by flag or environment; without them, a clear error.
    let listed =
        vf(&["collection", "list", "--json", "--addr", &address, "--user", "reader", "--password", "reader-pw"], &[]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("docs"));
    let by_env = vf(&["collection", "list", "--addr", &address], &[("VECTORFLOW_TOKEN", TOKEN)]);
    assert!(by_env.status.success(), "{}", String::from_utf8_lossy(&by_env.stderr));
    let anonymous = vf(&["collection", "list", "--addr", &address], &[]);
    assert!(!anonymous.status.success());
    let stderr = String::from_utf8_lossy(&anonymous.stderr);
    assert!(stderr.contains("UNAUTHENTICATED") && stderr.contains("--user") && stderr.contains("--token"), "{stderr}");
    let half = vf(&["collection", "list", "--addr", &address, "--user", "reader"], &[]);
    assert!(String::from_utf8_lossy(&half.stderr).contains("--user needs --password"), "{half:?}");
    let sql = vf(
        &["sql", "--addr", &address, "--user", "reader", "--password", "reader-pw", "SELECT count(*) AS n FROM docs"],
        &[],
    );
    assert!(sql.status.success(), "{}", String::from_utf8_lossy(&sql.stderr));
    let dropped =
        vf(&["collection", "drop", "docs", "--addr", &address, "--user", "writer", "--password", "writer-pw"], &[]);
    assert!(String::from_utf8_lossy(&dropped.stderr).contains("PERMISSION_DENIED"), "{dropped:?}");

    // Finally an admin drops.
    client.drop_collection(with(docs(), Some(&root))).await.expect("an admin drops");
    assert!(
        client.list_collections(with(v1::Empty {}, Some(&reader))).await.expect("lists").into_inner().names.is_empty()
    );
}

#[test]
fn hash_password_output_verifies() {
    use argon2::Argon2;
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), b"correct horse\n").expect("writes stdin");
    let output = child.wait_with_output().expect("it finishes");
    assert!(output.status.success());
    let phc = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let hash = PasswordHash::new(&phc).expect("a PHC string");
    assert!(Argon2::default().verify_password(b"correct horse", &hash).is_ok(), "{phc}");
    assert!(Argon2::default().verify_password(b"correct horse\n", &hash).is_err(), "the line break is not hashed");
}

#[test]
fn exposed_address_needs_auth_or_insecure() {
    let data = tempfile::tempdir().expect("a temporary directory");
    let serve = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vectorflow"));
        command.args(["serve", "--listen", "0.0.0.0:0", "--data-dir"]).arg(data.path()).args(extra);
        command.env("RUST_LOG", "warn").env_remove("VECTORFLOW_INSECURE").env_remove("VECTORFLOW_AUTH__ENABLED");
        command
    };
    let refused = serve(&[]).output().expect("the binary runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("refusing to serve on 0.0.0.0:0"), "{stderr}");
    assert!(stderr.contains("--insecure") && stderr.contains("[auth]"), "{stderr}");
    let written = std::fs::read_dir(data.path()).map(|d| d.count()).unwrap_or(0);
    assert_eq!(written, 0, "refused before opening the data directory");

    // With --insecure it starts; stopped as soon as it prints its address.
    let mut child = serve(&["--insecure"]).stdout(Stdio::piped()).spawn().expect("the server starts");
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    let _ = child.kill();
    let _ = child.wait();
    read.expect("reads the address line");
    assert!(line.starts_with("vectorflow listening on 0.0.0.0:"), "{line:?}");
}
