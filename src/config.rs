//! Server configuration: defaults, then a TOML file, then `VECTORFLOW_*`
//! environment variables, then command-line flags (figment merges them in
//! that order, later sources winning).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use vectorflow::{ClusterConfig, EngineConfig, KafkaConfig, Limits, Role, StorageConfig};

use crate::auth::{Authenticator, TokenEntry, UserEntry};

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
///
/// [auth]
/// enabled = true
/// [[auth.users]]
/// name = "ann"
/// password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."   # vectorflow hash-password
/// role = "admin"                                          # read | write | admin
/// [[auth.tokens]]
/// token_hash = "9f86d08188..."                            # vectorflow hash-password --token
/// role = "read"
///
/// [tls]
/// cert_path = "server.pem"     # PEM chain, leaf first
/// key_path = "server.key"      # PEM private key (PKCS#8, PKCS#1 or SEC1)
/// client_ca_path = "ca.pem"    # optional: clients must present a certificate it signed
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Holds the write-ahead log and the catalog (embedded mode).
    pub data_dir: PathBuf,
    /// gRPC address; port 0 picks a free port (the bound address is printed).
    pub listen: String,
    /// Prometheus `/metrics` over plain HTTP on this address (none when
    /// unset); with `[auth]` on, scrapes present credentials; a
    /// non-loopback address needs `insecure`.
    pub metrics_listen: Option<String>,
    pub workers: usize,
    /// A growing segment seals at this many rows.
    pub seal_rows: usize,
    /// Merges never make a segment of more rows than this.
    pub max_segment_rows: usize,
    /// Sealed segments keep their `f32` vectors in mapped files under
    /// `data_dir` instead of on the heap (searches walk SQ8 codes in memory
    /// and read the `f32` values to re-rank).
    pub vectors_on_disk: bool,
    /// `primary` (the default) or `replica`: a read replica loads the
    /// primary's published segments from the same `[storage]`, follows the
    /// same Kafka topics with the primary's offset bindings, never writes,
    /// and serves reads that equal the primary's at the same timestamp.
    pub role: Role,
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
    /// Calls slower than this many milliseconds are logged, one line each (0: none).
    pub slow_request_ms: u64,
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
    /// Opening fails when the log replay makes no progress for this many
    /// seconds (the error says where it is stuck).
    pub replay_stall_timeout_secs: u64,
    /// `[limits]`: bounds on one request.
    pub limits: LimitSettings,
    /// `[auth]`: users, tokens and roles.
    pub auth: AuthSettings,
    /// `[cluster]`: several processes as one dataflow (see examples/cluster).
    pub cluster: ClusterConfig,
    /// `[tls]`: serve gRPC over TLS (and optionally require client certificates).
    pub tls: TlsSettings,
    /// Serve on a non-loopback address without authentication. Off, such a
    /// server refuses to start: an open database on a network is rarely meant.
    pub insecure: bool,
}

/// `[auth]` (`VECTORFLOW_AUTH__ENABLED=true`, `VECTORFLOW_AUTH__USERS='[{name="a", ...}]'`):
/// who may call the server, and with which role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Off: every call is allowed (then only a loopback address, or `insecure`).
    pub enabled: bool,
    /// `[[auth.users]]`: name, argon2 `password_hash` (PHC string) and role.
    pub users: Vec<UserEntry>,
    /// `[[auth.tokens]]`: SHA-256 hex `token_hash` and role, for `Bearer` tokens.
    pub tokens: Vec<TokenEntry>,
}

impl AuthSettings {
    /// The checker of credentials; `None` when auth is off.
    pub fn authenticator(&self) -> Result<Option<Authenticator>, crate::auth::AuthError> {
        if !self.enabled {
            return Ok(None);
        }
        Authenticator::new(&self.users, &self.tokens).map(Some)
    }
}

/// `VECTORFLOW_*` variables of the client (`vectorflow search --user ... --ca-cert ...`).
/// They share the prefix but are no server setting, and `deny_unknown_fields`
/// would refuse them when the server and a client run from one shell.
const CLIENT_ONLY_ENV: &[&str] = &["user", "password", "token", "ca_cert", "client_cert", "client_key"];

