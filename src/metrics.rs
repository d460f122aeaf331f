//! Prometheus metrics on a port of their own (`metrics_listen`, plain HTTP,
//! `GET /metrics` in the text exposition format).
//!
//! Calls are counted as they finish (by the [`crate::observe`] layer); the
//! engine's state (ingest, frontier lag, segments, index and merge builds,
//! checkpoints, Kafka lag) is read when Prometheus scrapes. With `[auth]`
//! on, a scrape must present the same `authorization` a gRPC call does
//! (Prometheus `basic_auth` or `authorization: Bearer`), any role. The port
//! is plain HTTP, so beyond loopback it needs `insecure` even with `[auth]`
//! (credentials would cross the network in clear).

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use vectorflow::{Consistency, Engine};

use crate::auth::Authenticator;

/// Every metric the server exports.
pub struct Metrics {
    /// One scrape at a time: a refresh moves counters by what the engine
    /// added since the last one, and resets the per-collection series.
    scraping: std::sync::Mutex<()>,
    registry: Registry,
    engine: Engine,
    calls: IntCounterVec,
    latency: HistogramVec,
    /// Engine counters are read as totals; exported as counters, they only
    /// ever go up (see [`set_counter`]).
    counters: IntCounterVec,
    gauges: GaugeVec,
    collections: IntGauge,
    failed_collections: IntGauge,
    per_collection: IntGaugeVec,
    segments: IntGaugeVec,
    kafka_lag: IntGaugeVec,
    dead_letters: IntGaugeVec,
}

/// Latency buckets from 0.5 ms to 60 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Collections a scrape reports one by one at most (each is a dataflow read).
const MAX_COLLECTIONS_PER_SCRAPE: usize = 256;
/// How long a scrape waits for one collection's figures (a wedged
/// dataflow must not hold the scrape; the frontier figures still report it).
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

impl Metrics {
    pub fn new(engine: Engine) -> prometheus::Result<Arc<Metrics>> {
        let registry = Registry::new();
        let calls = IntCounterVec::new(
            Opts::new("vectorflow_grpc_requests_total", "gRPC calls finished, by method and status code"),
            &["method", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "vectorflow_grpc_request_duration_seconds",
                "Time to answer a gRPC call (a stream: to its first message), by method and status code",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method", "code"],
        )?;
        let counters = IntCounterVec::new(
            Opts::new(
                "vectorflow_engine_total",
                "Engine totals since start: rows_ingested, records_ingested, reads_cancelled, \
                 checkpoints, checkpoint_microseconds, frontier_stall_reports, writes_held, writes_refused",
            ),
            &["what"],
        )?;
        let gauges = GaugeVec::new(
            Opts::new(
                "vectorflow_engine",
                "Engine state: visible_lag_seconds (newest write time minus what reads see), \
                 frontier_stalled_seconds, rows_in_flight, index_backlog_rows, last_checkpoint_seconds",
            ),
            &["what"],
        )?;
        let collections = IntGauge::new("vectorflow_collections", "Collections in the catalog")?;
        let failed_collections =
            IntGauge::new("vectorflow_collections_failed", "Collections stopped by an error applying a change")?;
        let per_collection = IntGaugeVec::new(
            Opts::new(
                "vectorflow_collection",
                "Per collection: live_rows, growing_rows, index_builds (sealed segments without their index yet), \
                 merge_builds (shards with a merge building or due), index_bytes",
            ),
            &["collection", "what"],
        )?;
        let segments = IntGaugeVec::new(
            Opts::new("vectorflow_segments", "Sealed segments per collection, and how many have their index"),
            &["collection", "state"],
        )?;
        let kafka_lag = IntGaugeVec::new(
            Opts::new("vectorflow_kafka_lag_records", "Records in a Kafka partition not yet read"),
            &["collection", "partition"],
        )?;
        let dead_letters = IntGaugeVec::new(
            Opts::new("vectorflow_kafka_dead_letters", "Records sent to the dead-letter topic since start"),
            &["collection"],
        )?;
        for metric in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(counters.clone()),
            Box::new(gauges.clone()),
            Box::new(collections.clone()),
            Box::new(failed_collections.clone()),
            Box::new(per_collection.clone()),
            Box::new(segments.clone()),
            Box::new(kafka_lag.clone()),
            Box::new(dead_letters.clone()),
        ] {
            registry.register(metric)?;
        }
        Ok(Arc::new(Metrics {
            scraping: std::sync::Mutex::new(()),
            registry,
            engine,
            calls,
            latency,
            counters,
            gauges,
            collections,
            failed_collections,
            per_collection,
            segments,
            kafka_lag,
            dead_letters,
        }))
    }

