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
    }
    Ok(())
}
