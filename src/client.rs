//! The command-line client: `vectorflow collection|insert|search|query` and
//! `vectorflow sql --addr`, talking gRPC (`vectorflow.v1`) to a running
//! `vectorflow serve`.
//!
//! Answers print as an Arrow pretty table, or with `--json` as JSON lines
//! (one object per row or hit). A gRPC error prints as `error: <CODE>:
//! <message>` on stderr and the process exits with status 1.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Int64Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{self as adt, DataType as ArrowType, Field, Schema};
use base64::Engine as _;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use vectorflow::{CollectionSchema, DataType, Pk, Value};
use vectorflow_proto::v1::vectorflow_client::VectorflowClient;
use vectorflow_proto::{self as wire, v1};

/// Where the client looks for a server when `--addr` is not given.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:19530";

/// How long connecting may take before the client gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected client; every call carries the `authorization` metadata, if any.
pub type Client = VectorflowClient<InterceptedService<Channel, Authorization>>;

// ---- arguments ----

/// Options every client command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Connect {
    /// The server: `http://host:port` or `host:port`, or `https://host:port` for TLS.
    #[arg(long, default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Print JSON lines (one object per row or hit) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Deadline of each call in seconds (none by default).
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub credentials: Credentials,
}

/// Credentials for a server with `[auth]` (a user and password, or a token),
/// and what an `https://` connection trusts and presents (`tls`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Credentials {
    /// User name, with --password (sent as `Basic` authorization).
    #[arg(long, env = "VECTORFLOW_USER")]
    pub user: Option<String>,
    /// Password of --user. The environment variable keeps it out of the process list.
    #[arg(long, env = "VECTORFLOW_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Bearer token, instead of --user/--password.
    #[arg(long, env = "VECTORFLOW_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS options of an `https://` address.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Trust this CA certificate (PEM) for an https:// server, e.g. a self-signed
    /// one [default: the system's trusted roots].
    #[arg(long, env = "VECTORFLOW_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Present this certificate (PEM) to a server that requires client certificates
    /// (mutual TLS); with --client-key.
    #[arg(long, env = "VECTORFLOW_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(long, env = "VECTORFLOW_CLIENT_KEY", hide_env_values = true)]
    pub client_key: Option<PathBuf>,
}

impl TlsArgs {
    /// From `VECTORFLOW_CA_CERT`, `VECTORFLOW_CLIENT_CERT` and `VECTORFLOW_CLIENT_KEY`
    /// alone (for tools without the flags, like `vectorflow bench --addr`).
    pub fn from_env() -> TlsArgs {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        TlsArgs {
            ca_cert: var("VECTORFLOW_CA_CERT"),
            client_cert: var("VECTORFLOW_CLIENT_CERT"),
            client_key: var("VECTORFLOW_CLIENT_KEY"),
        }
    }

    fn given(&self) -> bool {
        self.ca_cert.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }

    /// tonic's client TLS settings: the CA (or the system's roots) and the
    /// client identity, every file read and checked here so a bad one is named.
    pub fn client_config(&self) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
        use crate::config::{read_certificates, read_private_key};
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &self.ca_cert {
            Some(path) => config.ca_certificate(tonic::transport::Certificate::from_pem(read_certificates(
                "--ca-cert (VECTORFLOW_CA_CERT)",
                path,
            )?)),
            None => config.with_native_roots(),
        };
        match (&self.client_cert, &self.client_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                let cert = read_certificates("--client-cert (VECTORFLOW_CLIENT_CERT)", cert)?;
                let key = read_private_key("--client-key (VECTORFLOW_CLIENT_KEY)", key)?;
                config = config.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            (Some(_), None) => bail!("--client-cert needs --client-key (or VECTORFLOW_CLIENT_KEY)"),
            (None, Some(_)) => bail!("--client-key needs --client-cert (or VECTORFLOW_CLIENT_CERT)"),
        }
        Ok(config)
    }
}

impl Credentials {
    /// From `VECTORFLOW_USER`, `VECTORFLOW_PASSWORD` and `VECTORFLOW_TOKEN` alone
    /// (for tools without the flags, like `vectorflow bench --addr`).
    pub fn from_env() -> Credentials {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Credentials {
            user: var("VECTORFLOW_USER"),
            password: var("VECTORFLOW_PASSWORD"),
            token: var("VECTORFLOW_TOKEN"),
            tls: TlsArgs::from_env(),
        }
    }

    fn given(&self) -> bool {
        self.user.is_some() || self.password.is_some() || self.token.is_some()
    }

    /// The `authorization` metadata value, or an error naming what is missing.
    pub fn authorization(&self) -> anyhow::Result<Authorization> {
        let text = match (&self.user, &self.password, &self.token) {
            (None, None, None) => return Ok(Authorization(None)),
            (None, None, Some(token)) => format!("Bearer {}", token.trim()),
            (Some(user), Some(password), None) => {
                if user.contains(':') {
                    bail!("--user `{user}`: a user name cannot contain `:`");
                }
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
            }
            (Some(_), None, None) => bail!("--user needs --password (or VECTORFLOW_PASSWORD)"),
            (None, Some(_), None) => bail!("--password needs --user (or VECTORFLOW_USER)"),
            (_, _, Some(_)) => bail!(
                "give --user/--password or --token, not both (check VECTORFLOW_USER, VECTORFLOW_PASSWORD, VECTORFLOW_TOKEN)"
            ),
        };
        let value = MetadataValue::try_from(text.as_str())
            .map_err(|_| anyhow!("the credentials hold characters that cannot be sent as gRPC metadata"))?;
        Ok(Authorization(Some(value)))
    }
}

