//! What a daemon may learn about its own API traffic, for its metrics: one
//! call per request as it left the client (verb, resource, HTTP code) and
//! one per request that waited on the client-side rate limit.
//!
//! The observing layer sits below the rate limit, so a request is counted
//! when it is sent, with the code the server answered. kube's own retry
//! layer (429/503/504) lies below any layer a builder can add: a retried
//! request counts once, with its last answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{BoxError, Layer, Service};

/// The resource a request path names, as RBAC and the API server's own
/// `apiserver_request_total` spell it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Target {
    /// API group; "" for the core group.
    pub group: String,
    pub version: String,
    /// Plural resource name; "" for requests that name none (discovery).
    pub resource: String,
    /// `status` for `/status`, else "".
    pub subresource: String,
    /// Whether the path names one object.
    pub named: bool,
}

impl Target {
    /// `/apis/<group>/<version>/[namespaces/<ns>/]<plural>[/<name>[/<sub>]]`
    /// and `/api/<version>/...` (the core group); anything else names no
    /// resource.
    pub fn of_path(path: &str) -> Target {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (group, version, rest) = match segs.as_slice() {
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            ["api", version, rest @ ..] => ("", *version, rest),
            _ => return Target::default(),
        };
        let rest = match rest {
            // `namespaces/<ns>` alone is the Namespace object itself.
            ["namespaces", _, more @ ..] if !more.is_empty() => more,
            r => r,
        };
        let (resource, name, sub) = match rest {
            [] => return Target::default(),
            [p] => (*p, None, None),
            [p, n] => (*p, Some(*n), None),
            [p, n, s, ..] => (*p, Some(*n), Some(*s)),
        };
        Target {
            group: group.to_string(),
            version: version.to_string(),
            resource: resource.to_string(),
            subresource: sub.unwrap_or("").to_string(),
            named: name.is_some_and(|n| !n.is_empty()),
        }
    }

    /// The RBAC verb of `method` on this target (`watch` for a GET with
    /// `watch=true`, `list` for a GET of a collection); for a request that
    /// names no resource, the method in lower case.
    pub fn verb(&self, method: &http::Method, query: Option<&str>) -> String {
        if self.resource.is_empty() {
            return method.as_str().to_ascii_lowercase();
        }
        let watch = query.is_some_and(|q| {
            q.split('&')
                .any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch"))
        });
        match *method {
            http::Method::GET if watch => "watch",
            http::Method::GET if self.named => "get",
            http::Method::GET => "list",
            http::Method::POST => "create",
            http::Method::PUT => "update",
            http::Method::PATCH => "patch",
            http::Method::DELETE if self.named => "delete",
            http::Method::DELETE => "deletecollection",
            _ => return method.as_str().to_ascii_lowercase(),
        }
        .to_string()
    }
}

/// Told about a daemon's API traffic. Calls come from the client's tasks:
/// they must be quick and never block.
pub trait Observer: Send + Sync + 'static {
    /// A request was answered: `code` is the HTTP status, `None` when no
    /// answer came (connection refused, reset, TLS failure).
    fn request(&self, verb: &str, target: &Target, code: Option<u16>);
    /// A request of `target`'s kind waited `waited` for a rate-limit token.
    fn rate_limited(&self, target: &Target, waited: Duration);
}

/// The layer that reports every request to an [`Observer`].
#[derive(Clone)]
pub struct ObserveLayer {
    observer: Arc<dyn Observer>,
}

impl ObserveLayer {
    pub fn new(observer: Arc<dyn Observer>) -> Self {
        ObserveLayer { observer }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveService {
            inner,
            observer: self.observer.clone(),
        }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    observer: Arc<dyn Observer>,
}

type Request = http::Request<kube::client::Body>;

impl<S, B> Service<Request> for ObserveService<S>
where
    S: Service<Request, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: 'static,
{
    type Response = http::Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let target = Target::of_path(req.uri().path());
        let verb = target.verb(req.method(), req.uri().query());
        let observer = self.observer.clone();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let result = answer.await.map_err(Into::into);
            let code = result.as_ref().ok().map(|r| r.status().as_u16());
            observer.request(&verb, &target, code);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn verbs_and_targets_as_rbac_spells_them() {
        let cases = [
            (
                Method::GET,
                "/apis/nnf.cray.hpe.com/v1alpha11/namespaces/r/nnfdatamovements",
                None,
                "list",
                "nnfdatamovements",
                "",
            ),
            (
                Method::GET,
                "/apis/nnf.cray.hpe.com/v1alpha11/namespaces/r/nnfdatamovements",
                Some("watch=true&resourceVersion=1"),
                "watch",
                "nnfdatamovements",
                "",
            ),
            (
                Method::GET,
                "/apis/dataworkflowservices.github.io/v1alpha7/namespaces/default/workflows/wf1",
                None,
                "get",
                "workflows",
                "",
            ),
            (
                Method::POST,
                "/apis/nnf.cray.hpe.com/v1alpha11/namespaces/r/nnfdatamovements",
                None,
                "create",
                "nnfdatamovements",
                "",
            ),
            (
                Method::PATCH,
                "/apis/nnf.cray.hpe.com/v1alpha11/namespaces/r/nnfdatamovements/x",
                None,
                "patch",
                "nnfdatamovements",
                "",
            ),
            (
                Method::PUT,
                "/apis/dataworkflowservices.github.io/v1alpha7/namespaces/n/clientmounts/c/status",
                None,
                "update",
                "clientmounts",
                "status",
            ),
            (
                Method::DELETE,
                "/apis/nnf.cray.hpe.com/v1alpha11/namespaces/r/nnfdatamovements/x",
                None,
                "delete",
                "nnfdatamovements",
                "",
            ),
            (
                Method::DELETE,
                "/apis/nnf.cray.hpe.com/v1alpha11/namespaces/r/nnfdatamovements",
                None,
                "deletecollection",
                "nnfdatamovements",
                "",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/default",
                None,
                "get",
                "namespaces",
                "",
            ),
            (Method::GET, "/version", None, "get", "", ""),
        ];
        for (method, path, query, verb, resource, sub) in cases {
            let t = Target::of_path(path);
            assert_eq!(t.verb(&method, query), verb, "{method} {path}");
            assert_eq!(t.resource, resource, "{path}");
            assert_eq!(t.subresource, sub, "{path}");
        }
        assert_eq!(
            Target::of_path("/apis/lus.cray.hpe.com/v1beta1/lustrefilesystems").group,
            "lus.cray.hpe.com"
        );
    }
}
