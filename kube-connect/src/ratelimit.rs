//! Client-side rate limit: a token bucket (`governor`) as a tower layer on
//! the kube client's service stack.
//!
//! kube has no limiter of its own, and `tower::limit::RateLimit` is a fixed
//! window (burst = qps). The layer sits under the client's `Buffer`, so
//! every clone of the `Client` and every request (watch starts included)
//! passes through the same bucket. Requests the client's own retry layer
//! repeats (429/503/504) are below this layer and are not counted again.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tower::{Layer, Service};

/// A shared token bucket: `qps` tokens a second, at most `burst` saved up.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer").finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// `qps` > 0 (fractions allowed), `burst` ≥ 1 (0 is taken as 1).
    pub fn new(qps: f64, burst: u32) -> Self {
        let period = Duration::from_secs_f64(1.0 / qps.max(1e-6));
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        RateLimitLayer {
            limiter: Arc::new(RateLimiter::direct(quota)),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
            wait: None,
            permit: false,
        }
    }
}

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The service of [`RateLimitLayer`]: not ready until a token is taken.
pub struct RateLimitService<S> {
    inner: S,
    limiter: Arc<DefaultDirectRateLimiter>,
    wait: Option<Wait>,
    /// A token was taken for the next `call`.
    permit: bool,
}

impl<S, Req> Service<Req> for RateLimitService<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.permit {
            if self.wait.is_none() {
                if self.limiter.check().is_ok() {
                    self.permit = true;
                } else {
                    let limiter = self.limiter.clone();
                    self.wait = Some(Box::pin(async move { limiter.until_ready().await }));
                }
            }
            if let Some(wait) = self.wait.as_mut() {
                match wait.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.wait = None;
                        self.permit = true;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // tower's contract: call only after poll_ready said Ready, which
        // took the token.
        self.permit = false;
        self.inner.call(req)
    }
}