/// Adds the `authorization` metadata to every call (nothing when `None`).
#[derive(Debug, Clone, Default)]
pub struct Authorization(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Authorization {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// `vectorflow collection ...`
#[derive(Debug, clap::Subcommand)]
pub enum CollectionCommand {
    /// Create a collection from a schema (JSON text, or @file.json).
    Create {
        /// The serde form of `vectorflow::CollectionSchema`, e.g.
        /// '{"name": "docs", "fields": [{"name": "id", "data_type": "Int64", "is_primary": true},
        /// {"name": "v", "data_type": {"FloatVector": {"dim": 3, "metric": "L2"}}}]}'.
        #[arg(long)]
        schema: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// List the collections.
    List {
        #[command(flatten)]
        connect: Connect,
    },
    /// Show a collection's fields (with --json: its schema in the form `create` takes).
    Describe {
        name: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Drop a collection and its rows.
    Drop {
        name: String,
        #[command(flatten)]
        connect: Connect,
    },
}

/// `vectorflow alias ...`
#[derive(Debug, clap::Subcommand)]
pub enum AliasCommand {
    /// Name a collection also ALIAS (reads and writes through the alias reach it).
    Create {
        alias: String,
        /// The collection it names.
        #[arg(long, short = 'c')]
        collection: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Point ALIAS at another collection, atomically (a blue/green swap).
    Alter {
        alias: String,
        #[arg(long, short = 'c')]
        collection: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Show the collection ALIAS names.
    Describe {
        alias: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// List the aliases (of one collection with --collection).
    List {
        #[arg(long, short = 'c')]
        collection: Option<String>,
        #[command(flatten)]
        connect: Connect,
    },
    /// Remove an alias (the collection stays).
    Drop {
        alias: String,
        #[command(flatten)]
        connect: Connect,
    },
}

/// `vectorflow sink`
#[derive(Debug, clap::Subcommand)]
pub enum SinkCommand {
    /// Write a standing query's changes to a Kafka topic of the server's brokers, exactly once,
    /// from now (or --as-of) on, across restarts, until the sink is dropped.
    Create(SinkCreateArgs),
    /// List the sinks, where each stands and how far it has written.
    List {
        #[command(flatten)]
        connect: Connect,
    },
    /// Stop a sink and forget it (its records stay in the topic).
    Drop {
        name: String,
        #[command(flatten)]
        connect: Connect,
    },
}

/// `vectorflow sink create`
#[derive(Debug, clap::Args)]
pub struct SinkCreateArgs {
    pub name: String,
    /// The topic (created with one partition when missing).
    #[arg(long)]
    pub topic: String,
    #[command(flatten)]
    pub query: StandingQueryArgs,
    /// A progress record after this many milliseconds without a change.
    #[arg(long, default_value_t = 1000)]
    pub progress_every_ms: u32,
    #[command(flatten)]
    pub connect: Connect,
}

/// `vectorflow partition`
#[derive(Debug, clap::Subcommand)]
pub enum PartitionCommand {
    /// Create partition NAME in a collection.
    Create {
        name: String,
        #[arg(long, short = 'c')]
        collection: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Drop partition NAME (reads `--as-of` before the printed timestamp still see its rows).
    Drop {
        name: String,
        #[arg(long, short = 'c')]
        collection: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// List a collection's partitions (`_default` first).
    List {
        #[arg(long, short = 'c')]
        collection: String,
        #[command(flatten)]
        connect: Connect,
    },
}

/// `vectorflow insert`
#[derive(Debug, clap::Args)]
pub struct InsertArgs {
    #[arg(long, short = 'c')]
    pub collection: String,
    /// JSON lines (one object per row: field name -> value, vectors as number
    /// arrays) or, by the extension `.parquet`, a Parquet file (vectors as a
    /// list or fixed-size-list column).
    #[arg(long)]
    pub file: PathBuf,
    /// Rows per Insert call.
    #[arg(long, default_value_t = 1000)]
    pub batch_rows: usize,
    /// The partition to write to (`_default` when left out).
    #[arg(long)]
    pub partition: Option<String>,
    #[command(flatten)]
    pub connect: Connect,
}

/// Read options shared by `search` and `query`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    /// A filter expression (Milvus syntax or an SQL predicate).
    #[arg(long)]
    pub filter: Option<String>,
    /// Fields to return, comma separated (`*` = every field).
    #[arg(long, value_delimiter = ',')]
    pub output_fields: Vec<String>,
    /// Only these partitions, comma separated (all when left out).
    #[arg(long, value_delimiter = ',')]
    pub partitions: Vec<String>,
    #[arg(long, value_enum, default_value_t = ConsistencyArg::Strong)]
    pub consistency: ConsistencyArg,
    /// Time travel: answer as of this hybrid timestamp (e.g. one `insert` printed).
    #[arg(long)]
    pub as_of: Option<u64>,
    /// For `--consistency session`: the timestamp of your last write.
    #[arg(long)]
    pub guarantee_ts: Option<u64>,
}

/// `vectorflow search`
#[derive(Debug, clap::Args)]
pub struct SearchArgs {
    #[arg(long, short = 'c')]
    pub collection: String,
    /// A query vector as a JSON array, e.g. '[0.1, 0.2, 0.3]'; repeat for several.
    #[arg(long = "vector")]
    pub vectors: Vec<String>,
    /// Query vectors as JSON lines, one number array per line.
    #[arg(long)]
    pub vectors_file: Option<PathBuf>,
    /// The vector field (needed only when the collection has several).
    #[arg(long)]
    pub field: Option<String>,
    #[arg(long, default_value_t = 10)]
    pub k: u32,
    /// HNSW search breadth (the server's default when left out).
    #[arg(long)]
    pub ef: Option<u32>,
    /// Range search: only hits within this score of the query (L2:
    /// distance < radius; IP, COSINE: similarity > radius); `k` caps them.
    #[arg(long, allow_hyphen_values = true)]
    pub radius: Option<f32>,
    /// The range's near end (L2: distance >= it; IP, COSINE: similarity <= it).
    #[arg(long, allow_hyphen_values = true, requires = "radius")]
    pub range_filter: Option<f32>,
    /// Grouping search: `k` groups by this scalar field (printed with the hits).
    #[arg(long)]
    pub group_by: Option<String>,
    /// Hits per group at most.
    #[arg(long, default_value_t = 1, requires = "group_by")]
    pub group_size: u32,
    /// Fill every group to `--group-size` hits when it has that many rows.
    #[arg(long, requires = "group_by")]
    pub strict_group_size: bool,
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub connect: Connect,
}

/// The standing query of `vectorflow subscribe` and `vectorflow sink create`.
#[derive(Debug, clap::Args)]
pub struct StandingQueryArgs {
    #[arg(long, short = 'c')]
    pub collection: String,
    /// A query vector as a JSON array; repeat for several. None: a
    /// changefeed of the rows `--filter` passes.
    #[arg(long = "vector")]
    pub vectors: Vec<String>,
    /// The vector field (needed only when the collection has several).
    #[arg(long)]
    pub field: Option<String>,
    #[arg(long, default_value_t = 10)]
    pub k: u32,
    /// A filter expression (Milvus syntax or an SQL predicate).
    #[arg(long)]
    pub filter: Option<String>,
    /// Fields to return, comma separated (`*` = every field).
    #[arg(long, value_delimiter = ',')]
    pub output_fields: Vec<String>,
    /// Start at this past hybrid timestamp and replay the changes since.
    #[arg(long)]
    pub as_of: Option<u64>,
}

impl StandingQueryArgs {
    /// The request's query, and the collection's schema (the events' columns).
    async fn request(&self, client: &mut Client) -> anyhow::Result<(v1::SubscribeRequest, CollectionSchema)> {
        let vectors = self
            .vectors
            .iter()
            .enumerate()
            .map(|(i, text)| parse_vector(text).map_err(|e| anyhow!("--vector #{}: {e}", i + 1)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (_, schema) = describe(client, &self.collection).await?;
        let request = v1::SubscribeRequest {
            collection: self.collection.clone(),
            field: self.field.clone().unwrap_or_default(),
            vectors: (!vectors.is_empty()).then(|| wire::pack_vectors(&vectors)),
            k: if vectors.is_empty() { 0 } else { self.k },
            filter: self.filter.clone().unwrap_or_default(),
            output_fields: output_fields(&schema, &self.output_fields)?,
            as_of: self.as_of.unwrap_or(0),
            buffer: 0,
        };
        Ok((request, schema))
    }
}

/// `vectorflow subscribe`
#[derive(Debug, clap::Args)]
pub struct SubscribeArgs {
    #[command(flatten)]
    pub query: StandingQueryArgs,
    /// Events the server buffers if this client falls behind (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub buffer: u32,
    /// Stop after this many events (all until interrupted when left out).
    #[arg(long)]
    pub events: Option<usize>,
    #[command(flatten)]
    pub connect: Connect,
}

/// `vectorflow hybrid-search`
#[derive(Debug, clap::Args)]
pub struct HybridSearchArgs {
    #[arg(long, short = 'c')]
    pub collection: String,
    /// One search as a JSON object: {"field": "v", "vector": [...], "k": 20,
    /// "ef": 64, "filter": "...", "radius": 0.5, "range_filter": 0.9}
    /// (`vector` and `k` required); repeat for each search to fuse.
    #[arg(long = "search", required = true)]
    pub searches: Vec<String>,
    /// Fused hits to print.
    #[arg(long, default_value_t = 10)]
    pub k: u32,
    /// Reciprocal rank fusion with this constant (the default, with 60).
    #[arg(long, conflicts_with = "weights")]
    pub rrf: Option<f32>,
    /// Weighted fusion: one weight per search, comma separated.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub weights: Vec<f32>,
    /// With --weights: add the searches' own scores instead of normalising them to [0, 1].
    #[arg(long, requires = "weights")]
    pub raw_scores: bool,
    /// `--filter` applies to every search that has none of its own.
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub connect: Connect,
}

/// `vectorflow query`
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    #[arg(long, short = 'c')]
    pub collection: String,
    /// At most this many rows (all when left out).
    #[arg(long)]
    pub limit: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Print only the number of matching rows.
    #[arg(long)]
    pub count: bool,
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub connect: Connect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsistencyArg {
    Strong,
    Session,
    Bounded,
    Eventually,
}

impl ConsistencyArg {
    fn to_proto(self) -> v1::ConsistencyLevel {
        match self {
            ConsistencyArg::Strong => v1::ConsistencyLevel::Strong,
            ConsistencyArg::Session => v1::ConsistencyLevel::Session,
            ConsistencyArg::Bounded => v1::ConsistencyLevel::Bounded,
            ConsistencyArg::Eventually => v1::ConsistencyLevel::Eventually,
        }
    }
}

impl ReadArgs {
    fn to_proto(&self) -> v1::ReadOptions {
        v1::ReadOptions {
            consistency: self.consistency.to_proto() as i32,
            as_of: self.as_of.unwrap_or(0),
            guarantee_ts: self.guarantee_ts.unwrap_or(0),
        }
    }
}

// ---- errors and connections ----

/// A gRPC status, shown as `<CODE>: <message>`, optionally with where it happened.
#[derive(Debug)]
pub struct RpcError {
    pub status: tonic::Status,
    pub context: Option<String>,
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let message = self.status.message();
        let message = if message.is_empty() { self.status.code().description() } else { message };
        write!(f, "{}: {message}", code_name(self.status.code()))?;
        // Transport failures keep their cause (connection refused, reset, ...) in the source chain.
        if let Some(source) = std::error::Error::source(&self.status) {
            let chain = error_chain(source);
            if !message.contains(&chain) {
                write!(f, ": {chain}")?;
            }
        }
        if let Some(context) = &self.context {
            write!(f, " ({context})")?;
        }
        Ok(())
    }
}

impl std::error::Error for RpcError {}

/// A gRPC status as an error for `?`.
pub fn rpc(status: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(RpcError { status, context: None })
}

/// The canonical gRPC name of a status code (`NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its causes, `: `-separated, without repeats.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Prints a failed command as `error: ...` on stderr and exits with status 1.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(error) = result {
        let _ = std::io::stdout().flush();
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// `addr` with its scheme: `host:port` means `http://host:port`.
fn uri(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}

/// The endpoint for `addr` (`http://host:port`, or `host:port` meaning http);
/// `https://host:port` connects with TLS per `tls`.
pub fn endpoint(addr: &str, timeout: Option<Duration>, tls: &TlsArgs) -> anyhow::Result<Endpoint> {
    let addr = addr.trim();
    let uri = uri(addr);
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| {
            anyhow!(
                "invalid address `{addr}`: {} (expected host:port, http://host:port or https://host:port)",
                error_chain(&e)
            )
        })?
        .connect_timeout(CONNECT_TIMEOUT);
    if endpoint.uri().scheme_str() == Some("https") {
        endpoint = endpoint
            .tls_config(tls.client_config()?)
            .map_err(|e| anyhow!("TLS settings for {uri}: {}", error_chain(&e)))?;
    } else if tls.given() {
        // Certificates with a plaintext address are most likely a forgotten
        // `https://`; sending the calls in the clear instead would be a silent downgrade.
        bail!(
            "--ca-cert/--client-cert/--client-key (or VECTORFLOW_CA_CERT, VECTORFLOW_CLIENT_CERT, \
             VECTORFLOW_CLIENT_KEY) are for TLS, but `{addr}` is plaintext: use https://host:port"
        );
    }
    Ok(match timeout {
        Some(timeout) => endpoint.timeout(timeout),
        None => endpoint,
    })
}

/// A client on a fresh connection to `addr`, with the credentials of the
/// `VECTORFLOW_USER`/`VECTORFLOW_PASSWORD`/`VECTORFLOW_TOKEN` environment.
pub async fn connect(addr: &str, timeout: Option<Duration>) -> anyhow::Result<Client> {
    let credentials = Credentials::from_env();
    connect_as(addr, timeout, credentials.authorization()?, &credentials.tls).await
}

/// A client on a fresh connection to `addr` that sends `authorization` on every call.
pub async fn connect_as(
    addr: &str,
    timeout: Option<Duration>,
    authorization: Authorization,
    tls: &TlsArgs,
) -> anyhow::Result<Client> {
    let channel = channel_with(addr, timeout, tls).await?;
    Ok(VectorflowClient::with_interceptor(channel, authorization).max_decoding_message_size(usize::MAX))
}

/// A fresh HTTP/2 connection to `addr` (TLS settings from the environment).
pub async fn channel(addr: &str, timeout: Option<Duration>) -> anyhow::Result<Channel> {
    channel_with(addr, timeout, &TlsArgs::from_env()).await
}

/// A fresh HTTP/2 connection to `addr`, with TLS per `tls` for `https://`.
pub async fn channel_with(addr: &str, timeout: Option<Duration>, tls: &TlsArgs) -> anyhow::Result<Channel> {
    let endpoint = endpoint(addr, timeout, tls)?;
    endpoint.connect().await.map_err(|e| {
        let chain = error_chain(&e);
        // The usual cause is a server certificate from a private CA; say how to trust it.
        let hint = if chain.contains("invalid peer certificate") && tls.ca_cert.is_none() {
            " (a server with a private or self-signed CA: give its CA certificate with --ca-cert or VECTORFLOW_CA_CERT)"
        } else {
            ""
        };
        anyhow!("cannot connect to {}: {chain}{hint}", uri(addr))
    })
}

fn timeout(connect: &Connect) -> anyhow::Result<Option<Duration>> {
    match connect.timeout {
        None => Ok(None),
        Some(secs) => match Duration::try_from_secs_f64(secs) {
            Ok(duration) if !duration.is_zero() => Ok(Some(duration)),
            _ => bail!("--timeout {secs:?}: give a positive number of seconds"),
        },
    }
}

/// Runs `f` with a client connected per `connect`, on a runtime of its own.
fn with_client<T>(connect: &Connect, f: impl AsyncFnOnce(&mut Client) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let timeout = timeout(connect)?;
    let authorization = connect.credentials.authorization()?;
    let result = runtime.block_on(async {
        let mut client = connect_as(&connect.addr, timeout, authorization, &connect.credentials.tls).await?;
        f(&mut client).await
    });
    result.map_err(|error| {
        let status = error.downcast_ref::<RpcError>().map(|e| e.status.code());
        match status {
            Some(tonic::Code::Unauthenticated) if !connect.credentials.given() => error.context(
                "the server requires credentials: give --user and --password, or --token \
                 (or set VECTORFLOW_USER and VECTORFLOW_PASSWORD, or VECTORFLOW_TOKEN)",
            ),
            _ => error,
        }
    })
}

/// The collection's schema, from the server.
pub async fn describe(client: &mut Client, name: &str) -> anyhow::Result<(v1::CollectionInfo, CollectionSchema)> {
    let info =
        client.describe_collection(v1::CollectionRef { name: name.to_string() }).await.map_err(rpc)?.into_inner();
    let schema = info.schema.clone().ok_or_else(|| anyhow!("the server sent no schema for `{name}`"))?;
    let schema = wire::schema_from_proto(schema).with_context(|| format!("the schema of `{name}` from the server"))?;
    Ok((info, schema))
}

// ---- alias ----

pub fn alias(command: AliasCommand) -> anyhow::Result<()> {
    match command {
        AliasCommand::Create { alias, collection, connect } => {
            let request = v1::AliasRequest { alias: alias.clone(), collection: collection.clone() };
            with_client(&connect, async |client| Ok(client.create_alias(request).await.map_err(rpc)?.into_inner()))?;
            report_alias(connect.json, "created", &alias, &collection);
        }
        AliasCommand::Alter { alias, collection, connect } => {
            let request = v1::AliasRequest { alias: alias.clone(), collection: collection.clone() };
            with_client(&connect, async |client| Ok(client.alter_alias(request).await.map_err(rpc)?.into_inner()))?;
            report_alias(connect.json, "altered", &alias, &collection);
        }
        AliasCommand::Describe { alias, connect } => {
            let request = v1::AliasRef { alias: alias.clone() };
            let named = with_client(&connect, async |client| {
                Ok(client.describe_alias(request).await.map_err(rpc)?.into_inner())
            })?;
            report_alias(connect.json, "", &named.alias, &named.collection);
        }
        AliasCommand::List { collection, connect } => {
            let request = v1::CollectionRef { name: collection.unwrap_or_default() };
            let aliases = with_client(&connect, async |client| {
                Ok(client.list_aliases(request).await.map_err(rpc)?.into_inner().aliases)
            })?;
            print_names("alias", aliases, connect.json)?;
        }
        AliasCommand::Drop { alias, connect } => {
            let request = v1::AliasRef { alias: alias.clone() };
            with_client(&connect, async |client| Ok(client.drop_alias(request).await.map_err(rpc)?.into_inner()))?;
            report_dropped(connect.json, "alias", &alias);
        }
    }
    Ok(())
}

pub fn sink(command: SinkCommand) -> anyhow::Result<()> {
    match command {
        SinkCommand::Create(args) => {
            let connect = args.connect.clone();
            let info = with_client(&connect, async |client| {
                let (query, _) = args.query.request(client).await?;
                let request = v1::CreateSinkRequest {
                    name: args.name.clone(),
                    topic: args.topic.clone(),
                    query: Some(query),
                    progress_every_ms: args.progress_every_ms,
                };
                Ok(client.create_sink(request).await.map_err(rpc)?.into_inner())
            })?;
            print_sinks(&[info], connect.json);
        }
        SinkCommand::List { connect } => {
            let sinks = with_client(&connect, async |client| {
                Ok(client.list_sinks(v1::Empty {}).await.map_err(rpc)?.into_inner().sinks)
            })?;
            print_sinks(&sinks, connect.json);
        }
        SinkCommand::Drop { name, connect } => {
            let request = v1::SinkRef { name: name.clone() };
            with_client(&connect, async |client| Ok(client.drop_sink(request).await.map_err(rpc)?.into_inner()))?;
            report_dropped(connect.json, "sink", &name);
        }
    }
    Ok(())
}

/// `{"dropped_<what>": name}`, or `dropped <what> `name``.
fn report_dropped(json: bool, what: &str, name: &str) {
    if json {
        let mut line = serde_json::Map::new();
        line.insert(format!("dropped_{what}"), name.into());
        println!("{}", serde_json::Value::Object(line));
    } else {
        println!("dropped {what} `{name}`");
    }
}

fn print_sinks(sinks: &[v1::SinkInfo], json: bool) {
    for sink in sinks {
        if json {
            let line = serde_json::json!({
                "name": sink.name,
                "collection": sink.collection,
                "topic": sink.topic,
                "partition": sink.partition,
                "start_ts": sink.start_ts,
                "incarnation": sink.incarnation,
                "state": sink.state,
                "written_through": sink.written_through,
                "records": sink.records,
            });
            println!("{line}");
        } else {
            println!(
                "{}\tcollection={}\ttopic={}[{}]\tstate={}\twritten_through={}\trecords={}",
                sink.name, sink.collection, sink.topic, sink.partition, sink.state, sink.written_through, sink.records
            );
        }
    }
}

pub fn partition(command: PartitionCommand) -> anyhow::Result<()> {
    match command {
        PartitionCommand::Create { name, collection, connect } => {
            let request = v1::PartitionRequest { collection: collection.clone(), partition: name.clone() };
            with_client(&connect, async |client| {
                Ok(client.create_partition(request).await.map_err(rpc)?.into_inner())
            })?;
            if connect.json {
                println!("{}", serde_json::json!({ "collection": collection, "created_partition": name }));
            } else {
                println!("created partition `{name}` in `{collection}`");
            }
        }
        PartitionCommand::Drop { name, collection, connect } => {
            let request = v1::PartitionRequest { collection: collection.clone(), partition: name.clone() };
            let dropped = with_client(&connect, async |client| {
                Ok(client.drop_partition(request).await.map_err(rpc)?.into_inner())
            })?;
            if connect.json {
                println!(
                    "{}",
                    serde_json::json!({ "collection": collection, "dropped_partition": name, "ts": dropped.ts })
                );
            } else {
                println!("dropped partition `{name}` of `{collection}` at ts {}", dropped.ts);
            }
        }
        PartitionCommand::List { collection, connect } => {
            let request = v1::CollectionRef { name: collection };
            let names = with_client(&connect, async |client| {
                Ok(client.list_partitions(request).await.map_err(rpc)?.into_inner().names)
            })?;
            print_names("partition", names, connect.json)?;
        }
    }
    Ok(())
}

/// A one-column listing (`column` heads it, or keys each JSON line).
fn print_names(column: &str, names: Vec<String>, json: bool) -> anyhow::Result<()> {
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(column, ArrowType::Utf8, false)])),
        vec![Arc::new(StringArray::from(names))],
    )?;
    print_batches(&[batch], json, &HashSet::new())
}

/// One line about an alias: `verb` ("created", "altered", or "" to describe).
fn report_alias(json: bool, verb: &str, alias: &str, collection: &str) {
    if json {
        println!("{}", serde_json::json!({ "alias": alias, "collection": collection }));
    } else if verb.is_empty() {
        println!("alias `{alias}` names collection `{collection}`");
    } else {
        println!("{verb} alias `{alias}` for collection `{collection}`");
    }
}

// ---- collection ----

pub fn collection(command: CollectionCommand) -> anyhow::Result<()> {
    match command {
        CollectionCommand::Create { schema, connect } => {
            let schema = read_schema(&schema)?;
            let json = connect.json;
            let info = with_client(&connect, async |client| {
                let request = v1::CreateCollectionRequest { schema: Some(wire::schema_to_proto(&schema)) };
                Ok(client.create_collection(request).await.map_err(rpc)?.into_inner())
            })?;
            if json {
                let line = serde_json::json!({"name": schema.name, "id": info.id, "created_ts": info.created_ts});
                println!("{line}");
            } else {
                println!("created collection `{}` (id {}, created_ts {})", schema.name, info.id, info.created_ts);
            }
        }
        CollectionCommand::List { connect } => {
            let names = with_client(&connect, async |client| {
                Ok(client.list_collections(v1::Empty {}).await.map_err(rpc)?.into_inner().names)
            })?;
            print_names("name", names, connect.json)?;
        }
        CollectionCommand::Describe { name, connect } => {
            let (info, schema) = with_client(&connect, async |client| describe(client, &name).await)?;
            if connect.json {
                let line = serde_json::json!({"id": info.id, "created_ts": info.created_ts, "schema": schema});
                println!("{line}");
            } else {
                let description =
                    if schema.description.is_empty() { String::new() } else { format!(", {:?}", schema.description) };
                println!("collection `{}` (id {}, created_ts {}{description})", schema.name, info.id, info.created_ts);
                println!("{}", arrow::util::pretty::pretty_format_batches(&[fields_table(&schema)?])?);
            }
        }
        CollectionCommand::Drop { name, connect } => {
            with_client(&connect, async |client| {
                client.drop_collection(v1::CollectionRef { name: name.clone() }).await.map_err(rpc)?;
                Ok(())
            })?;
            if connect.json {
                println!("{}", serde_json::json!({ "dropped": name }));
            } else {
                println!("dropped collection `{name}`");
            }
        }
    }
    Ok(())
}

/// `--schema`: JSON text, or `@path` to a JSON file.
fn read_schema(argument: &str) -> anyhow::Result<CollectionSchema> {
    let (text, origin) = match argument.strip_prefix('@') {
        Some(path) => (std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?, path.to_string()),
        None => (argument.to_string(), "--schema".to_string()),
    };
    serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{origin} is not a collection schema: {e} (expected {{\"name\": ..., \"fields\": [{{\"name\": ..., \
             \"data_type\": ...}}, ...]}}; see README.md)"
        )
    })
}

/// A readable name of a field type.
fn type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::VarChar { max_length } => format!("VarChar({max_length})"),
        DataType::FloatVector { dim, metric } => format!("FloatVector({dim}, {metric:?})"),
        other => format!("{other:?}"),
    }
}

fn fields_table(schema: &CollectionSchema) -> anyhow::Result<RecordBatch> {
    let text = |f: &dyn Fn(&vectorflow::FieldSchema) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(schema.fields.iter().map(f)))
    };
    let flag = |b: bool| if b { "yes".to_string() } else { String::new() };
    let columns = vec![
        ("field", text(&|f| f.name.clone())),
        ("type", text(&|f| type_name(&f.data_type))),
        ("primary", text(&|f| flag(f.is_primary))),
        ("auto_id", text(&|f| flag(f.auto_id))),
        ("nullable", text(&|f| flag(f.nullable))),
        ("default", text(&|f| f.default_value.as_ref().map(|v| v.to_json().to_string()).unwrap_or_default())),
    ];
    let schema =
        Schema::new(columns.iter().map(|(name, _)| Field::new(*name, ArrowType::Utf8, false)).collect::<Vec<_>>());
    Ok(RecordBatch::try_new(Arc::new(schema), columns.into_iter().map(|(_, c)| c).collect())?)
}

