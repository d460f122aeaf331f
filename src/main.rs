//! The `vectorflow` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vectorflow::crates::connectors::synth::{self, SynthSpec};

mod admission;
mod auth;
mod bench;
mod bench_cluster;
mod bench_features;
mod bench_kafka;
mod bench_recovery;
mod bench_sink;
mod bench_soak;
mod bench_subscribe;
mod bench_tenants;
mod client;
mod cluster_local;
mod config;
mod metrics;
mod milvus;
mod observe;
mod plot;
mod ready_service;
mod server;

#[derive(Parser)]
#[command(name = "vectorflow", version, about = "A streaming vector database on timely/differential dataflow")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the first rows of a dataset folder as a smaller dataset folder (no ground truth).
    Sample {
        /// A dataset folder in the layout of shared/datasets/README.md.
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
        #[arg(long, default_value_t = 2000)]
        rows: usize,
        #[arg(long, default_value_t = 100)]
        queries: usize,
    },
    /// Make dataset folders in the layout of shared/datasets/README.md.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Benchmark ingest, search (against raw HNSW and brute force), freshness, time travel and memory;
    /// `bench soak`: a long mixed load against a server.
    Bench(bench::BenchCommand),
    /// Benchmark restarts: full log replay vs recovery from a checkpoint vs rebuilding indexes; bytes stored per vector.
    BenchRecovery(bench_recovery::RecoveryArgs),
    /// Kafka ingestion against a running broker: rows/s to searchable, produce-to-visible latency, overload.
    BenchKafka(bench_kafka::KafkaBenchArgs),
    /// Clusters of 1, 2 and 3 processes on loopback against a running broker: ingest rows/s,
    /// search QPS and recall, cross-process write-to-visible, and the time a cluster takes to recover.
    BenchCluster(bench_cluster::ClusterBenchArgs),
    /// Standing queries under a steady write load: write-to-subscriber latency, and the CPU and
    /// ingest rate with and without the subscriptions.
    BenchSubscribe(bench_subscribe::SubscribeBenchArgs),
    /// Kafka sinks under a steady write load on a running broker: write-to-topic latency, the sink's
    /// records/s, and the ingest rate and CPU with and without them.
    BenchSink(bench_sink::SinkBenchArgs),
    /// Run the gRPC server (embedded engine, data in --data-dir; 127.0.0.1:19530 by default).
    Serve(config::ServeArgs),
    /// Run several servers as one cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// List the collections in a data directory.
    Collections {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Run one SQL statement (in a data directory, or on a server with --addr) and print the result as a table.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["data_dir", "addr"])))]
    Sql {
        /// Open this data directory in this process.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Run the statement on a server instead: http://host:port or host:port.
        #[arg(long)]
        addr: Option<String>,
        /// Print JSON lines (one object per row) instead of a table.
        #[arg(long)]
        json: bool,
        /// Deadline of the call in seconds (with --addr; none by default).
        #[arg(long, requires = "addr")]
        timeout: Option<f64>,
        /// The statement, for example "SELECT id FROM docs ORDER BY cosine_distance(embedding, [..]) LIMIT 5".
        query: String,
        #[command(flatten)]
        credentials: client::Credentials,
    },
    /// Read a password from stdin and print its argon2 PHC string, for `password_hash` in `[[auth.users]]`.
    HashPassword {
        /// Read a bearer token instead and print its SHA-256 hex, for `token_hash` in `[[auth.tokens]]`.
        #[arg(long)]
        token: bool,
    },
    /// Create, list, describe or drop collections on a server (gRPC).
    #[command(subcommand)]
    Collection(client::CollectionCommand),
    /// Create, alter, describe, list or drop collection aliases on a server (gRPC).
    #[command(subcommand)]
    Alias(client::AliasCommand),
    /// Create, drop or list a collection's partitions on a server (gRPC).
    #[command(subcommand)]
    Partition(client::PartitionCommand),
    /// Insert rows from a JSON lines or Parquet file into a collection on a server.
    Insert(client::InsertArgs),
    /// Search a collection on a server for the nearest neighbours of query vectors.
    Search(client::SearchArgs),
    /// Subscribe to a standing query on a server: its answer, then every change as it happens
    /// (a search with --vector, or a changefeed of the rows --filter passes).
    Subscribe(client::SubscribeArgs),
    /// Create, list or drop Kafka sinks on a server: standing queries whose changes the server
    /// writes to a topic, exactly once, also across restarts.
    #[command(subcommand)]
    Sink(client::SinkCommand),
    /// Run several searches (one per vector field, say) at one timestamp and
    /// fuse their hits with reciprocal rank fusion or weights.
    HybridSearch(client::HybridSearchArgs),
    /// Query rows of a collection on a server by filter (or count them).
    Query(client::QueryArgs),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Start a cluster of `serve` processes on loopback (development and
    /// tests) and restart it whenever one of them exits; SIGINT/SIGTERM stops it.
    Local(cluster_local::LocalClusterArgs),
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Write a synthetic dataset: clustered unit vectors (COSINE, stored as f16), int32 attributes
    /// `cluster`, `month` and `rank` with filters passing ~10 % and 1 % of the rows, and exact
    /// ground truths `unfiltered`, `filter10` and `filter1`. The same seed writes the same files.
    Synth {
        /// Base rows.
        #[arg(long)]
        rows: usize,
        /// Dimensions of the vectors.
        #[arg(long)]
        dim: usize,
        /// The dataset folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = SynthSpec::DEFAULT_QUERIES)]
        queries: usize,
        /// Neighbours listed per query in each ground truth.
        #[arg(long, default_value_t = SynthSpec::DEFAULT_K)]
        k: usize,
        /// Cluster centres the vectors are drawn around.
        #[arg(long, default_value_t = SynthSpec::DEFAULT_CLUSTERS)]
        clusters: usize,
        /// Spread each cluster in a subspace of this many dimensions of its own (plus 10 %
        /// isotropic noise) instead of all of them: real embeddings are of low local intrinsic
        /// dimension (pypi-100k measures about 22), isotropic noise in 128 dimensions about 47,
        /// and 24 here about 19. A graph index's cost at a fixed recall grows far faster with the
        /// rows on the isotropic data.
        #[arg(long)]
        latent_dim: Option<usize>,
        #[arg(long, default_value_t = SynthSpec::DEFAULT_SEED)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let server_config = match &cli.command {
        Command::Serve(args) => Some(config::ServerConfig::load(args)?),
        _ => None,
    };
    let default_log = server_config.as_ref().map_or("warn", |c| c.log_filter.as_str());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_log.into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Sample { from, to, rows, queries } => {
            let dataset = vectorflow::Dataset::open(&from).with_context(|| format!("opening {}", from.display()))?;
            let sample = dataset.write_sample(&to, rows, queries)?;
            println!("wrote {} rows and {} queries to {}", sample.info.n_base, sample.info.n_queries, to.display());
        }
        Command::Dataset(DatasetCommand::Synth { rows, dim, out, queries, k, clusters, latent_dim, seed }) => {
            let started = std::time::Instant::now();
            let spec = SynthSpec { rows, dim, queries, k, clusters, latent_dim, seed };
            let dataset = synth::synthesize(&out, &spec).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {rows} rows x {dim} dims and {queries} queries (k = {k}) to {} in {:.1}s",
                out.display(),
                started.elapsed().as_secs_f64()
            );
            for (name, info) in &dataset.info.ground_truth {
                let passing = info.passing_rows.unwrap_or(rows);
                let expression = info.expression.as_deref().unwrap_or("(no filter)");
                println!(
                    "  {name:<10} {expression:<28} {passing} rows ({:.2} %)",
                    100.0 * passing as f64 / rows as f64
                );
            }
        }
        Command::Bench(bench::BenchCommand { kind: Some(bench::BenchKind::Soak(args)), .. }) => bench_soak::run(args)?,
        Command::Bench(bench::BenchCommand { search, .. }) => bench::run(search)?,
        Command::BenchRecovery(args) => bench_recovery::run(args)?,
        Command::BenchKafka(args) => bench_kafka::run(args)?,
        Command::BenchCluster(args) => bench_cluster::run(args)?,
        Command::BenchSubscribe(args) => bench_subscribe::run(args)?,
        Command::BenchSink(args) => bench_sink::run(args)?,
        Command::Serve(_) => {
            let config = server_config.ok_or_else(|| anyhow::anyhow!("server configuration missing"))?;
            tokio::runtime::Runtime::new()?.block_on(server::serve(config))?;
        }
        Command::Cluster(ClusterCommand::Local(args)) => cluster_local::run(args)?,
        Command::Collections { data_dir } => {
            let engine = vectorflow::Engine::open(vectorflow::EngineConfig::new(data_dir))?;
            for name in engine.list_collections() {
                let info = engine.describe_collection(&name)?;
                let stats = engine.stats(&name, vectorflow::Consistency::Strong)?;
                println!("{name}\tid={}\tlive_rows={}\tfields={}", info.id, stats.live_rows, info.schema.fields.len());
            }
            engine.shutdown();
        }
        Command::Sql { data_dir, addr, json, timeout, query, credentials } => {
            client::exit_on_error(match (data_dir, addr) {
                (_, Some(addr)) => client::sql(&addr, &query, json, timeout, credentials),
                (Some(data_dir), None) => (|| {
                    let engine = vectorflow::Engine::open(vectorflow::EngineConfig::new(data_dir))?;
                    let result = run_sql(&engine, &query);
                    engine.shutdown();
                    client::print_batches(&result?, json, &Default::default())
                })(),
                (None, None) => Err(anyhow::anyhow!("give --data-dir DIR or --addr HOST:PORT")),
            })
        }
        Command::Collection(command) => client::exit_on_error(client::collection(command)),
        Command::Alias(command) => client::exit_on_error(client::alias(command)),
        Command::Partition(command) => client::exit_on_error(client::partition(command)),
        Command::Insert(args) => client::exit_on_error(client::insert(args)),
        Command::Search(args) => client::exit_on_error(client::search(args)),
        Command::Subscribe(args) => client::exit_on_error(client::subscribe(args)),
        Command::Sink(command) => client::exit_on_error(client::sink(command)),
        Command::HybridSearch(args) => client::exit_on_error(client::hybrid_search(args)),
        Command::Query(args) => client::exit_on_error(client::query(args)),
        Command::HashPassword { token } => client::exit_on_error(hash_password(token)),
    }
    Ok(())
}

/// `vectorflow hash-password`: the secret comes on stdin, never as an
/// argument, so it stays out of the shell history and the process list.
fn hash_password(token: bool) -> anyhow::Result<()> {
    let mut secret = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut secret).context("reading the secret from stdin")?;
    // `echo pw | vectorflow hash-password`: the line break is not part of it.
    let secret = secret.strip_suffix('\n').unwrap_or(&secret);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() {
        anyhow::bail!("no {} on stdin", if token { "token" } else { "password" });
    }
    if token {
        println!("{}", auth::hash_token(secret));
    } else {
        println!("{}", auth::hash_password(secret)?);
    }
    Ok(())
}

/// Runs `query` in a SQL session over `engine` and returns the result's batches.
fn run_sql(engine: &vectorflow::Engine, query: &str) -> anyhow::Result<Vec<arrow::record_batch::RecordBatch>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let session = vectorflow::SqlSession::new(engine.clone())?;
    Ok(runtime.block_on(session.collect(query))?)
}
