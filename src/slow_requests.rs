//! One structured log line per slow call: the method and how long the
//! handler took to answer (for a stream, to its first message), so an
//! operator sees which requests hold the server without tracing every call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Logs calls that take at least `threshold` (none when it is zero).
#[derive(Clone, Copy)]
pub struct SlowRequestLayer {
    threshold: Duration,
}

impl SlowRequestLayer {
    pub fn new(threshold: Duration) -> SlowRequestLayer {
        SlowRequestLayer { threshold }
    }
}

impl<S> tower::Layer<S> for SlowRequestLayer {
    type Service = SlowRequests<S>;

    fn layer(&self, inner: S) -> SlowRequests<S> {
        SlowRequests { inner, threshold: self.threshold }
    }
}

#[derive(Clone)]
pub struct SlowRequests<S> {
    inner: S,
    threshold: Duration,
}

impl<S, B, R> tower::Service<http::Request<B>> for SlowRequests<S>
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
        // The service polled ready is the one to call; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let threshold = self.threshold;
        if threshold.is_zero() {
            return Box::pin(inner.call(request));
        }
        let method = request.uri().path().to_string();
        Box::pin(async move {
            let started = Instant::now();
            let response = inner.call(request).await;
            let elapsed = started.elapsed();
            if elapsed >= threshold {
                // Errors decided before the handler (refusals) travel in the headers.
                let status = response
                    .as_ref()
                    .ok()
                    .and_then(|r| r.headers().get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("in trailers")
                    .to_string();
                tracing::warn!(method, elapsed_ms = elapsed.as_millis() as u64, status, "slow request");
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
        let mut service = SlowRequestLayer::new(Duration::from_millis(30)).layer(handler);
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