// ---- insert ----

pub fn insert(args: InsertArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_rows >= 1, "--batch-rows must be at least 1");
    let parquet = args.file.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let json = args.connect.json;
    let (rows, ts) = with_client(&args.connect, async |client| {
        let (_, schema) = describe(client, &args.collection).await?;
        if parquet {
            insert_parquet(client, &args, &schema).await
        } else {
            insert_json_lines(client, &args, &schema).await
        }
    })?;
    if json {
        println!("{}", serde_json::json!({"collection": args.collection, "rows": rows, "ts": ts}));
    } else {
        println!("inserted {rows} rows into `{}`; last write ts {ts}", args.collection);
    }
    Ok(())
}

fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Sends one write; a refusal names the rows it came from and what was written before.
async fn send(
    client: &mut Client,
    request: v1::WriteRequest,
    rows: &str,
    written: u64,
) -> anyhow::Result<v1::WriteResponse> {
    match client.insert(request).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => {
            let context = format!("{rows}; {written} rows before them were inserted");
            Err(anyhow::Error::new(RpcError { status, context: Some(context) }))
        }
    }
}

/// JSON lines: every line is checked first (nothing is written if one is
/// bad), then rows go out in batches of columns.
async fn insert_json_lines(
    client: &mut Client,
    args: &InsertArgs,
    schema: &CollectionSchema,
) -> anyhow::Result<(u64, u64)> {
    let path = &args.file;
    let size = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    let bar = progress_bar(size, "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    bar.set_message("check");
    for row in JsonRows::open(path, schema)? {
        let (_, _, bytes) = row.inspect_err(|_| bar.abandon())?;
        bar.inc(bytes);
    }
    bar.set_position(0);
    bar.set_message("insert");
    let (mut written, mut ts) = (0u64, 0u64);
    let mut rows = JsonRows::open(path, schema)?.peekable();
    while rows.peek().is_some() {
        let mut batch = Vec::with_capacity(args.batch_rows.min(1 << 16));
        let (mut first, mut last, mut bytes) = (0, 0, 0);
        for row in rows.by_ref().take(args.batch_rows) {
            let (line, row, size) = row.inspect_err(|_| bar.abandon())?;
            if batch.is_empty() {
                first = line;
            }
            (last, bytes) = (line, bytes + size);
            batch.push(row);
        }
        let request = v1::WriteRequest {
            collection: args.collection.clone(),
            columns: row_columns(schema, &batch)?,
            arrow_ipc: Vec::new(),
            partition: args.partition.clone().unwrap_or_default(),
        };
        let what = format!("lines {first}-{last} of {}", path.display());
        let response = send(client, request, &what, written).await.inspect_err(|_| bar.abandon())?;
        written += batch.len() as u64;
        ts = ts.max(response.ts);
        bar.inc(bytes);
    }
    bar.finish_and_clear();
    Ok((written, ts))
}

/// The rows of a JSON lines file: (line number, row, bytes of the line) for
/// every non-blank line; a bad line is an error naming it and the field.
struct JsonRows<'a> {
    path: &'a Path,
    schema: &'a CollectionSchema,
    lines: std::iter::Enumerate<std::io::Lines<BufReader<File>>>,
}

