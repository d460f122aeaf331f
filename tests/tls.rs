//! TLS on the gRPC port against the real `vectorflow serve`: certificates made
//! here with rcgen (a CA, a server certificate for 127.0.0.1 and localhost, a
//! client certificate, and an unrelated CA), a server with `[tls]` from a TOML
//! file or from flags, driven by tonic clients and by the CLI.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ServerProcess, wire};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use vectorflow_proto::pack_vectors;
use vectorflow_proto::v1;
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;

/// How long one connection attempt may take: a failing handshake must fail, not hang.
const CONNECT: Duration = Duration::from_secs(20);

/// PEM files of one test's certificates, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
    /// A client certificate the unrelated CA signed, and its key.
    other_client_cert: PathBuf,
    other_client_key: PathBuf,
    /// A key of its own, not the server certificate's.
    other_key: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("reading a PEM file")
    }
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a CA key")).expect("a self-signed CA")
}

/// A leaf certificate for `names`, signed by `issuer`; returns (certificate PEM, key PEM).
fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, common_name: &str, names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf parameters");
    params.distinguished_name.push(DnType::CommonName, common_name);
    let key = KeyPair::generate().expect("a leaf key");
    let cert = params.signed_by(&key, issuer).expect("a signed leaf");
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("writing a PEM file");
        path
    };
    let authority = ca("vectorflow test CA");
    let (server_cert, server_key) = leaf(&authority, "vectorflow server", &["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = leaf(&authority, "vectorflow client", &["client.test"]);
    let unrelated = ca("unrelated CA");
    let (other_client_cert, other_client_key) = leaf(&unrelated, "other client", &["client.test"]);
    let (_, other_key) = leaf(&unrelated, "other", &["127.0.0.1"]);
    Pki {
        ca: write("ca.pem", &authority.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
        other_ca: write("other-ca.pem", &unrelated.pem()),
        other_client_cert: write("other-client.pem", &other_client_cert),
        other_client_key: write("other-client.key", &other_client_key),
        other_key: write("other.key", &other_key),
        dir,
    }
}

fn str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// A `[tls]` config file for the server (mutual TLS with `client_ca`).
fn write_config(pki: &Pki, client_ca: bool) -> PathBuf {
    let mut toml = format!("[tls]\ncert_path = {:?}\nkey_path = {:?}\n", str(&pki.server_cert), str(&pki.server_key));
    if client_ca {
        toml.push_str(&format!("client_ca_path = {:?}\n", str(&pki.ca)));
    }
    let path = pki.path("tls.toml");
    std::fs::write(&path, toml).expect("writing the config");
    path
}

/// A TLS client of `https://<address>` trusting `ca`, presenting `identity` if any.
async fn tls_client(
    address: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<VectorflowClient<Channel>, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(Pki::read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(Pki::read(cert), Pki::read(key)));
    }
    let endpoint = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(CONNECT)
        .timeout(CONNECT);
    let channel = tokio::time::timeout(CONNECT, endpoint.connect())
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    Ok(VectorflowClient::new(channel))
}

/// Connects and lists collections: `Err` when either step fails (with mutual
/// TLS 1.3 the server's refusal of the client may arrive only with the first call).
async fn lists(client: Result<VectorflowClient<Channel>, String>) -> Result<(), String> {
    let mut client = client?;
    match tokio::time::timeout(CONNECT, client.list_collections(v1::Empty {})).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("{status:?}")),
        Err(_) => Err("the call timed out".into()),
    }
}

async fn create_insert_search(client: &mut VectorflowClient<Channel>) {
    let schema = v1::CreateCollectionRequest { schema: Some(wire::schema("docs", 2, vec![])) };
    client.create_collection(schema).await.expect("creates over TLS");
    let ids = vec![1, 2, 3];
    let vectors: Vec<Vec<f32>> = ids.iter().map(|&i| vec![i as f32, 0.0]).collect();
    let write = wire::write("docs", vec![wire::ints("id", ids), wire::vectors("v", &vectors)]);
    client.insert(write).await.expect("inserts over TLS");
    let search = v1::SearchRequest {
        collection: "docs".into(),
        vectors: Some(pack_vectors(&[vec![2.9, 0.0]])),
        k: 2,
        ..Default::default()
    };
    let answer = client.search(search).await.expect("searches over TLS").into_inner();
    assert_eq!(answer.results.len(), 1);
    let keys = answer.results[0].keys.clone().and_then(|k| k.keys);
    let Some(v1::primary_keys::Keys::IntKeys(keys)) = keys else { panic!("integer hit keys: {keys:?}") };
    assert_eq!(keys.values, vec![3, 2], "nearest first");
}

