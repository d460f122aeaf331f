//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod kafka;
pub mod s3;

use std::path::{Path, PathBuf};

use vectorflow::{
    CollectionSchema, DataType, Engine, EngineConfig, FieldSchema, Metric, Pk, Row, SearchPlan, Value, row,
};

/// A PHC string (argon2id) of `password` with a tiny cost: servers run
/// unoptimised in tests, and the string carries its parameters, so the
/// server verifies with the same ones.
pub fn phc(password: &str) -> String {
    use argon2::password_hash::rand_core::OsRng;
    use argon2::password_hash::{PasswordHasher, SaltString};
    use argon2::{Algorithm, Argon2, Params, Version};
    let params = Params::new(256, 1, 1, None).expect("argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
        .expect("hashing")
        .to_string()
}

/// `shared/datasets/<name>` beside the repository.
pub fn dataset_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets").join(name)
}

/// An engine whose searches scan exactly, so answers are deterministic.
pub fn exact_engine(dir: &Path, workers: usize, seal_rows: usize) -> Engine {
    let config = EngineConfig {
        workers,
        seal_rows,
        search_plan: SearchPlan { exact_below_rows: usize::MAX, ..SearchPlan::default() },
        ..EngineConfig::new(dir)
    };
    Engine::open(config).expect("engine opens")
}

/// `id` int64, `v` float_vector(2) L2, `tag` varchar(8) nullable.
pub fn small_schema(name: &str) -> CollectionSchema {
    CollectionSchema::new(
        name,
        vec![
            FieldSchema::int64_primary("id", false),
            FieldSchema::vector("v", 2, Metric::L2),
            FieldSchema::new("tag", DataType::VarChar { max_length: 8 }).nullable(),
        ],
    )
}

pub fn small_row(id: i64, v: [f32; 2]) -> Row {
    row([("id", id.into()), ("v", v.to_vec().into())])
}

pub fn pks(hits: &[vectorflow::SearchHit]) -> Vec<Pk> {
    hits.iter().map(|h| h.pk.clone()).collect()
}

pub fn int(v: &Value) -> i64 {
    v.as_i64().expect("an integer")
}

/// An integer key as `i64` (string keys as -1, which no test uses).
pub fn pk_int(pk: &Pk) -> i64 {
    match pk {
        Pk::Int(v) => *v,
        Pk::Str(_) => -1,
    }
}

/// A running `vectorflow serve` on an ephemeral loopback port; killed when dropped.
pub struct ServerProcess {
    child: std::process::Child,
    /// `127.0.0.1:PORT`, as the server printed it.
    pub address: String,
    /// The server's later stdout lines.
    stdout: std::sync::mpsc::Receiver<std::io::Result<String>>,
}

impl ServerProcess {
    /// Starts the real binary on `data_dir` with extra flags and waits for its address line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServerProcess {
        ServerProcess::start_within(data_dir, extra, std::time::Duration::from_secs(120))
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill runs");
        self.child.wait().expect("the server exits")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    /// Like [`ServerProcess::start`], but gives up (killing the process) if the
    /// address line does not come within `timeout`, e.g. when recovery hangs.
    pub fn start_within(data_dir: &Path, extra: &[&str], timeout: std::time::Duration) -> ServerProcess {
        ServerProcess::launch(data_dir, extra, &[], timeout)
    }

    /// Like [`ServerProcess::start`], with environment variables set for the server.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, String)]) -> ServerProcess {
        ServerProcess::launch(data_dir, extra, env, std::time::Duration::from_secs(120))
    }

    fn launch(data_dir: &Path, extra: &[&str], env: &[(&str, String)], timeout: std::time::Duration) -> ServerProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vectorflow"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the server starts");
        let stdout = child.stdout.take().expect("the server's stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                let read = reader.read_line(&mut line).map(|_| line);
                let end = matches!(&read, Ok(line) if line.is_empty()) || read.is_err();
                if sender.send(read).is_err() || end {
                    break;
                }
            }
        });
        let line = match receiver.recv_timeout(timeout) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("reading the server's address line: {e}");
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server printed no address within {timeout:?}");
            }
        };
        let Some(address) = line.trim().strip_prefix("vectorflow listening on ").map(str::to_string) else {
            let status = child.try_wait();
            let _ = child.kill();
            let _ = child.wait();
            panic!("unexpected first line from the server: {line:?} (process status {status:?})");
        };
        ServerProcess { child, address, stdout: receiver }
    }

    /// The server's next stdout line, waiting up to `timeout`.
    pub fn next_stdout_line(&self, timeout: std::time::Duration) -> Option<String> {
        self.stdout.recv_timeout(timeout).ok()?.ok().filter(|line| !line.is_empty())
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        self.child.kill().expect("SIGKILL is sent");
        self.child.wait().expect("the killed server is reaped")
    }
}

/// `vectorflow.v1` schemas and columns the gRPC tests build.
pub mod wire {
    use vectorflow_proto::pack_vectors;
    use vectorflow_proto::v1::{self, field_data::Values};

    pub fn field(name: &str, data_type: v1::DataType) -> v1::FieldSchema {
        v1::FieldSchema { name: name.into(), data_type: data_type as i32, ..Default::default() }
    }

    /// A nullable varchar field.
    pub fn nullable_varchar(name: &str, max_length: u32) -> v1::FieldSchema {
        v1::FieldSchema { max_length, nullable: true, ..field(name, v1::DataType::Varchar) }
    }

    /// `id` int64 primary key and `v` float_vector(`dim`) L2, then `extra`.
    pub fn schema(name: &str, dim: u32, extra: Vec<v1::FieldSchema>) -> v1::CollectionSchema {
        let mut fields = vec![
            v1::FieldSchema { is_primary: true, ..field("id", v1::DataType::Int64) },
            v1::FieldSchema { dim, metric: v1::Metric::L2 as i32, ..field("v", v1::DataType::FloatVector) },
        ];
        fields.extend(extra);
        v1::CollectionSchema { name: name.into(), fields, ..Default::default() }
    }

    pub fn ints(name: &str, values: Vec<i64>) -> v1::FieldData {
        v1::FieldData { name: name.into(), nulls: vec![], values: Some(Values::Ints(v1::IntValues { values })) }
    }

    pub fn strings(name: &str, values: Vec<String>) -> v1::FieldData {
        v1::FieldData { name: name.into(), nulls: vec![], values: Some(Values::Strings(v1::StringValues { values })) }
    }

    pub fn vectors(name: &str, vectors: &[Vec<f32>]) -> v1::FieldData {
        v1::FieldData { name: name.into(), nulls: vec![], values: Some(Values::Vectors(pack_vectors(vectors))) }
    }

    /// A write of `columns` to `collection`.
    pub fn write(collection: &str, columns: Vec<v1::FieldData>) -> v1::WriteRequest {
        v1::WriteRequest { collection: collection.into(), columns, ..Default::default() }
    }
}
