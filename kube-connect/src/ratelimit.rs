//! Client-side rate limit: one token bucket (`governor`) per resource kind,
//! as a tower layer on the kube client's service stack.
//!
//! Why per kind: upstream's daemon uses controller-runtime's client, which
//! builds one REST client per GroupVersionKind, each with its own token
//! bucket of `--kubernetes-qps`/`--kubernetes-burst` (controller-runtime
//! `pkg/client/client.go` `New` → `apiutil.RESTClientForGVK`; client-go
//! `rest.RESTClientFor` makes the `flowcontrol.NewTokenBucketRateLimiter`).
//! So a site's tuned flags mean "per kind" there, and mean the same here:
//! the same flags put the same pressure on the API server. Requests that
//! name no resource (discovery, `/version`) share one bucket of their own.
//!
//! kube has no limiter of its own, and `tower::limit::RateLimit` is a fixed
//! window (burst = qps). The layer sits under the client's `Buffer`, and
//! buffers its inner service itself, so a request waiting for its kind's
//! token never holds up a request of another kind. Requests the client's
//! own retry layer repeats (429/503/504) are below this layer and are not
//! counted again.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tower::buffer::Buffer;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::observe::{Observer, Target};

/// How many requests may queue for the inner service; far above what the
/// daemons have in flight.
const QUEUE: usize = 1024;

/// Token buckets by resource kind: `qps` tokens a second each, at most
/// `burst` saved up.
#[derive(Clone)]
pub struct RateLimitLayer {
    buckets: Arc<Buckets>,
    observer: Option<Arc<dyn Observer>>,
}

struct Buckets {
    quota: Quota,
    by_kind: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
}

impl Buckets {
    fn of(&self, kind: &str) -> Arc<DefaultDirectRateLimiter> {
        let mut map = self.by_kind.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(kind) {
            return b.clone();
        }
        let b = Arc::new(RateLimiter::direct(self.quota));
        map.insert(kind.to_string(), b.clone());
        b
    }
}

impl std::fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer").finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// `qps` > 0 (fractions allowed), `burst` ≥ 1 (0 is taken as 1), for
    /// each resource kind.
    pub fn new(qps: f64, burst: u32) -> Self {
        let period = Duration::from_secs_f64(1.0 / qps.max(1e-6));
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        RateLimitLayer {
            buckets: Arc::new(Buckets {
                quota,
                by_kind: Mutex::new(HashMap::new()),
            }),
            observer: None,
        }
    }

    /// Tells `observer` how long each request that had to wait for its
    /// token waited.
    pub fn observed(mut self, observer: Option<Arc<dyn Observer>>) -> Self {
        self.observer = observer;
        self
    }
}

/// The bucket key of a request path: `group/version/plural` for
/// `/apis/<group>/<version>/[namespaces/<ns>/]<plural>[/<name>[/<sub>]]` and
/// `/api/<version>/...` (the core group), the GroupVersionKind a
/// controller-runtime REST client is made for. Anything else: "".
pub fn kind_of(path: &str) -> String {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["apis", group, version, rest @ ..] => ((*group, *version), rest),
        ["api", version, rest @ ..] => (("", *version), rest),
        _ => return String::new(),
    };
    let plural = match rest {
        ["namespaces", _, plural, ..] => *plural,
        [plural, ..] => *plural,
        [] => return String::new(),
    };
    format!("{}/{}/{plural}", group.0, group.1)
}

type Request = http::Request<kube::client::Body>;

impl<S> Layer<S> for RateLimitLayer
where
    S: Service<Request> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
{
    type Service = RateLimitService<S::Future>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner: Buffer::new(inner, QUEUE),
            buckets: self.buckets.clone(),
            observer: self.observer.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`]: a request waits for a token of its
/// kind's bucket, then goes on.
pub struct RateLimitService<F> {
    inner: Buffer<Request, F>,
    buckets: Arc<Buckets>,
    observer: Option<Arc<dyn Observer>>,
}

impl<F: Send + 'static> Clone for RateLimitService<F> {
    fn clone(&self) -> Self {
        RateLimitService {
            inner: self.inner.clone(),
            buckets: self.buckets.clone(),
            observer: self.observer.clone(),
        }
    }
}

impl<F, Rsp, E> Service<Request> for RateLimitService<F>
where
    F: Future<Output = Result<Rsp, E>> + Send + 'static,
    E: Into<BoxError> + Send + Sync,
    Rsp: Send + 'static,
{
    type Response = Rsp;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Rsp, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The wait is per request, in `call`: readiness says nothing about a
        // request not yet seen.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let bucket = self.buckets.of(&kind_of(req.uri().path()));
        let inner = self.inner.clone();
        let observer = self.observer.clone();
        Box::pin(async move {
            if bucket.check().is_err() {
                let started = Instant::now();
                // Cancelled while waiting (the caller gave up): nothing waited
                // to the end, nothing is reported.
                bucket.until_ready().await;
                if let Some(observer) = observer {
                    observer.rate_limited(&Target::of_path(req.uri().path()), started.elapsed());
                }
            }
            inner.oneshot(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::kind_of;

    #[test]
    fn kinds_of_paths() {
        for (path, kind) in [
            (
                "/apis/nnf.cray.hpe.com/v1alpha11/namespaces/r1/nnfdatamovements",
                "nnf.cray.hpe.com/v1alpha11/nnfdatamovements",
            ),
            (
                "/apis/nnf.cray.hpe.com/v1alpha11/namespaces/r1/nnfdatamovements/x/status",
                "nnf.cray.hpe.com/v1alpha11/nnfdatamovements",
            ),
            (
                "/apis/lus.cray.hpe.com/v1beta1/lustrefilesystems",
                "lus.cray.hpe.com/v1beta1/lustrefilesystems",
            ),
            ("/api/v1/namespaces/a/pods/p", "/v1/pods"),
            ("/api/v1/namespaces", "/v1/namespaces"),
            ("/version", ""),
            ("/apis", ""),
            ("/apis/nnf.cray.hpe.com/v1alpha11", ""),
        ] {
            assert_eq!(kind_of(path), kind, "{path}");
        }
    }
}