impl<'a> JsonRows<'a> {
    fn open(path: &'a Path, schema: &'a CollectionSchema) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(JsonRows { path, schema, lines: BufReader::new(file).lines().enumerate() })
    }
}

impl Iterator for JsonRows<'_> {
    type Item = anyhow::Result<(usize, BTreeMap<String, Value>, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (i, line) = self.lines.next()?;
            let number = i + 1;
            let line = match line {
                Ok(line) => line,
                Err(e) => return Some(Err(anyhow!("{} line {number}: {e}", self.path.display()))),
            };
            if line.trim().is_empty() {
                continue;
            }
            let bytes = line.len() as u64 + 1;
            return Some(
                json_row(self.schema, &line)
                    .map(|row| (number, row, bytes))
                    .map_err(|e| anyhow!("{} line {number}: {e}", self.path.display())),
            );
        }
    }
}

/// One JSON object as a row of `schema`, checked as the engine will check it.
fn json_row(schema: &CollectionSchema, line: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    let json: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow!("not JSON: {e}"))?;
    let serde_json::Value::Object(object) = json else {
        bail!("expected a JSON object (field name -> value), got {}", short(&json.to_string()));
    };
    Ok(vectorflow::crates::core::batch::row_from_json(schema, object)?)
}

fn short(text: &str) -> String {
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text.to_string()
    }
}

