//! A real S3-compatible server for tests: moto's `moto_server` (installed by
//! `.ci/run` into /opt/vectorflow-s3) on a free loopback port.
//!
//! The server binary is `$VF_TEST_S3_SERVER`, or moto's in that venv.
//! Without one a test says so and passes, unless `VF_TEST_REQUIRE_S3` is
//! set (as `.ci/run` does), when a missing server fails it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vectorflow::StorageConfig;

/// moto's S3 server on a free loopback port; killed when dropped.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn server_binary() -> Option<PathBuf> {
    let path = std::env::var_os("VF_TEST_S3_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/vectorflow-s3/venv/bin/moto_server"));
    path.exists().then_some(path)
}

pub fn start_s3() -> Option<S3Server> {
    let Some(binary) = server_binary() else {
        assert!(
            std::env::var_os("VF_TEST_REQUIRE_S3").is_none(),
            "VF_TEST_REQUIRE_S3 is set but no S3 server: install moto (see .ci/run) or set VF_TEST_S3_SERVER"
        );
        eprintln!("no S3-compatible server found (see .ci/run); the S3 test does not run here");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(binary)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    let server = S3Server { child, endpoint: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The bucket (object_store does not create buckets).
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "PUT /vectorflow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "creating the bucket: {response}");
    Some(server)
}

/// The store at `s3://vectorflow/{prefix}` on `endpoint`.
pub fn s3_config(endpoint: &str, prefix: &str) -> StorageConfig {
    StorageConfig {
        url: format!("s3://vectorflow/{prefix}"),
        endpoint: Some(endpoint.into()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        allow_http: true,
    }
}