/// `[tls]` (`VECTORFLOW_TLS__CERT_PATH`, ..., or `--tls-cert`, `--tls-key`,
/// `--tls-client-ca`): TLS on the gRPC port. Off while `cert_path` and
/// `key_path` are unset. TLS is no authentication: a non-loopback `listen`
/// still needs `[auth]` or `insecure`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// The server's certificate chain, PEM, leaf first.
    pub cert_path: Option<PathBuf>,
    /// The private key of the leaf certificate, PEM.
    pub key_path: Option<PathBuf>,
    /// Set: every client must present a certificate signed by this PEM CA (mutual TLS).
    pub client_ca_path: Option<PathBuf>,
}

/// Why `[tls]` cannot be served; each names the setting or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[tls] cert_path (--tls-cert) is set but key_path (--tls-key) is not: give both")]
    MissingKey,
    #[error("[tls] key_path (--tls-key) is set but cert_path (--tls-cert) is not: give both")]
    MissingCert,
    #[error("[tls] client_ca_path (--tls-client-ca) needs cert_path and key_path: mutual TLS is TLS first")]
    ClientCaWithoutTls,
    // `error`, not `source`: the message carries the cause already, and a
    // source too would print it twice in anyhow's chain.
    #[error("[tls] {setting} {}: cannot read: {error}", path.display())]
    Read { setting: &'static str, path: PathBuf, error: std::io::Error },
    #[error("[tls] {setting} {}: {problem}", path.display())]
    Invalid { setting: &'static str, path: PathBuf, problem: String },
}

impl TlsSettings {
    /// The server's TLS configuration, `None` when TLS is off. Every file is
    /// read and parsed here, so a bad one fails `serve` at start, by name.
    /// (Whether the key matches the certificate, rustls checks when tonic
    /// builds its acceptor.)
    pub fn server_config(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, TlsError> {
        let (cert_path, key_path) = match (&self.cert_path, &self.key_path) {
            (None, None) if self.client_ca_path.is_some() => return Err(TlsError::ClientCaWithoutTls),
            (None, None) => return Ok(None),
            (Some(_), None) => return Err(TlsError::MissingKey),
            (None, Some(_)) => return Err(TlsError::MissingCert),
            (Some(cert), Some(key)) => (cert, key),
        };
        let cert = read_certificates("cert_path", cert_path)?;
        let key = read_private_key("key_path", key_path)?;
        let mut config =
            tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key));
        if let Some(ca_path) = &self.client_ca_path {
            let ca = read_certificates("client_ca_path", ca_path)?;
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        Ok(Some(config))
    }
}

fn read_tls_file(setting: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { setting, path: path.to_path_buf(), error })
}

