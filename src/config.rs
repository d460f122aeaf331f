//! Server configuration: defaults, then a TOML file, then `VECTORFLOW_*`
//! environment variables, then command-line flags (figment merges them in
//! that order, later sources winning).

use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use vectorflow::{EngineConfig, KafkaConfig, StorageConfig};

/// Everything `vectorflow serve` reads. In TOML:
///
/// ```toml
/// data_dir = "./vectorflow-data"
/// listen = "127.0.0.1:19530"
/// workers = 2
/// max_message_bytes = 268435456
/// checkpoint_interval_ms = 60000
///
/// [storage]
/// url = "s3://bucket/prefix"   # empty: <data_dir>/store on the local filesystem
/// endpoint = "http://127.0.0.1:9000"
/// allow_http = true
///
/// [log]
/// kind = "kafka"               # default: "embedded"
/// [log.kafka]
/// bootstrap_servers = "127.0.0.1:9092"
/// topics = { docs = "pg.public.docs" }
/// formats = { docs = "debezium" }
/// properties = { "security.protocol" = "SASL_SSL" }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Holds the write-ahead log and the catalog (embedded mode).
    pub data_dir: PathBuf,
    /// gRPC address; port 0 picks a free port (the bound address is printed).
    pub listen: String,
    pub workers: usize,
    /// A growing segment seals at this many rows.
    pub seal_rows: usize,
    /// History kept for time travel, in seconds.
    pub retention_secs: u64,
    /// Staleness bound of Bounded consistency, in milliseconds.
    pub bounded_staleness_ms: u64,
    /// How long a read waits for the dataflow when the client sets no deadline, in seconds.
    pub request_timeout_secs: u64,
    /// Largest request or response message, in bytes; larger requests get RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// Log filter (tracing's env-filter syntax), overridden by RUST_LOG.
    pub log_filter: String,
    /// How often collections with new writes are checkpointed to the object
    /// store, in milliseconds (0: only on flush).
    pub checkpoint_interval_ms: u64,
    /// How often compaction looks for segments to rewrite, in milliseconds (0: never).
    pub compaction_interval_ms: u64,
    /// The object store (`[storage]` in TOML, `VECTORFLOW_STORAGE__URL`, ...):
    /// empty `url` for `<data_dir>/store`, or `s3://bucket/prefix`.
    pub storage: StorageConfig,
    /// The write-ahead log (`[log]`): embedded, or Kafka topics.
    pub log: LogSettings,
}

/// `[log]`: which log the server reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub kind: LogKind,
    /// `[log.kafka]`, read when `kind = "kafka"`.
    pub kafka: KafkaConfig,
    /// A source stops reading while this many of its rows are not yet applied.
    pub max_in_flight_rows: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// A redb write-ahead log in `<data_dir>/wal`.
    #[default]
    Embedded,
    /// One Kafka topic per collection.
    Kafka,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let engine = EngineConfig::new("./vectorflow-data");
        ServerConfig {
            data_dir: engine.data_dir,
            listen: "127.0.0.1:19530".into(),
            workers: engine.workers,
            seal_rows: engine.seal_rows,
            retention_secs: engine.retention.as_secs(),
            bounded_staleness_ms: engine.bounded_staleness.as_millis() as u64,
            request_timeout_secs: engine.request_timeout.as_secs(),
            max_message_bytes: 256 << 20,
            log_filter: "info".into(),
            checkpoint_interval_ms: engine.checkpoint_interval.map_or(0, |d| d.as_millis() as u64),
            compaction_interval_ms: engine.compaction_interval.map_or(0, |d| d.as_millis() as u64),
            storage: StorageConfig::default(),
            log: LogSettings::default(),
        }
    }
}

/// Flags of `vectorflow serve` that override the file and the environment.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServeArgs {
    /// A TOML file with the settings of [`ServerConfig`].
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seal_rows: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_secs: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compaction_interval_ms: Option<u64>,
    /// The object store URL (`s3://bucket/prefix`); sets `storage.url`.
    #[arg(long)]
    #[serde(skip)]
    pub storage: Option<String>,
    /// Kafka bootstrap servers: read and write Kafka topics instead of the
    /// embedded log (sets `log.kind = "kafka"` and `log.kafka.bootstrap_servers`).
    #[arg(long)]
    #[serde(skip)]
    pub kafka: Option<String>,
}

