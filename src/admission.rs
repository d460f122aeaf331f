//! Load shedding: at most `max_concurrent_requests` calls run at once; one
//! more is refused at once with RESOURCE_EXHAUSTED instead of queueing
//! (every queue is bounded: a queue in front of a saturated server only
//! turns overload into timeouts). Health checks and reflection are always
//! admitted, so a saturated server still answers its load balancer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;

use crate::auth::{Access, required_access};

/// Admits at most `permits` calls at a time.
#[derive(Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl AdmissionLayer {
    pub fn new(max_concurrent_requests: usize) -> AdmissionLayer {
        let limit = max_concurrent_requests.max(1);
        AdmissionLayer { permits: Arc::new(Semaphore::new(limit)), limit }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission { inner, permits: self.permits.clone(), limit: self.limit }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl<S, B> tower::Service<http::Request<B>> for Admission<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = crate::ready_service::take_ready(&mut self.inner);
        if required_access(request.uri().path()) == Access::Open {
            return Box::pin(inner.call(request));
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Box::pin(async move {
                // Held until the handler has answered (for a stream: its first message).
                let response = inner.call(request).await;
                drop(permit);
                response
            }),
            Err(_) => {
                let status = tonic::Status::resource_exhausted(format!(
                    "max_concurrent_requests: {} calls are running, the server's limit; retry later",
                    self.limit
                ));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