/// A PEM file's bytes, once it is known to hold at least one well-formed certificate.
pub fn read_certificates(setting: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = read_tls_file(setting, path)?;
    let invalid = |problem: String| TlsError::Invalid { setting, path: path.to_path_buf(), problem };
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a PEM certificate file: {e}")))?;
    if certificates.is_empty() {
        return Err(invalid("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(pem)
}

/// A PEM file's bytes, once it is known to hold a private key.
pub fn read_private_key(setting: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let pem = read_tls_file(setting, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Invalid {
        setting,
        path: path.to_path_buf(),
        problem: format!("holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })?;
    Ok(pem)
}

/// Why a configuration cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExposureError {
    #[error(
        "refusing to serve on {listen}: it is not a loopback address and authentication is off. \
         Enable [auth] (auth.enabled = true with users or tokens; hashes from `vectorflow hash-password`), \
         or pass --insecure (insecure = true, VECTORFLOW_INSECURE=true) to serve without authentication"
    )]
    Unauthenticated { listen: String },
    #[error(
        "refusing to serve metrics on {listen}: it is not a loopback address and the metrics port is plain \
         HTTP (credentials and figures would cross the network in clear). Use a loopback metrics_listen \
         (and a local scraper or proxy), or pass --insecure"
    )]
    PlainMetrics { listen: String },
}

/// Whether `listen` only reaches this machine: a loopback IP, or a host name
/// whose every address is loopback (`localhost`). Unresolvable: not loopback.
pub fn is_loopback(listen: &str) -> bool {
    if let Ok(address) = listen.parse::<SocketAddr>() {
        // `::ffff:127.0.0.1` is loopback too.
        return address.ip().to_canonical().is_loopback();
    }
    match listen.to_socket_addrs() {
        Ok(addresses) => {
            let addresses: Vec<SocketAddr> = addresses.collect();
            !addresses.is_empty() && addresses.iter().all(|a| a.ip().to_canonical().is_loopback())
        }
        Err(_) => false,
    }
}

/// `[limits]` (`VECTORFLOW_LIMITS__MAX_SEARCH_HITS`, ...): what one read may
/// ask for; over a limit, a request fails with RESOURCE_EXHAUSTED naming it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Query vectors × k per search.
    pub max_search_hits: usize,
    /// Query vectors per search.
    pub max_search_vectors: usize,
    /// Rows per query answer (limit + offset; without a limit, matching more is an error).
    pub max_query_rows: usize,
    /// Primary keys per get.
    pub max_get_keys: usize,
    /// Collections the server holds (their partitions count too).
    pub max_collections: usize,
    /// Partitions of one collection.
    pub max_partitions: usize,
    /// Calls served at once; one more is refused with RESOURCE_EXHAUSTED
    /// (health checks and reflection are always served).
    pub max_concurrent_requests: usize,
    /// How long one SQL statement may run (DEADLINE_EXCEEDED past it; a
    /// shorter client deadline wins; 0: no limit).
    pub sql_timeout_ms: u64,
    /// Memory one SQL statement may hold for sorts, aggregates and joins
    /// (RESOURCE_EXHAUSTED past it).
    pub sql_memory_limit_bytes: usize,
    /// Writes wait while the dataflow has applied the log only up to more
    /// than this many milliseconds ago; one still waiting at the request
    /// timeout gets RESOURCE_EXHAUSTED and is not written (0: never wait).
    pub max_apply_lag_ms: u64,
    /// Writes also wait while this many rows wait for their index build or
    /// for a merge to drop them (the index builds cannot keep up); same
    /// refusal at the request timeout (0: never wait).
    pub max_index_backlog_rows: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        let limits = Limits::default();
        LimitSettings {
            max_search_hits: limits.max_search_hits,
            max_search_vectors: limits.max_search_vectors,
            max_query_rows: limits.max_query_rows,
            max_get_keys: limits.max_get_keys,
            max_collections: limits.max_collections,
            max_partitions: limits.max_partitions,
            max_concurrent_requests: 256,
            sql_timeout_ms: vectorflow_sql::policy::DEFAULT_STATEMENT_TIMEOUT.as_millis() as u64,
            sql_memory_limit_bytes: vectorflow_sql::policy::DEFAULT_MEMORY_LIMIT,
            max_apply_lag_ms: EngineConfig::new(".").max_apply_lag.map_or(0, |d| d.as_millis() as u64),
            max_index_backlog_rows: EngineConfig::new(".").max_index_backlog_rows.unwrap_or(0),
        }
    }
}

impl LimitSettings {
    /// What SQL from the network may do: queries only, within these limits.
    pub fn sql_policy(&self) -> vectorflow_sql::SqlPolicy {
        vectorflow_sql::SqlPolicy {
            // 0: no limit.
            timeout: (self.sql_timeout_ms > 0).then(|| std::time::Duration::from_millis(self.sql_timeout_ms)),
            memory_limit: Some(self.sql_memory_limit_bytes.max(1 << 20)),
            ..vectorflow_sql::SqlPolicy::read_only()
        }
    }
}

