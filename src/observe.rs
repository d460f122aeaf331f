//! Every call timed once: counted in the metrics by method and status
//! code, and logged as one structured line when it is slow (the method and
//! how long the handler took to answer; for a stream, to its first
//! message), so an operator sees which requests hold the server without
//! tracing every call.
//!
//! The code is the `grpc-status` of the response headers: tonic puts a
//! handler's error there (a trailers-only response), and a unary success
//! carries its OK in the trailers. A stream that fails after its first
//! message counts as OK. The layer is the outermost, so it records the
//! code the client gets (after the response remappings).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Logs calls that take at least `threshold` (none when it is zero) and
/// counts every call in `metrics`.
#[derive(Clone)]
pub struct ObserveLayer {
    threshold: Duration,
    metrics: Option<Arc<Metrics>>,
}

impl ObserveLayer {
    pub fn new(threshold: Duration, metrics: Option<Arc<Metrics>>) -> ObserveLayer {
        ObserveLayer { threshold, metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed { inner, threshold: self.threshold, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    threshold: Duration,
    metrics: Option<Arc<Metrics>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Observed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = crate::ready_service::take_ready(&mut self.inner);
        let threshold = self.threshold;
        let metrics = self.metrics.clone();
        if threshold.is_zero() && metrics.is_none() {
            return Box::pin(inner.call(request));
        }
        let method = request.uri().path().to_string();
        Box::pin(async move {
            let started = Instant::now();
            let response = inner.call(request).await;
            let elapsed = started.elapsed();
            let code = match &response {
                Ok(response) => {
                    response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_string()
                }
                Err(_) => "transport".to_string(),
            };
            if let Some(metrics) = &metrics {
                // Paths no service serves share one label, whatever their
                // code, so a client cannot make series without end.
                let label = crate::auth::method_label(&method);
                metrics.observe_call(label.as_deref().unwrap_or("unknown"), &code, elapsed);
            }
            if !threshold.is_zero() && elapsed >= threshold {
                tracing::warn!(method, elapsed_ms = elapsed.as_millis() as u64, status = code, "slow request");
            }
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// Collects what the log writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn calls_over_the_threshold_are_logged_once_and_quick_ones_not() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let handler = tower::service_fn(|request: http::Request<()>| async move {
            if request.uri().path().ends_with("Slow") {
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        });
        let mut service = ObserveLayer::new(Duration::from_millis(30), None).layer(handler);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                for path in ["/vectorflow.v1.Vectorflow/Slow", "/vectorflow.v1.Vectorflow/Quick"] {
                    let request = http::Request::builder().uri(path).body(()).unwrap();
                    service.ready().await.unwrap().call(request).await.unwrap();
                }
            })
        });
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(log.matches("slow request").count(), 1, "{log}");
        assert!(log.contains("/vectorflow.v1.Vectorflow/Slow") && !log.contains("Quick"), "{log}");
    }
}
