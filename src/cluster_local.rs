//! `vectorflow cluster local`: a cluster of `serve` processes on loopback,
//! for development and tests, kept running like a supervisor would.
//!
//! timely has no partial failure: when one process dies the others' exchange
//! connections break and they exit too (see `server::DATAFLOW_STOPPED_EXIT`).
//! So this launcher restarts the whole cluster whenever a process exits
//! unasked, and the processes recover from the shared object store's
//! checkpoint and the Kafka topics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

#[derive(Debug, Clone, clap::Args)]
pub struct LocalClusterArgs {
    /// Processes to start.
    #[arg(long, default_value_t = 3)]
    pub processes: usize,
    /// Dataflow workers per process.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Kafka bootstrap servers: a cluster's processes share their log.
    #[arg(long)]
    pub kafka: String,
    /// Holds `cluster.toml` and each process's data directory (`process-I`).
    #[arg(long, default_value = "./vectorflow-cluster")]
    pub data_dir: PathBuf,
    /// The object store every process shares [default: file://DATA_DIR/store].
    #[arg(long)]
    pub storage: Option<String>,
    /// gRPC port of process 0; process I listens on this port + I.
    #[arg(long, default_value_t = 19530)]
    pub grpc_port: u16,
    /// Exchange port of process 0; process I listens on this port + I.
    #[arg(long, default_value_t = 2101)]
    pub exchange_port: u16,
    /// Restarts of the cluster after a process exits, at most (then the launcher exits with an error).
    #[arg(long, default_value_t = 20)]
    pub max_restarts: usize,
    /// Further `serve` flags for every process, after `--` (e.g. `-- --checkpoint-interval-ms 5000`).
    #[arg(last = true)]
    pub serve_args: Vec<String>,
}

/// How long stopping processes get before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

pub fn run(args: LocalClusterArgs) -> anyhow::Result<()> {
    if args.processes == 0 || args.workers == 0 {
        bail!("--processes and --workers must be at least 1");
    }
    let last = |base: u16, what: &str| {
        base.checked_add(args.processes as u16 - 1)
            .with_context(|| format!("--{what} {base} + {} processes passes port 65535", args.processes))
    };
    last(args.grpc_port, "grpc-port")?;
    last(args.exchange_port, "exchange-port")?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let cluster_file = data_dir.join("cluster.toml");
    let processes: Vec<String> =
        (0..args.processes).map(|i| format!("\"127.0.0.1:{}\"", args.exchange_port + i as u16)).collect();
    std::fs::write(
        &cluster_file,
        format!(
            "# Written by `vectorflow cluster local`: the exchange address of every process, in process order.\n\
             processes = [{}]\n",
            processes.join(", ")
        ),
    )?;
    let storage = args.storage.clone().unwrap_or_else(|| format!("file://{}", data_dir.join("store").display()));
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(stop.clone())?;
    let mut restarts = 0;
    loop {
        let mut children = Vec::with_capacity(args.processes);
        for process in 0..args.processes {
            children.push(start(&args, &data_dir, &cluster_file, &storage, process)?);
        }
        for process in 0..args.processes {
            println!("cluster process {process}: gRPC 127.0.0.1:{}", args.grpc_port + process as u16);
        }
        let exited = supervise(&mut children, &stop);
        stop_all(&mut children);
        match exited {
            None => return Ok(()),
            Some((process, status)) => {
                restarts += 1;
                if restarts > args.max_restarts {
                    bail!("process {process} exited ({status}); {} restarts, giving up", args.max_restarts);
                }
                let pause = Duration::from_millis(500 * restarts.min(10) as u64);
                eprintln!("cluster process {process} exited ({status}): restarting the cluster in {pause:?}");
                std::thread::sleep(pause);
            }
        }
    }
}

fn start(
    args: &LocalClusterArgs,
    data_dir: &Path,
    cluster_file: &Path,
    storage: &str,
    process: usize,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the vectorflow binary")?;
    Command::new(exe)
        .arg("serve")
        .arg("--cluster")
        .arg(cluster_file)
        .args(["--process", &process.to_string(), "--workers", &args.workers.to_string()])
        .arg("--data-dir")
        .arg(data_dir.join(format!("process-{process}")))
        .args(["--listen", &format!("127.0.0.1:{}", args.grpc_port + process as u16)])
        .args(["--kafka", &args.kafka, "--storage", storage])
        .args(&args.serve_args)
        .spawn()
        .with_context(|| format!("starting cluster process {process}"))
}

/// Waits until a process exits (its index and status) or a stop is asked (`None`).
fn supervise(children: &mut [Child], stop: &AtomicBool) -> Option<(usize, String)> {
    loop {
        if stop.load(Ordering::Acquire) {
            return None;
        }
        for (process, child) in children.iter_mut().enumerate() {
            match child.try_wait() {
                Ok(Some(status)) => return Some((process, status.to_string())),
                Ok(None) => {}
                Err(e) => return Some((process, format!("cannot be waited for: {e}"))),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asks every process still running to stop (SIGTERM), and kills those
/// that have not within [`STOP_GRACE`].
fn stop_all(children: &mut [Child]) {
    for child in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            terminate(child);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for child in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

fn terminate(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else { return };
    // SAFETY: `kill` only sends a signal; the pid is our own child's, which
    // has not been waited for, so it names no other process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Sets `stop` on SIGINT or SIGTERM.
fn watch_signals(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        runtime.block_on(async {
            let interrupt = tokio::signal::ctrl_c();
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut terminate) => {
                    tokio::select! {
                        _ = interrupt => {}
                        _ = terminate.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = interrupt.await;
                }
            }
        });
        stop.store(true, Ordering::Release);
    })?;
    Ok(())
}