impl From<&LimitSettings> for Limits {
    fn from(settings: &LimitSettings) -> Limits {
        Limits {
            max_search_hits: settings.max_search_hits.max(1),
            max_search_vectors: settings.max_search_vectors.max(1),
            max_query_rows: settings.max_query_rows.max(1),
            max_get_keys: settings.max_get_keys.max(1),
            max_collections: settings.max_collections.max(1),
            max_partitions: settings.max_partitions.max(1),
        }
    }
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
            metrics_listen: None,
            workers: engine.workers,
            seal_rows: engine.seal_rows,
            max_segment_rows: engine.max_segment_rows,
            vectors_on_disk: engine.vectors_on_disk,
            role: engine.role,
            retention_secs: engine.retention.as_secs(),
            bounded_staleness_ms: engine.bounded_staleness.as_millis() as u64,
            request_timeout_secs: engine.request_timeout.as_secs(),
            max_message_bytes: 256 << 20,
            slow_request_ms: 1000,
            log_filter: "info".into(),
            checkpoint_interval_ms: engine.checkpoint_interval.map_or(0, |d| d.as_millis() as u64),
            compaction_interval_ms: engine.compaction_interval.map_or(0, |d| d.as_millis() as u64),
            storage: StorageConfig::default(),
            log: LogSettings::default(),
            replay_stall_timeout_secs: engine.replay_stall_timeout.as_secs(),
            limits: LimitSettings::default(),
            auth: AuthSettings::default(),
            cluster: ClusterConfig::default(),
            tls: TlsSettings::default(),
            insecure: false,
        }
    }
}

/// Flags of `vectorflow serve` that override the file and the environment.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServeArgs {
    /// A TOML file of server settings (see examples/vectorflow.toml); flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory of the write-ahead log and the catalog [default: ./vectorflow-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// gRPC address, host:port; port 0 picks a free port [default: 127.0.0.1:19530].
    /// A non-loopback address needs [auth] enabled, or --insecure.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics (host:port; port 0 picks one).
    /// Plain HTTP: a non-loopback address needs --insecure. With [auth], scrapes present credentials.
    #[arg(long, value_name = "ADDRESS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Dataflow worker threads.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// A growing segment seals (and gets its index) at this many rows.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seal_rows: Option<usize>,
    /// `primary` or `replica` (a read replica of the primary whose Kafka
    /// topics and object store this server names).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// History kept for time travel, in seconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_secs: Option<u64>,
    /// Largest request or response message, in bytes [default: 268435456].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    /// How often collections with new writes are checkpointed, in milliseconds (0: only on flush).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval_ms: Option<u64>,
    /// How often compaction looks for segments to rewrite, in milliseconds (0: never).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compaction_interval_ms: Option<u64>,
    /// Serve on a non-loopback address without authentication (sets `insecure = true`).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// The object store URL (`s3://bucket/prefix`); sets `storage.url`.
    #[arg(long)]
    #[serde(skip)]
    pub storage: Option<String>,
    /// Kafka bootstrap servers: read and write Kafka topics instead of the
    /// embedded log (sets `log.kind = "kafka"` and `log.kafka.bootstrap_servers`).
    #[arg(long)]
    #[serde(skip)]
    pub kafka: Option<String>,
    /// Serve TLS with this PEM certificate chain (sets `tls.cert_path`; needs --tls-key).
    #[arg(long)]
    #[serde(skip)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (sets `tls.key_path`).
    #[arg(long)]
    #[serde(skip)]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA: mutual TLS (sets `tls.client_ca_path`).
    #[arg(long)]
    #[serde(skip)]
    pub tls_client_ca: Option<PathBuf>,
    /// Run as one process of a cluster: a TOML file with the `[cluster]`
    /// settings (`processes`, `private_network`) at its top level; sets `cluster`.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub cluster: Option<PathBuf>,
    /// This process's index in the cluster's `processes` (sets `cluster.process`).
    #[arg(long, value_name = "I")]
    #[serde(skip)]
    pub process: Option<usize>,
}

