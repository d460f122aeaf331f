//! The `vectorflow` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod bench;
mod plot;

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
    /// Benchmark ingest, search (against raw HNSW and brute force), freshness, time travel and memory.
    Bench(bench::BenchArgs),
    /// List the collections in a data directory.
    Collections {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Run one SQL statement over the collections in a data directory and print the result as a table.
    Sql {
        #[arg(long)]
        data_dir: PathBuf,
        /// The statement, for example "SELECT id FROM docs ORDER BY cosine_distance(embedding, [..]) LIMIT 5".
        query: String,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match Cli::parse().command {
        Command::Sample { from, to, rows, queries } => {
            let dataset = vectorflow::Dataset::open(&from).with_context(|| format!("opening {}", from.display()))?;
            let sample = dataset.write_sample(&to, rows, queries)?;
            println!("wrote {} rows and {} queries to {}", sample.info.n_base, sample.info.n_queries, to.display());
        }
        Command::Bench(args) => bench::run(args)?,
        Command::Collections { data_dir } => {
            let engine = vectorflow::Engine::open(vectorflow::EngineConfig::new(data_dir))?;
            for name in engine.list_collections() {
                let info = engine.describe_collection(&name)?;
                let stats = engine.stats(&name, vectorflow::Consistency::Strong)?;
                println!("{name}\tid={}\tlive_rows={}\tfields={}", info.id, stats.live_rows, info.schema.fields.len());
            }
            engine.shutdown();
        }
        Command::Sql { data_dir, query } => {
            let engine = vectorflow::Engine::open(vectorflow::EngineConfig::new(data_dir))?;
            let result = run_sql(&engine, &query);
            engine.shutdown();
            println!("{}", result?);
        }
    }
    Ok(())
}

/// Runs `query` in a SQL session over `engine` and formats the rows as a table.
fn run_sql(engine: &vectorflow::Engine, query: &str) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Runtime::new()?;
    let session = vectorflow::SqlSession::new(engine.clone())?;
    let batches = runtime.block_on(session.collect(query))?;
    Ok(arrow::util::pretty::pretty_format_batches(&batches)?.to_string())
}