/// The columns of a batch of rows: every field some row gives (a row that
/// leaves one out sends null, which the server fills with the default).
fn row_columns(schema: &CollectionSchema, rows: &[BTreeMap<String, Value>]) -> anyhow::Result<Vec<v1::FieldData>> {
    let mut fields: Vec<String> =
        schema.fields.iter().filter(|f| rows.iter().any(|r| r.contains_key(&f.name))).map(|f| f.name.clone()).collect();
    if fields.is_empty() {
        // Rows of nothing but defaults (auto_id key): name the other fields so the batch has a length.
        fields = schema.fields.iter().filter(|f| !(f.is_primary && f.auto_id)).map(|f| f.name.clone()).collect();
    }
    Ok(wire::rows_to_columns(schema, &fields, rows)?)
}

/// Parquet: record batches of `--batch-rows` rows, sent as Arrow IPC.
async fn insert_parquet(
    client: &mut Client,
    args: &InsertArgs,
    schema: &CollectionSchema,
) -> anyhow::Result<(u64, u64)> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let path = &args.file;
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("reading {}", path.display()))?;
    let total = builder.metadata().file_metadata().num_rows().max(0) as u64;
    let reader = builder.with_batch_size(args.batch_rows).build()?;
    let bar = progress_bar(total, "insert {bar:40} {pos}/{len} rows {per_sec} eta {eta}");
    let (mut written, mut ts) = (0u64, 0u64);
    for batch in reader {
        let batch = batch.with_context(|| format!("reading {} after row {written}", path.display()))?;
        let batch = vectors_as_lists(schema, batch)?;
        let request = v1::WriteRequest {
            collection: args.collection.clone(),
            columns: Vec::new(),
            arrow_ipc: wire::batch_to_ipc(&batch)?,
            partition: args.partition.clone().unwrap_or_default(),
        };
        let rows = batch.num_rows() as u64;
        let what = format!("rows {}-{} of {}", written + 1, written + rows, path.display());
        let response = match send(client, request, &what, written).await {
            Ok(response) => response,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        written += rows;
        ts = ts.max(response.ts);
        bar.inc(rows);
    }
    bar.finish_and_clear();
    Ok((written, ts))
}