impl ServerConfig {
    pub fn load(args: &ServeArgs) -> Result<ServerConfig, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(ServerConfig::default()));
        if let Some(path) = &args.config {
            figment = figment.merge(Toml::file_exact(path));
        }
        if let Some(path) = &args.cluster {
            // The file holds the `[cluster]` table's keys; the environment
            // (`VECTORFLOW_CLUSTER__PROCESS`) and `--process` still override them.
            let cluster: ClusterConfig = Figment::from(Toml::file_exact(path)).extract().map_err(Box::new)?;
            figment = figment.merge(Serialized::default("cluster", cluster));
        }
        let mut config: ServerConfig = figment
            // The client's credentials (`vectorflow search --user ...`) share the
            // prefix; they are no server setting, and deny_unknown_fields would
            // refuse them when both run from one shell.
            .merge(Env::prefixed("VECTORFLOW_").ignore(CLIENT_ONLY_ENV).split("__"))
            .merge(Serialized::defaults(args))
            .extract()
            .map_err(Box::new)?;
        if let Some(url) = &args.storage {
            config.storage.url = url.clone();
        }
        if let Some(process) = args.process {
            config.cluster.process = process;
        }
        if let Some(bootstrap) = &args.kafka {
            config.log.kind = LogKind::Kafka;
            config.log.kafka.bootstrap_servers = bootstrap.clone();
        }
        // Flags win over the file and the environment, one path at a time.
        if let Some(path) = &args.tls_cert {
            config.tls.cert_path = Some(path.clone());
        }
        if let Some(path) = &args.tls_key {
            config.tls.key_path = Some(path.clone());
        }
        if let Some(path) = &args.tls_client_ca {
            config.tls.client_ca_path = Some(path.clone());
        }
        Ok(config)
    }

    /// Refuses a non-loopback `listen` without authentication, and a
    /// non-loopback `metrics_listen` (plain HTTP: credentials would cross
    /// the network in clear) in any case, unless `insecure`.
    pub fn check_exposure(&self) -> Result<(), ExposureError> {
        if self.insecure {
            return Ok(());
        }
        if !self.auth.enabled && !is_loopback(&self.listen) {
            return Err(ExposureError::Unauthenticated { listen: self.listen.clone() });
        }
        if let Some(metrics) = &self.metrics_listen
            && !is_loopback(metrics)
        {
            return Err(ExposureError::PlainMetrics { listen: metrics.clone() });
        }
        Ok(())
    }

    pub fn engine_config(&self) -> EngineConfig {
        let defaults = EngineConfig::new(&self.data_dir);
        EngineConfig {
            workers: self.workers,
            seal_rows: self.seal_rows,
            max_segment_rows: self.max_segment_rows,
            vectors_on_disk: self.vectors_on_disk,
            role: self.role,
            cluster: self.cluster.clone(),
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
            replay_stall_timeout: Duration::from_secs(self.replay_stall_timeout_secs.max(1)),
            limits: (&self.limits).into(),
            max_apply_lag: (self.limits.max_apply_lag_ms > 0)
                .then(|| Duration::from_millis(self.limits.max_apply_lag_ms)),
            max_index_backlog_rows: (self.limits.max_index_backlog_rows > 0)
                .then_some(self.limits.max_index_backlog_rows),
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
            assert_eq!(shipped.limits, LimitSettings::default(), "the example lists the default limits");
            jail.set_env("VECTORFLOW_LIMITS__MAX_SEARCH_HITS", "5000");
            let limited = ServerConfig::load(&ServeArgs::default()).map_err(|e| e.to_string())?;
            assert_eq!(limited.engine_config().limits.max_search_hits, 5000);
            assert_eq!(limited.engine_config().limits.max_query_rows, LimitSettings::default().max_query_rows);
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
            assert_eq!(kafka.engine_config().role, Role::Primary);
            jail.set_env("VECTORFLOW_ROLE", "replica");
            assert_eq!(ServerConfig::load(&ServeArgs::default()).map_err(|e| e.to_string())?.role, Role::Replica);
            let flagged = ServeArgs { role: Some(Role::Primary), ..Default::default() };
            assert_eq!(ServerConfig::load(&flagged).map_err(|e| e.to_string())?.engine_config().role, Role::Primary);
            jail.set_env("VECTORFLOW_ROLE", "follower");
            assert!(ServerConfig::load(&ServeArgs::default()).is_err(), "an unknown role is refused");
            jail.set_env("VECTORFLOW_ROLE", "primary");
            jail.set_env("VECTORFLOW_LOG__KIND", "embedded");
            // A cluster file names the processes; the environment, then `--process`, pick this one.
            jail.create_file("cluster.toml", "processes = [\"127.0.0.1:2101\", \"127.0.0.1:2102\"]\n")?;
            jail.set_env("VECTORFLOW_CLUSTER__PROCESS", "1");
            let clustered = ServeArgs { cluster: Some("cluster.toml".into()), ..Default::default() };
            let cluster = ServerConfig::load(&clustered).map_err(|e| e.to_string())?.engine_config().cluster;
            assert_eq!((cluster.processes.len(), cluster.process), (2, 1));
            let flagged = ServeArgs { process: Some(0), ..clustered };
            assert_eq!(ServerConfig::load(&flagged).map_err(|e| e.to_string())?.cluster.process, 0);
            jail.create_file("bad.toml", "listen = 5\n")?;
            let bad = ServeArgs { config: Some("bad.toml".into()), ..Default::default() };
            let error = ServerConfig::load(&bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains("listen"), "{error}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closures return figment's own (large) error
    fn auth_section_from_file_and_environment() {
        use crate::auth::Role;
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "auth.toml",
                r#"
[auth]
enabled = true
[[auth.users]]
name = "ann"
password_hash = "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
role = "admin"
[[auth.users]]
name = "bob"
password_hash = "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
role = "read"
[[auth.tokens]]
token_hash = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
role = "write"
"#,
            )?;
            let args = ServeArgs { config: Some("auth.toml".into()), ..Default::default() };
            let config = ServerConfig::load(&args).map_err(|e| e.to_string())?;
            assert!(config.auth.enabled);
            let roles: Vec<_> = config.auth.users.iter().map(|u| (u.name.as_str(), u.role)).collect();
            assert_eq!(roles, [("ann", Role::Admin), ("bob", Role::Read)]);
            assert_eq!(config.auth.tokens[0].role, Role::Write);
            assert!(config.auth.authenticator().map_err(|e| e.to_string())?.is_some());
            assert!(ServerConfig::default().auth.authenticator().map_err(|e| e.to_string())?.is_none());

            jail.set_env("VECTORFLOW_AUTH__ENABLED", "true");
            jail.set_env(
                "VECTORFLOW_AUTH__USERS",
                r#"[{name="env", password_hash="$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaA", role="write"}]"#,
            );
            jail.set_env("VECTORFLOW_TOKEN", "a client setting, not the server's");
            jail.set_env("VECTORFLOW_USER", "ann");
            let from_env = ServerConfig::load(&ServeArgs::default()).map_err(|e| e.to_string())?;
            assert!(from_env.auth.enabled);
            assert_eq!(from_env.auth.users.len(), 1);
            assert_eq!(from_env.auth.users[0].name, "env");
            assert_eq!(from_env.auth.users[0].role, Role::Write);
            assert!(from_env.auth.users[0].password_hash.starts_with("$argon2id$v=19$m=64"));

            jail.clear_env();
            jail.create_file(
                "bad_role.toml",
                "[[auth.users]]\nname = \"x\"\npassword_hash = \"h\"\nrole = \"root\"\n",
            )?;
            let bad = ServerConfig::load(&ServeArgs { config: Some("bad_role.toml".into()), ..Default::default() });
            let error = bad.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains("root"), "{error}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closures return figment's own (large) error
    fn non_loopback_needs_auth_or_insecure() {
        assert!(is_loopback("127.0.0.1:19530"));
        assert!(is_loopback("127.8.0.1:0"));
        assert!(is_loopback("[::1]:0"));
        assert!(is_loopback("[::ffff:127.0.0.1]:0"));
        assert!(is_loopback("localhost:0"));
        assert!(!is_loopback("0.0.0.0:19530"));
        assert!(!is_loopback("[::]:0"));
        assert!(!is_loopback("192.0.2.1:80"));
        assert!(!is_loopback("no-such-host.invalid:80"));
        figment::Jail::expect_with(|jail| {
            let exposed = ServeArgs { listen: Some("0.0.0.0:0".into()), ..Default::default() };
            let config = ServerConfig::load(&exposed).map_err(|e| e.to_string())?;
            let error = config.check_exposure().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains("refusing to serve on 0.0.0.0:0"), "{error}");
            assert!(error.contains("--insecure") && error.contains("[auth]"), "{error}");
            let insecure = ServeArgs { insecure: true, ..exposed.clone() };
            assert_eq!(ServerConfig::load(&insecure).map_err(|e| e.to_string())?.check_exposure(), Ok(()));
            assert_eq!(ServerConfig::load(&ServeArgs::default()).map_err(|e| e.to_string())?.check_exposure(), Ok(()));
            jail.set_env("VECTORFLOW_INSECURE", "true");
            assert_eq!(ServerConfig::load(&exposed).map_err(|e| e.to_string())?.check_exposure(), Ok(()));
            jail.set_env("VECTORFLOW_INSECURE", "false");
            jail.set_env("VECTORFLOW_AUTH__ENABLED", "true");
            assert_eq!(ServerConfig::load(&exposed).map_err(|e| e.to_string())?.check_exposure(), Ok(()));
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closures return figment's own (large) error
    fn tls_section_from_file_environment_and_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "tls.toml",
                "[tls]\ncert_path = \"server.pem\"\nkey_path = \"server.key\"\nclient_ca_path = \"ca.pem\"\n",
            )?;
            let args = ServeArgs { config: Some("tls.toml".into()), ..Default::default() };
            let config = ServerConfig::load(&args).map_err(|e| e.to_string())?;
            assert_eq!(config.tls.cert_path.as_deref(), Some(std::path::Path::new("server.pem")));
            assert_eq!(config.tls.key_path.as_deref(), Some(std::path::Path::new("server.key")));
            assert_eq!(config.tls.client_ca_path.as_deref(), Some(std::path::Path::new("ca.pem")));
            assert_eq!(ServerConfig::default().tls, TlsSettings::default(), "TLS is off by default");

            jail.set_env("VECTORFLOW_TLS__CERT_PATH", "env.pem");
            jail.set_env("VECTORFLOW_TLS__KEY_PATH", "env.key");
            // The client's TLS variables share the prefix; the server must not refuse them.
            jail.set_env("VECTORFLOW_CA_CERT", "ca.pem");
            jail.set_env("VECTORFLOW_CLIENT_CERT", "client.pem");
            jail.set_env("VECTORFLOW_CLIENT_KEY", "client.key");
            let from_env = ServerConfig::load(&args).map_err(|e| e.to_string())?;
            assert_eq!(from_env.tls.cert_path.as_deref(), Some(std::path::Path::new("env.pem")));
            assert_eq!(from_env.tls.key_path.as_deref(), Some(std::path::Path::new("env.key")));
            assert_eq!(from_env.tls.client_ca_path.as_deref(), Some(std::path::Path::new("ca.pem")));

            let flagged =
                ServeArgs { tls_key: Some("flag.key".into()), tls_client_ca: Some("flag-ca.pem".into()), ..args };
            let from_flags = ServerConfig::load(&flagged).map_err(|e| e.to_string())?;
            assert_eq!(from_flags.tls.cert_path.as_deref(), Some(std::path::Path::new("env.pem")));
            assert_eq!(from_flags.tls.key_path.as_deref(), Some(std::path::Path::new("flag.key")));
            assert_eq!(from_flags.tls.client_ca_path.as_deref(), Some(std::path::Path::new("flag-ca.pem")));

            // Files are read at start, and every failure names the file.
            let error = from_flags.tls.server_config().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains("env.pem") && error.contains("cannot read"), "{error}");
            jail.create_file("env.pem", "not a certificate\n")?;
            let error = from_flags.tls.server_config().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains("env.pem") && error.contains("no PEM certificate"), "{error}");
            let half = TlsSettings { key_path: None, ..from_flags.tls.clone() };
            assert!(matches!(half.server_config(), Err(TlsError::MissingKey)));
            let only_ca = TlsSettings { client_ca_path: Some("ca.pem".into()), ..Default::default() };
            assert!(matches!(only_ca.server_config(), Err(TlsError::ClientCaWithoutTls)));
            assert!(matches!(TlsSettings::default().server_config(), Ok(None)));

            jail.create_file("bad_tls.toml", "[tls]\ncert = \"x.pem\"\n")?;
            let bad = ServerConfig::load(&ServeArgs { config: Some("bad_tls.toml".into()), ..Default::default() });
            let error = bad.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains("cert"), "{error}");
            Ok(())
        });
    }
}