impl ServerConfig {
    pub fn load(args: &ServeArgs) -> Result<ServerConfig, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(ServerConfig::default()));
        if let Some(path) = &args.config {
            figment = figment.merge(Toml::file_exact(path));
        }
        let mut config: ServerConfig = figment
            .merge(Env::prefixed("VECTORFLOW_").split("__"))
            .merge(Serialized::defaults(args))
            .extract()
            .map_err(Box::new)?;
        if let Some(url) = &args.storage {
            config.storage.url = url.clone();
        }
        if let Some(bootstrap) = &args.kafka {
            config.log.kind = LogKind::Kafka;
            config.log.kafka.bootstrap_servers = bootstrap.clone();
        }
        Ok(config)
    }

    pub fn engine_config(&self) -> EngineConfig {
        let defaults = EngineConfig::new(&self.data_dir);
        EngineConfig {
            workers: self.workers,
            seal_rows: self.seal_rows,
            retention: Duration::from_secs(self.retention_secs),
            bounded_staleness: Duration::from_millis(self.bounded_staleness_ms),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            checkpoint_interval: (self.checkpoint_interval_ms > 0)
                .then(|| Duration::from_millis(self.checkpoint_interval_ms)),
            compaction_interval: (self.compaction_interval_ms > 0)
                .then(|| Duration::from_millis(self.compaction_interval_ms)),
            storage: self.storage.clone(),
            kafka: (self.log.kind == LogKind::Kafka).then(|| self.log.kafka.clone()),
            max_in_flight_rows: self.log.max_in_flight_rows.unwrap_or(defaults.max_in_flight_rows),
            ..defaults
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closures return figment's own (large) error
    fn file_then_environment_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("vf.toml", "listen = \"127.0.0.1:1\"\nworkers = 3\nseal_rows = 10\n")?;
            jail.set_env("VECTORFLOW_WORKERS", "4");
            jail.set_env("VECTORFLOW_STORAGE__REGION", "eu-west-1");
            let args = ServeArgs { config: Some("vf.toml".into()), seal_rows: Some(20), ..Default::default() };
            let config = ServerConfig::load(&args).map_err(|e| e.to_string())?;
            assert_eq!(config.listen, "127.0.0.1:1");
            assert_eq!(config.workers, 4);
            assert_eq!(config.seal_rows, 20);
            assert_eq!(config.storage.region.as_deref(), Some("eu-west-1"));
            let flagged = ServerConfig::load(&ServeArgs { storage: Some("s3://b/p".into()), ..Default::default() })
                .map_err(|e| e.to_string())?;
            assert_eq!(flagged.storage.url, "s3://b/p");
            assert_eq!(flagged.engine_config().storage.region.as_deref(), Some("eu-west-1"));
            assert_eq!(config.max_message_bytes, ServerConfig::default().max_message_bytes);
            let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/vectorflow.toml");
            let shipped = ServerConfig::load(&ServeArgs { config: Some(example), ..Default::default() })
                .map_err(|e| e.to_string())?;
            assert_eq!(shipped.listen, "127.0.0.1:19530");
            assert_eq!(shipped.log.kind, LogKind::Embedded);
            jail.set_env("VECTORFLOW_LOG__KIND", "kafka");
            jail.set_env("VECTORFLOW_LOG__KAFKA__BOOTSTRAP_SERVERS", "broker:9093");
            jail.create_file(
                "kafka.toml",
                "[log.kafka]\ngroup_id = \"g\"\nproperties = { \"security.protocol\" = \"SASL_SSL\" }\n",
            )?;
            let kafka = ServerConfig::load(&ServeArgs { config: Some("kafka.toml".into()), ..Default::default() })
                .map_err(|e| e.to_string())?;
            let engine_kafka = kafka.engine_config().kafka.unwrap_or_default();
            assert_eq!(engine_kafka.bootstrap_servers, "broker:9093");
            assert_eq!(engine_kafka.group_id, "g");
            assert_eq!(engine_kafka.properties.get("security.protocol").map(String::as_str), Some("SASL_SSL"));
            jail.set_env("VECTORFLOW_LOG__KIND", "embedded");
            jail.create_file("bad.toml", "listen = 5\n")?;
            let bad = ServeArgs { config: Some("bad.toml".into()), ..Default::default() };
            let error = ServerConfig::load(&bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains("listen"), "{error}");
            Ok(())
        });
    }
}
