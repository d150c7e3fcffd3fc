//! The Prometheus scrape endpoint both daemons serve behind
//! `--metrics-bind-address`, spelled as controller-runtime spells it
//! (upstream's clientmountd, `mount-daemon/main.go`): `0` disables,
//! `:8080` is every interface, `host:port` one address.
//!
//! The endpoint renders on demand and does nothing between scrapes, so an
//! idle scrape costs what the render closure costs and no more.

use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The content type of the OpenMetrics text `prometheus-client` encodes;
/// Prometheus and `prometheus_client`'s parsers read it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("metrics bind address {0:?}: expected 0, :PORT or HOST:PORT")]
    Syntax(String),
    #[error("metrics bind address {addr:?} does not resolve")]
    Resolve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for metrics on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Parses a `--metrics-bind-address` value: `None` when metrics are off.
pub fn parse_bind_address(value: &str) -> Result<Option<SocketAddr>, BindError> {
    let value = value.trim();
    if value.is_empty() || value == "0" {
        return Ok(None);
    }
    if let Some(port) = value.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| BindError::Syntax(value.to_string()))?;
        return Ok(Some(SocketAddr::from(([0, 0, 0, 0], port))));
    }
    if !value.contains(':') {
        return Err(BindError::Syntax(value.to_string()));
    }
    value
        .to_socket_addrs()
        .map_err(|source| BindError::Resolve {
            addr: value.to_string(),
            source,
        })?
        .next()
        .map(Some)
        .ok_or_else(|| BindError::Syntax(value.to_string()))
}

/// What the endpoint serves: called once per scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` now (so a busy port is a start-up error) and serves
/// `GET /metrics` on the current tokio runtime until the runtime ends.
/// Returns the bound address (useful with port 0).
pub async fn serve(addr: SocketAddr, render: Render) -> Result<SocketAddr, BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| BindError::Listen { addr, source })?;
    tracing::info!(address = %bound, "serving metrics on /metrics");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(error) => {
                    // EMFILE and friends: keep serving once they pass.
                    tracing::warn!(%error, "metrics: accept failed");
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            let render = render.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let render = render.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &render)) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, "metrics: connection ended");
                }
            });
        }
    });
    Ok(bound)
}

fn answer<B>(request: &Request<B>, render: &Render) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let (status, content_type, body) = if path != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        )
    } else if request.method() != Method::GET && request.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".to_string(),
        )
    } else {
        (StatusCode::OK, CONTENT_TYPE, render())
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn bind_addresses_as_controller_runtime_spells_them() {
        assert_eq!(parse_bind_address("0").unwrap(), None);
        assert_eq!(parse_bind_address("").unwrap(), None);
        assert_eq!(
            parse_bind_address(":8080").unwrap(),
            Some(SocketAddr::from(([0, 0, 0, 0], 8080)))
        );
        assert_eq!(
            parse_bind_address("127.0.0.1:9100").unwrap(),
            Some(SocketAddr::from(([127, 0, 0, 1], 9100)))
        );
        assert!(parse_bind_address("localhost:9100").unwrap().is_some());
        for bad in [":http", "8080", ":99999", "nohost.invalid:x"] {
            assert!(parse_bind_address(bad).is_err(), "{bad} was accepted");
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    }

    #[tokio::test]
    async fn serves_the_render_on_metrics_only() {
        let render: Render = Arc::new(|| "# EOF\n".to_string());
        let addr = serve(SocketAddr::from(([127, 0, 0, 1], 0)), render)
            .await
            .unwrap();
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.ends_with("# EOF\n"), "{ok}");
        let missing = get(addr, "/other").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    }

    #[tokio::test]
    async fn a_busy_port_is_an_error_naming_the_address() {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = first.local_addr().unwrap();
        let error = serve(addr, Arc::new(String::new)).await.unwrap_err();
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }
}