/// The server takes vectors as `List` or `FixedSizeList`; `LargeList`
/// columns of vector fields are cast to `List<Float32>`.
fn vectors_as_lists(schema: &CollectionSchema, batch: RecordBatch) -> anyhow::Result<RecordBatch> {
    let needs_cast = |f: &Field| {
        matches!(f.data_type(), ArrowType::LargeList(_))
            && schema.field(f.name()).is_ok_and(|(_, field)| field.data_type.is_vector())
    };
    if !batch.schema().fields().iter().any(|f| needs_cast(f)) {
        return Ok(batch);
    }
    let list = ArrowType::List(Arc::new(Field::new("item", ArrowType::Float32, true)));
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if needs_cast(field) {
            columns.push(
                arrow::compute::cast(column, &list)
                    .with_context(|| format!("field `{}`: not a float list", field.name()))?,
            );
            fields.push(Field::new(field.name(), list.clone(), true));
        } else {
            columns.push(column.clone());
            fields.push(field.as_ref().clone());
        }
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}

// ---- search ----

pub fn search(args: SearchArgs) -> anyhow::Result<()> {
    let mut queries: Vec<(String, Vec<f32>)> = Vec::new();
    for (i, text) in args.vectors.iter().enumerate() {
        let vector = parse_vector(text).map_err(|e| anyhow!("--vector #{}: {e}", i + 1))?;
        queries.push((format!("--vector #{}", i + 1), vector));
    }
    if let Some(path) = &args.vectors_file {
        let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let what = format!("{} line {}", path.display(), i + 1);
            let vector = parse_vector(&line).map_err(|e| anyhow!("{what}: {e}"))?;
            queries.push((what, vector));
        }
    }
    anyhow::ensure!(!queries.is_empty(), "no query vector: give --vector '[...]' or --vectors-file");
    let (schema, response) = with_client(&args.connect, async |client| {
        let (_, schema) = describe(client, &args.collection).await?;
        let (index, dim, _) = schema.vector_field(args.field.as_deref())?;
        let field = &schema.fields[index].name;
        for (what, vector) in &queries {
            anyhow::ensure!(vector.len() == dim, "{what}: {} numbers, but field `{field}` has dim {dim}", vector.len());
        }
        let vectors: Vec<Vec<f32>> = queries.iter().map(|(_, v)| v.clone()).collect();
        let mut fields = output_fields(&schema, &args.read.output_fields)?;
        if let Some(group) = &args.group_by
            && !fields.contains(group)
            && *group != schema.primary().name
        {
            fields.push(group.clone());
        }
        let request = v1::SearchRequest {
            collection: args.collection.clone(),
            field: args.field.clone().unwrap_or_default(),
            vectors: Some(wire::pack_vectors(&vectors)),
            k: args.k,
            ef: args.ef.unwrap_or(0),
            filter: args.read.filter.clone().unwrap_or_default(),
            output_fields: fields,
            read: Some(args.read.to_proto()),
            partitions: args.read.partitions.clone(),
            radius: args.radius,
            range_filter: args.range_filter,
            group_by: args.group_by.clone().map(|field| v1::GroupBy {
                field,
                size: args.group_size,
                strict: args.strict_group_size,
            }),
        };
        let response = client.search(request).await.map_err(rpc)?.into_inner();
        Ok((schema, response))
    })?;
    let batch = hits_batch(&schema, response)?;
    print_batches(&[batch], args.connect.json, &json_fields(&schema))
}

/// Prints a subscription's events as they arrive: each as rows with its
/// timestamp and what happened (`snapshot`, `+`, `-`, `progress`).
pub fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let connect = Connect { timeout: None, ..args.connect.clone() };
    with_client(&connect, async |client| {
        let (query, schema) = args.query.request(client).await?;
        let request = v1::SubscribeRequest { buffer: args.buffer, ..query };
        let mut stream = client.subscribe(request).await.map_err(rpc)?.into_inner();
        let mut printed = 0;
        while args.events.is_none_or(|most| printed < most) {
            let Some(event) = stream.message().await.map_err(rpc)? else { break };
            print_batches(&event_batches(&schema, event)?, args.connect.json, &json_fields(&schema))?;
            printed += 1;
        }
        Ok(())
    })
}