fn vf(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vectorflow"));
    command.args(args).env("RUST_LOG", "warn");
    // The caller's own settings must not leak into a test.
    for name in [
        "VECTORFLOW_USER",
        "VECTORFLOW_PASSWORD",
        "VECTORFLOW_TOKEN",
        "VECTORFLOW_CA_CERT",
        "VECTORFLOW_CLIENT_CERT",
        "VECTORFLOW_CLIENT_KEY",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied()).output().expect("the vectorflow binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_server_serves_clients_that_trust_its_ca_only() {
    let pki = pki();
    let data = tempfile::tempdir().expect("a temporary directory");
    let config = write_config(&pki, false);
    let server = ServerProcess::start(&data.path().join("data"), &["--config", str(&config)]);
    let address = server.address.clone();

    let mut client = tls_client(&address, &pki.ca, None).await.expect("a client trusting the CA connects");
    create_insert_search(&mut client).await;

    // A plaintext client gets no answer from a TLS port.
    let plain = async {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT)
            .timeout(CONNECT)
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(VectorflowClient::new(channel))
    };
    let plain = tokio::time::timeout(CONNECT, plain).await.unwrap_or_else(|_| Err("timed out".into()));
    assert!(lists(plain).await.is_err(), "a plaintext client must fail on a TLS port");

    // A client that trusts another CA refuses the server's certificate.
    let error = lists(tls_client(&address, &pki.other_ca, None).await).await.expect_err("an untrusted server");
    assert!(error.to_lowercase().contains("certificate") || error.contains("Unknown"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_signed_by_the_client_ca() {
    let pki = pki();
    let data = tempfile::tempdir().expect("a temporary directory");
    let config = write_config(&pki, true);
    let server = ServerProcess::start(&data.path().join("data"), &["--config", str(&config)]);
    let address = server.address.clone();

    assert!(lists(tls_client(&address, &pki.ca, None).await).await.is_err(), "no client certificate: refused");
    // A certificate the client CA did not sign: refused too.
    let foreign = tls_client(&address, &pki.ca, Some((&pki.other_client_cert, &pki.other_client_key))).await;
    assert!(lists(foreign).await.is_err(), "a client certificate of another CA: refused");
    let mut client = tls_client(&address, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
        .await
        .expect("a client with a signed certificate connects");
    create_insert_search(&mut client).await;

    // The CLI presents the client certificate by flag, or by environment.
    let https = format!("https://{address}");
    let listed = vf(
        &[
            "collection",
            "list",
            "--json",
            "--addr",
            &https,
            "--ca-cert",
            str(&pki.ca),
            "--client-cert",
            str(&pki.client_cert),
            "--client-key",
            str(&pki.client_key),
        ],
        &[],
    );
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(stdout(&listed).contains("docs"), "{}", stdout(&listed));
    let by_env = vf(
        &["collection", "list", "--json", "--addr", &https],
        &[
            ("VECTORFLOW_CA_CERT", str(&pki.ca)),
            ("VECTORFLOW_CLIENT_CERT", str(&pki.client_cert)),
            ("VECTORFLOW_CLIENT_KEY", str(&pki.client_key)),
        ],
    );
    assert!(by_env.status.success(), "{}", stderr(&by_env));
    assert!(stdout(&by_env).contains("docs"), "{}", stdout(&by_env));
    let without = vf(&["collection", "list", "--addr", &https, "--ca-cert", str(&pki.ca)], &[]);
    assert!(!without.status.success(), "no client certificate: {}", stdout(&without));
    let half = vf(
        &["collection", "list", "--addr", &https, "--ca-cert", str(&pki.ca), "--client-cert", str(&pki.client_cert)],
        &[],
    );
    assert!(stderr(&half).contains("--client-key"), "{}", stderr(&half));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_over_tls_with_flags_and_environment() {
    let pki = pki();
    let data = tempfile::tempdir().expect("a temporary directory");
    // TLS from flags this time.
    let server = ServerProcess::start(
        &data.path().join("data"),
        &["--tls-cert", str(&pki.server_cert), "--tls-key", str(&pki.server_key)],
    );
    let https = format!("https://{}", server.address);
    let schema = r#"{"name": "docs", "fields": [{"name": "id", "data_type": "Int64", "is_primary": true},
        {"name": "v", "data_type": {"FloatVector": {"dim": 2, "metric": "L2"}}}]}"#;
    let created = vf(&["collection", "create", "--schema", schema, "--addr", &https, "--ca-cert", str(&pki.ca)], &[]);
    assert!(created.status.success(), "{}", stderr(&created));
    let listed = vf(&["collection", "list", "--json", "--addr", &https, "--ca-cert", str(&pki.ca)], &[]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(stdout(&listed).contains("docs"), "{}", stdout(&listed));
    let by_env = vf(&["collection", "list", "--json", "--addr", &https], &[("VECTORFLOW_CA_CERT", str(&pki.ca))]);
    assert!(by_env.status.success(), "{}", stderr(&by_env));
    let sql = vf(&["sql", "--addr", &https, "--ca-cert", str(&pki.ca), "SELECT count(*) AS n FROM docs"], &[]);
    assert!(sql.status.success(), "{}", stderr(&sql));

    // Trusting another CA (or only the system's roots): the server's certificate is refused.
    let untrusted = vf(&["collection", "list", "--addr", &https, "--ca-cert", str(&pki.other_ca)], &[]);
    assert!(!untrusted.status.success());
    assert!(stderr(&untrusted).contains("error:"), "{}", stderr(&untrusted));
    let system_roots = vf(&["collection", "list", "--addr", &https], &[]);
    assert!(!system_roots.status.success(), "{}", stdout(&system_roots));
    assert!(stderr(&system_roots).contains("--ca-cert"), "says how to trust a private CA: {}", stderr(&system_roots));
    // A CA with a plaintext address is a forgotten https://, not a silent downgrade.
    let plain = format!("http://{}", server.address);
    let downgrade = vf(&["collection", "list", "--addr", &plain, "--ca-cert", str(&pki.ca)], &[]);
    assert!(stderr(&downgrade).contains("https://"), "{}", stderr(&downgrade));
    // A missing CA file is named.
    let missing = pki.path("no-such-ca.pem");
    let no_ca = vf(&["collection", "list", "--addr", &https, "--ca-cert", str(&missing)], &[]);
    assert!(stderr(&no_ca).contains("no-such-ca.pem"), "{}", stderr(&no_ca));
}

/// Runs `vectorflow serve` with `extra` and waits (at most two minutes) for it to exit.
fn serve_fails(data_dir: &Path, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vectorflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the server starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the server") {
            let mut text = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut text);
            }
            return (status, text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`serve {extra:?}` should have failed at start but kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_names_a_missing_or_mismatched_tls_file() {
    let pki = pki();
    let data = tempfile::tempdir().expect("a temporary directory");
    let data_dir = data.path().join("data");
    let missing = pki.path("missing.key");
    let (status, text) = serve_fails(&data_dir, &["--tls-cert", str(&pki.server_cert), "--tls-key", str(&missing)]);
    assert!(!status.success());
    assert!(text.contains("missing.key") && text.contains("key_path"), "{text}");
    assert!(!text.contains("panicked"), "{text}");

    let (status, text) =
        serve_fails(&data_dir, &["--tls-cert", str(&pki.server_cert), "--tls-key", str(&pki.other_key)]);
    assert!(!status.success());
    assert!(text.contains("other.key"), "{text}");
    assert!(!text.contains("panicked"), "{text}");

    let (status, text) = serve_fails(
        &data_dir,
        &[
            "--tls-cert",
            str(&pki.server_cert),
            "--tls-key",
            str(&pki.server_key),
            "--tls-client-ca",
            str(&pki.server_key),
        ],
    );
    assert!(!status.success());
    assert!(text.contains("server.key") && text.contains("client_ca_path"), "{text}");
    assert!(!data_dir.exists(), "the data directory is not touched by a misconfigured server");
}
