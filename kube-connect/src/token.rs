//! The service-account token, read from its file as client-go does: the
//! content trimmed of surrounding whitespace (client-go
//! `transport/token_source.go` `fileTokenSource.Token`: `strings.TrimSpace`),
//! and read again as the file rotates.
//!
//! kube's own `token_file` sends the bytes untrimmed, so a token written with
//! a trailing newline (what `echo` and most editors do) would be refused with
//! 401 on every request. This layer sets `Authorization` itself instead.
//!
//! When to read again: whenever the file's identity (inode, size, mtime)
//! changed since the last read, checked with one `stat` per request (so a
//! rotation, including the kubelet's `..data` symlink swap, is seen by the
//! next request), and at least once a minute as client-go does. A file that
//! cannot be read keeps the last good token (client-go's
//! `cachingTokenSource` does the same) and logs a warning.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use tower::{Layer, Service};

/// client-go re-reads its token file at least this often.
const REFRESH: Duration = Duration::from_secs(60);

/// What is wrong with a token file's content, or `Ok(token)`.
pub(crate) fn parse_token(bytes: &[u8]) -> Result<String, &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "token is not UTF-8 text")?;
    let token = text.trim();
    if token.is_empty() {
        return Err("file is empty");
    }
    if token.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("token holds whitespace or a control character inside it");
    }
    Ok(token.to_string())
}

#[derive(PartialEq, Clone, Copy)]
struct Identity {
    ino: u64,
    dev: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

fn identity(path: &Path) -> Option<Identity> {
    let m = std::fs::metadata(path).ok()?;
    Some(Identity {
        ino: m.ino(),
        dev: m.dev(),
        len: m.len(),
        mtime: m.modified().ok(),
    })
}

struct Cached {
    header: Option<HeaderValue>,
    identity: Option<Identity>,
    read_at: Instant,
}

/// Sets `Authorization: Bearer <token>` from the token file.
#[derive(Clone)]
pub struct TokenFileLayer {
    path: PathBuf,
    cached: Arc<Mutex<Cached>>,
}

impl std::fmt::Debug for TokenFileLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFileLayer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TokenFileLayer {
    pub fn new(path: PathBuf) -> Self {
        let layer = TokenFileLayer {
            path,
            cached: Arc::new(Mutex::new(Cached {
                header: None,
                identity: None,
                read_at: Instant::now(),
            })),
        };
        layer.header();
        layer
    }

    /// The header for the next request, read again when due.
    fn header(&self) -> Option<HeaderValue> {
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let now_identity = identity(&self.path);
        let due =
            c.header.is_none() || now_identity != c.identity || c.read_at.elapsed() >= REFRESH;
        if due {
            let read = std::fs::read(&self.path)
                .map_err(|e| e.to_string())
                .and_then(|b| parse_token(&b).map_err(str::to_string))
                .and_then(|t| {
                    HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| e.to_string())
                });
            c.read_at = Instant::now();
            c.identity = now_identity;
            match read {
                Ok(mut h) => {
                    h.set_sensitive(true);
                    c.header = Some(h);
                }
                Err(why) => tracing::warn!(
                    file = %self.path.display(),
                    "cannot read the service token again ({why}): keeping the last one"
                ),
            }
        }
        c.header.clone()
    }
}

impl<S> Layer<S> for TokenFileLayer {
    type Service = TokenFileService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenFileService {
            inner,
            token: self.clone(),
        }
    }
}

pub struct TokenFileService<S> {
    inner: S,
    token: TokenFileLayer,
}

impl<S, B> Service<http::Request<B>> for TokenFileService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(h) = self.token.header() {
            req.headers_mut().insert(http::header::AUTHORIZATION, h);
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_token;

    #[test]
    fn tokens_are_trimmed_like_client_go() {
        assert_eq!(parse_token(b"abc\n").unwrap(), "abc");
        assert_eq!(parse_token(b"  abc \r\n").unwrap(), "abc");
        assert_eq!(parse_token(b"abc").unwrap(), "abc");
        assert!(parse_token(b"\n").is_err());
        assert!(parse_token(b"").is_err());
        assert!(parse_token(b"a\nb").is_err());
        assert!(parse_token(&[0xff, 0xfe]).is_err());
    }
}