/// A subscription event as rows: `ts`, `change`, then the hit or row columns.
fn event_batches(schema: &CollectionSchema, event: v1::SubscribeEvent) -> anyhow::Result<Vec<RecordBatch>> {
    use v1::subscribe_event::Event;
    let ts = event.ts;
    // `batch`'s rows after `ts` and `change` columns (`None`: one row of just those).
    let marked = |batch: Option<RecordBatch>, change: &str| -> anyhow::Result<RecordBatch> {
        let rows = batch.as_ref().map_or(1, RecordBatch::num_rows);
        let mut fields = vec![
            Arc::new(Field::new("ts", ArrowType::UInt64, false)),
            Arc::new(Field::new("change", ArrowType::Utf8, false)),
        ];
        let mut columns: Vec<ArrayRef> =
            vec![Arc::new(UInt64Array::from(vec![ts; rows])), Arc::new(StringArray::from(vec![change; rows]))];
        if let Some(batch) = batch {
            fields.extend(batch.schema().fields().iter().cloned());
            columns.extend(batch.columns().iter().cloned());
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
    };
    let keys_only = |keys: &[Pk]| -> anyhow::Result<RecordBatch> {
        let field = Field::new(schema.primary().name.clone(), keys_array(keys).data_type().clone(), false);
        Ok(RecordBatch::try_new(Arc::new(Schema::new(vec![field])), vec![keys_array(keys)])?)
    };
    // A query's hits, numbered as that query.
    let hits_of = |query: u32, hits: Option<v1::SearchHits>| -> anyhow::Result<RecordBatch> {
        let mut results = vec![v1::SearchHits::default(); query as usize];
        results.push(hits.unwrap_or_default());
        hits_batch(schema, v1::SearchResponse { results, read_ts: ts })
    };
    Ok(match event.event {
        Some(Event::Snapshot(response)) => vec![marked(Some(hits_batch(schema, response)?), "snapshot")?],
        Some(Event::Changed(changed)) => {
            let mut batches = Vec::new();
            for change in changed.changes {
                batches.push(marked(Some(hits_of(change.query, change.removed)?), "-")?);
                batches.push(marked(Some(hits_of(change.query, change.added)?), "+")?);
            }
            batches.retain(|b| b.num_rows() > 0);
            batches
        }
        Some(Event::Rows(rows)) => {
            let mut batches = Vec::new();
            if !rows.upserted.is_empty() {
                batches.push(marked(Some(wire::columns_to_batch(rows.upserted)?), "+")?);
            }
            let deleted = wire::pks_from_proto(rows.deleted)?;
            if !deleted.is_empty() {
                batches.push(marked(Some(keys_only(&deleted)?), "-")?);
            }
            batches
        }
        Some(Event::Progress(_)) | None => vec![marked(None, "progress")?],
    })
}

pub fn hybrid_search(args: HybridSearchArgs) -> anyhow::Result<()> {
    let mut searches = Vec::with_capacity(args.searches.len());
    for (i, text) in args.searches.iter().enumerate() {
        let what = format!("--search #{}", i + 1);
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| anyhow!("{what}: not JSON: {e}"))?;
        let object = json.as_object().ok_or_else(|| anyhow!("{what}: expected a JSON object"))?;
        let text_of = |key: &str| object.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let float_of = |key: &str| -> anyhow::Result<Option<f32>> {
            object
                .get(key)
                .map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| anyhow!("{what}: `{key}` is not a number")))
                .transpose()
        };
        let vector = object.get("vector").ok_or_else(|| anyhow!("{what}: `vector` is missing"))?;
        let vector = parse_vector(&vector.to_string()).map_err(|e| anyhow!("{what}: `vector`: {e}"))?;
        let k = object
            .get("k")
            .and_then(|k| k.as_u64())
            .ok_or_else(|| anyhow!("{what}: `k` (a positive integer) is missing"))?;
        let ef = object
            .get("ef")
            .map(|v| v.as_u64().ok_or_else(|| anyhow!("{what}: `ef` is not an integer")))
            .transpose()?;
        searches.push(v1::SubSearch {
            field: text_of("field").unwrap_or_default(),
            vectors: Some(wire::pack_vectors(&[vector])),
            k: u32::try_from(k).map_err(|_| anyhow!("{what}: `k` {k} is too large"))?,
            ef: ef.map_or(Ok(0), u32::try_from).map_err(|_| anyhow!("{what}: `ef` is too large"))?,
            filter: text_of("filter").or_else(|| args.read.filter.clone()).unwrap_or_default(),
            radius: float_of("radius")?,
            range_filter: float_of("range_filter")?,
        });
    }
    let ranker = if args.weights.is_empty() {
        v1::hybrid_search_request::Ranker::Rrf(v1::RrfRanker { k: args.rrf.unwrap_or(60.0) })
    } else {
        v1::hybrid_search_request::Ranker::Weighted(v1::WeightedRanker {
            weights: args.weights.clone(),
            raw_scores: args.raw_scores,
        })
    };
    let (schema, response) = with_client(&args.connect, async |client| {
        let (_, schema) = describe(client, &args.collection).await?;
        let request = v1::HybridSearchRequest {
            collection: args.collection.clone(),
            searches,
            ranker: Some(ranker),
            k: args.k,
            output_fields: output_fields(&schema, &args.read.output_fields)?,
            read: Some(args.read.to_proto()),
            partitions: args.read.partitions.clone(),
        };
        let response = client.hybrid_search(request).await.map_err(rpc)?.into_inner();
        Ok((schema, response))
    })?;
    let batch = hits_batch(&schema, response)?;
    print_batches(&[batch], args.connect.json, &json_fields(&schema))
}

fn parse_vector(text: &str) -> anyhow::Result<Vec<f32>> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| anyhow!("not JSON: {e}"))?;
    let serde_json::Value::Array(items) = json else { bail!("expected a JSON array of numbers") };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| x.as_f64().map(|f| f as f32).ok_or_else(|| anyhow!("element {i} ({x}) is not a number")))
        .collect()
}

/// The requested output fields: `*` is every field; the primary key is
/// always shown, so it is not asked for again.
fn output_fields(schema: &CollectionSchema, requested: &[String]) -> anyhow::Result<Vec<String>> {
    let primary = &schema.primary().name;
    let mut fields: Vec<String> = Vec::new();
    for name in requested.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if name == "*" {
            fields.extend(schema.fields.iter().map(|f| f.name.clone()));
        } else {
            schema.field(name)?;
            fields.push(name.to_string());
        }
    }
    let mut seen = HashSet::new();
    fields.retain(|f| f != primary && seen.insert(f.clone()));
    Ok(fields)
}

fn json_fields(schema: &CollectionSchema) -> HashSet<String> {
    schema.fields.iter().filter(|f| f.data_type == DataType::Json).map(|f| f.name.clone()).collect()
}

/// A name for a column the client adds (`query`, `score`) that no output field has.
fn free_name(base: &str, taken: &[String]) -> String {
    let mut name = base.to_string();
    while taken.contains(&name) {
        name.insert(0, '_');
    }
    name
}

/// Every hit of every query as one batch: query number, primary key, score, output fields.
fn hits_batch(schema: &CollectionSchema, response: v1::SearchResponse) -> anyhow::Result<RecordBatch> {
    let mut query = Vec::new();
    let mut keys = Vec::new();
    let mut scores = Vec::new();
    let mut parts = Vec::new();
    for (q, hits) in response.results.into_iter().enumerate() {
        let pks = match hits.keys {
            Some(k) => wire::pks_from_proto(Some(k))?,
            None => Vec::new(),
        };
        anyhow::ensure!(
            pks.len() == hits.scores.len(),
            "the server sent {} keys and {} scores for query {q}",
            pks.len(),
            hits.scores.len()
        );
        query.extend(std::iter::repeat_n(q as u32, pks.len()));
        keys.extend(pks);
        scores.extend(hits.scores);
        if !hits.fields.is_empty() {
            parts.push(wire::columns_to_batch(hits.fields)?);
        }
    }
    let fields = match parts.first() {
        Some(first) => Some(arrow::compute::concat_batches(&first.schema(), &parts)?),
        None => None,
    };
    let taken: Vec<String> =
        fields.as_ref().map(|b| b.schema().fields().iter().map(|f| f.name().clone()).collect()).unwrap_or_default();
    let primary = schema.primary().name.clone();
    let mut columns: Vec<(String, ArrayRef)> = vec![
        (free_name("query", &taken), Arc::new(UInt32Array::from(query))),
        (primary, keys_array(&keys)),
        (free_name("score", &taken), Arc::new(Float32Array::from(scores))),
    ];
    if let Some(fields) = fields {
        anyhow::ensure!(
            fields.num_rows() == keys.len(),
            "the server sent output fields for {} of {} hits",
            fields.num_rows(),
            keys.len()
        );
        for (field, column) in fields.schema().fields().iter().zip(fields.columns()) {
            columns.push((field.name().clone(), column.clone()));
        }
    }
    named_batch(columns)
}

fn keys_array(keys: &[Pk]) -> ArrayRef {
    if keys.iter().all(|k| matches!(k, Pk::Int(_))) {
        Arc::new(Int64Array::from_iter_values(keys.iter().map(|k| if let Pk::Int(v) = k { *v } else { 0 })))
    } else {
        Arc::new(StringArray::from_iter_values(keys.iter().map(|k| match k {
            Pk::Int(v) => v.to_string(),
            Pk::Str(s) => s.clone(),
        })))
    }
}

fn named_batch(columns: Vec<(String, ArrayRef)>) -> anyhow::Result<RecordBatch> {
    let schema =
        Schema::new(columns.iter().map(|(name, c)| Field::new(name, c.data_type().clone(), true)).collect::<Vec<_>>());
    Ok(RecordBatch::try_new(Arc::new(schema), columns.into_iter().map(|(_, c)| c).collect())?)
}

