//! Reads of what the daemon's ClusterRole does not let it watch (Workflows,
//! ClientMounts): concurrent creates that need the same object or list share
//! one request in flight (single flight), and its answer serves later
//! creates for a short, bounded time (`ttl`, counted from when the request
//! was sent). Failures are shared by those waiting but never kept.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};

use crate::agent::Rejection;

type Fetch<V> = Shared<BoxFuture<'static, Result<(V, Instant), Rejection>>>;

enum Entry<V: Clone> {
    Ready(V, Instant),
    Pending(Fetch<V>),
}

pub(super) struct Flight<K, V: Clone> {
    ttl: Duration,
    map: Mutex<HashMap<K, Entry<V>>>,
}

/// Entries kept before expired ones are swept.
const SWEEP_ABOVE: usize = 64;

impl<K, V> Flight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(super) fn new(ttl: Duration) -> Self {
        Flight {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The cached answer for `key` if younger than the ttl, else the answer
    /// of the request in flight for it, else that of `fetch()`, sent now.
    pub(super) async fn get<F>(&self, key: K, fetch: impl FnOnce() -> F) -> Result<V, Rejection>
    where
        F: Future<Output = Result<V, Rejection>> + Send + 'static,
    {
        let flight = {
            let mut map = self.map.lock().unwrap();
            match map.get(&key) {
                Some(Entry::Ready(v, at)) if at.elapsed() < self.ttl => return Ok(v.clone()),
                Some(Entry::Pending(f)) => f.clone(),
                _ => {
                    if map.len() > SWEEP_ABOVE {
                        let ttl = self.ttl;
                        map.retain(|_, e| match e {
                            Entry::Ready(_, at) => at.elapsed() < ttl,
                            Entry::Pending(_) => true,
                        });
                    }
                    let sent = Instant::now();
                    let fut = fetch();
                    let f: Fetch<V> = async move { fut.await.map(|v| (v, sent)) }.boxed().shared();
                    map.insert(key.clone(), Entry::Pending(f.clone()));
                    f
                }
            }
        };
        let result = flight.clone().await;
        let mut map = self.map.lock().unwrap();
        // Only the flight still registered settles its entry: a later one
        // may have replaced it.
        if matches!(map.get(&key), Some(Entry::Pending(f)) if f.ptr_eq(&flight)) {
            match &result {
                Ok((v, sent)) => {
                    map.insert(key, Entry::Ready(v.clone(), *sent));
                }
                Err(_) => {
                    map.remove(&key);
                }
            }
        }
        result.map(|(v, _)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(flavor = "current_thread")]
    async fn one_request_for_many_waiters_and_kept_for_the_ttl() {
        let flight = Arc::new(Flight::<&str, u32>::new(Duration::from_secs(2)));
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = |calls: Arc<AtomicUsize>| {
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(7)
            }
        };
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let flight = flight.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(
                async move { flight.get("k", fetch(calls)).await },
            ));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(flight.get("k", fetch(calls.clone())).await.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(flight.get("k", fetch(calls.clone())).await.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "expired: fetched again");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn failures_are_not_kept() {
        let flight = Flight::<&str, u32>::new(Duration::from_secs(60));
        let failed = flight
            .get("k", || async {
                Err(Rejection::new(fuse_ctl::Errno::EAGAIN, "down"))
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(flight.get("k", || async { Ok(1) }).await.unwrap(), 1);
    }
}