    /// Counts one finished call.
    pub fn observe_call(&self, method: &str, code: &str, elapsed: Duration) {
        self.calls.with_label_values(&[method, code]).inc();
        self.latency.with_label_values(&[method, code]).observe(elapsed.as_secs_f64());
    }

    /// Reads the engine's state and renders every metric. Blocking: the
    /// per-collection figures are dataflow reads.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let _one_scrape_at_a_time =
            self.scraping.lock().map_err(|_| prometheus::Error::Msg("a scrape panicked".into()))?;
        self.refresh();
        let mut text = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut text)?;
        String::from_utf8(text).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }

    fn refresh(&self) {
        let health = self.engine.health();
        let counter = |what: &str, total: u64| set_counter(&self.counters, what, total);
        counter("rows_ingested", health.rows_ingested);
        counter("records_ingested", health.records_ingested);
        counter("reads_cancelled", health.reads_cancelled);
        counter("checkpoints", health.checkpoints);
        counter("checkpoint_microseconds", health.checkpoint_time.as_micros() as u64);
        counter("frontier_stall_reports", health.frontier_stall_reports);
        counter("writes_held", health.writes_held);
        counter("writes_refused", health.writes_refused);
        let visible_lag_ms = vectorflow::crates::core::time::physical_ms(health.next_ts)
            .saturating_sub(vectorflow::crates::core::time::physical_ms(health.applied_frontier));
        let gauge = |what: &str, value: f64| self.gauges.with_label_values(&[what]).set(value);
        gauge("visible_lag_seconds", visible_lag_ms as f64 / 1000.0);
        gauge("frontier_stalled_seconds", health.frontier_stalled_for.map_or(0.0, |d| d.as_secs_f64()));
        gauge("rows_in_flight", health.rows_in_flight as f64);
        gauge("index_backlog_rows", health.index_backlog_rows as f64);
        gauge("last_checkpoint_seconds", health.last_checkpoint.map_or(0.0, |d| d.as_secs_f64()));

        let names = self.engine.list_collections();
        self.collections.set(names.len() as i64);
        self.failed_collections.set(self.engine.failed_collections().len() as i64);
        // Dropped collections leave no series behind.
        self.per_collection.reset();
        self.segments.reset();
        self.kafka_lag.reset();
        self.dead_letters.reset();
        for name in names.iter().take(MAX_COLLECTIONS_PER_SCRAPE) {
            if let Ok(stats) = self.engine.stats_within(name, Consistency::Eventually, STATS_TIMEOUT) {
                let set = |what: &str, value: usize| {
                    self.per_collection.with_label_values(&[name.as_str(), what]).set(value as i64)
                };
                set("live_rows", stats.live_rows);
                set("growing_rows", stats.growing_rows);
                set("index_builds", stats.sealed_segments.saturating_sub(stats.indexed_segments));
                set("merge_builds", stats.compacting);
                set("index_bytes", stats.index_bytes);
                self.segments.with_label_values(&[name.as_str(), "sealed"]).set(stats.sealed_segments as i64);
                self.segments.with_label_values(&[name.as_str(), "indexed"]).set(stats.indexed_segments as i64);
            }
            if let Ok(Some(ingest)) = self.engine.ingest_stats(name) {
                self.dead_letters.with_label_values(&[name.as_str()]).set(ingest.dead_letters as i64);
                for partition in ingest.partitions {
                    self.kafka_lag
                        .with_label_values(&[name.as_str(), &partition.partition.to_string()])
                        .set(partition.lag() as i64);
                }
            }
        }
    }
}

/// Moves a counter up to the engine's `total` (engine totals never go down).
fn set_counter(counters: &IntCounterVec, what: &str, total: u64) {
    let counter = counters.with_label_values(&[what]);
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    auth: Option<Arc<Authenticator>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: http::HeaderMap| scrape(metrics.clone(), auth.clone(), headers)),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn scrape(
    metrics: Arc<Metrics>,
    auth: Option<Arc<Authenticator>>,
    headers: http::HeaderMap,
) -> (http::StatusCode, [(http::header::HeaderName, &'static str); 1], String) {
    let plain = [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    let exposition = [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")];
    let authorization = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let rendered = tokio::task::spawn_blocking(move || {
        if let Some(auth) = auth {
            // May run argon2: on the blocking pool, like the gRPC check.
            auth.verify(authorization.as_deref()).map_err(|e| (http::StatusCode::UNAUTHORIZED, e.to_string()))?;
        }
        metrics.render().map_err(|e| (http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await;
    match rendered {
        Ok(Ok(text)) => (http::StatusCode::OK, exposition, text),
        Ok(Err((status, problem))) => (status, plain, format!("{problem}\n")),
        Err(e) => (http::StatusCode::INTERNAL_SERVER_ERROR, plain, format!("metrics: {e}\n")),
    }
}