// ---- query ----

pub fn query(args: QueryArgs) -> anyhow::Result<()> {
    let (schema, response) = with_client(&args.connect, async |client| {
        let (_, schema) = describe(client, &args.collection).await?;
        let request = v1::QueryRequest {
            collection: args.collection.clone(),
            filter: args.read.filter.clone().unwrap_or_default(),
            output_fields: output_fields(&schema, &args.read.output_fields)?,
            limit: args.limit.unwrap_or(0),
            offset: args.offset,
            read: Some(args.read.to_proto()),
            count_only: args.count,
            partitions: args.read.partitions.clone(),
        };
        let response = client.query(request).await.map_err(rpc)?.into_inner();
        Ok((schema, response))
    })?;
    if args.count {
        let batch = named_batch(vec![("count".to_string(), Arc::new(UInt64Array::from(vec![response.count])))])?;
        return print_batches(&[batch], args.connect.json, &HashSet::new());
    }
    let batch = if response.columns.is_empty() {
        named_batch(vec![(schema.primary().name.clone(), keys_array(&[]))])?
    } else {
        wire::columns_to_batch(response.columns)?
    };
    print_batches(&[batch], args.connect.json, &json_fields(&schema))
}

// ---- sql ----

/// Runs one statement on the server (the `Sql` stream of Arrow IPC batches) and prints it.
pub fn sql(
    addr: &str,
    query: &str,
    json: bool,
    timeout_secs: Option<f64>,
    credentials: Credentials,
) -> anyhow::Result<()> {
    let connect = Connect { addr: addr.to_string(), json, timeout: timeout_secs, credentials };
    let batches = with_client(&connect, async |client| {
        let mut stream = client.sql(v1::SqlRequest { query: query.to_string() }).await.map_err(rpc)?.into_inner();
        let mut batches = Vec::new();
        while let Some(message) = stream.message().await.map_err(rpc)? {
            batches.push(wire::ipc_to_batch(&message.arrow_ipc)?);
        }
        Ok(batches)
    })?;
    print_batches(&batches, json, &HashSet::new())
}

// ---- output ----

/// Prints batches as one pretty table, or as JSON lines (one object per row,
/// columns in order; the text of `json_fields` is embedded as JSON).
pub fn print_batches(batches: &[RecordBatch], json: bool, json_fields: &HashSet<String>) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if json {
        for batch in batches {
            write_json_lines(&mut out, batch, json_fields)?;
        }
    } else {
        let shown = batches.iter().map(abbreviate_lists).collect::<anyhow::Result<Vec<_>>>()?;
        writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(&shown)?)?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        writeln!(out, "{rows} row{}", if rows == 1 { "" } else { "s" })?;
    }
    out.flush()?;
    Ok(())
}

fn write_json_lines(out: &mut impl Write, batch: &RecordBatch, json_fields: &HashSet<String>) -> anyhow::Result<()> {
    let schema = batch.schema();
    let names: Vec<String> =
        schema.fields().iter().map(|f| serde_json::to_string(f.name())).collect::<Result<_, _>>()?;
    for row in 0..batch.num_rows() {
        let mut line = String::from("{");
        for (i, (field, column)) in schema.fields().iter().zip(batch.columns()).enumerate() {
            if i > 0 {
                line.push(',');
            }
            let mut value = cell_json(column.as_ref(), row);
            if json_fields.contains(field.name())
                && let Some(parsed) = value.as_str().and_then(|s| serde_json::from_str(s).ok())
            {
                value = parsed;
            }
            line.push_str(&names[i]);
            line.push(':');
            line.push_str(&value.to_string());
        }
        line.push('}');
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// An f32 as the JSON number it prints as (0.1, not 0.10000000149011612).
fn f32_json(x: f32) -> serde_json::Value {
    if !x.is_finite() {
        return serde_json::Value::Null;
    }
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn f64_json(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// One cell as JSON: numbers, strings, booleans, lists as arrays; other
/// types as their display text.
fn cell_json(array: &dyn Array, row: usize) -> serde_json::Value {
    use serde_json::Value as J;
    if array.is_null(row) {
        return J::Null;
    }
    let list = |values: ArrayRef| J::Array((0..values.len()).map(|i| cell_json(values.as_ref(), i)).collect());
    match array.data_type() {
        ArrowType::Boolean => J::Bool(array.as_boolean().value(row)),
        ArrowType::Int8 => array.as_primitive::<adt::Int8Type>().value(row).into(),
        ArrowType::Int16 => array.as_primitive::<adt::Int16Type>().value(row).into(),
        ArrowType::Int32 => array.as_primitive::<adt::Int32Type>().value(row).into(),
        ArrowType::Int64 => array.as_primitive::<adt::Int64Type>().value(row).into(),
        ArrowType::UInt8 => array.as_primitive::<adt::UInt8Type>().value(row).into(),
        ArrowType::UInt16 => array.as_primitive::<adt::UInt16Type>().value(row).into(),
        ArrowType::UInt32 => array.as_primitive::<adt::UInt32Type>().value(row).into(),
        ArrowType::UInt64 => array.as_primitive::<adt::UInt64Type>().value(row).into(),
        ArrowType::Float32 => f32_json(array.as_primitive::<adt::Float32Type>().value(row)),
        ArrowType::Float64 => f64_json(array.as_primitive::<adt::Float64Type>().value(row)),
        ArrowType::Utf8 => array.as_string::<i32>().value(row).into(),
        ArrowType::LargeUtf8 => array.as_string::<i64>().value(row).into(),
        ArrowType::Utf8View => array.as_string_view().value(row).into(),
        ArrowType::FixedSizeList(..) => list(array.as_fixed_size_list().value(row)),
        ArrowType::List(_) => list(array.as_list::<i32>().value(row)),
        ArrowType::LargeList(_) => list(array.as_list::<i64>().value(row)),
        _ => {
            let options = arrow::util::display::FormatOptions::default();
            match arrow::util::display::ArrayFormatter::try_new(array, &options) {
                Ok(formatter) => J::String(formatter.value(row).to_string()),
                Err(_) => J::Null,
            }
        }
    }
}

/// Lists longer than this print as their first elements and a count.
const SHOWN_LIST_ITEMS: usize = 8;

/// For tables: list columns (vectors) as short text, `[0.1, 0.2, … 384 floats]`.
fn abbreviate_lists(batch: &RecordBatch) -> anyhow::Result<RecordBatch> {
    let is_list =
        |t: &ArrowType| matches!(t, ArrowType::FixedSizeList(..) | ArrowType::List(_) | ArrowType::LargeList(_));
    if !batch.schema().fields().iter().any(|f| is_list(f.data_type())) {
        return Ok(batch.clone());
    }
    let mut columns = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let column: ArrayRef = if is_list(field.data_type()) {
            Arc::new(StringArray::from_iter((0..column.len()).map(|row| match cell_json(column.as_ref(), row) {
                serde_json::Value::Array(items) => {
                    let shown: Vec<String> = items.iter().take(SHOWN_LIST_ITEMS).map(|x| x.to_string()).collect();
                    Some(if items.len() > SHOWN_LIST_ITEMS {
                        format!("[{}, … {} items]", shown[..4.min(shown.len())].join(", "), items.len())
                    } else {
                        format!("[{}]", shown.join(", "))
                    })
                }
                serde_json::Value::Null => None,
                other => Some(other.to_string()),
            })))
        } else {
            column.clone()
        };
        columns.push((field.name().clone(), column));
    }
    named_batch(columns)
}
