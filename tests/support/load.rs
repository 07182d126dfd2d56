//! Closed-loop load for tests that need traffic while something happens.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::client::{full, request, TestClient};

/// Closed-loop load from `conns` clients until stopped; counts answers that were not 200.
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: String, conns: usize) -> Load {
        Load::run(url, conns, None)
    }

    /// One client sending a request every `every` (a quiet route).
    pub fn paced(url: String, every: std::time::Duration) -> Load {
        Load::run(url, 1, Some(every))
    }

    fn run(url: String, conns: usize, every: Option<std::time::Duration>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..conns)
            .map(|_| {
                let (stop, sent, failed, url) =
                    (stop.clone(), sent.clone(), failed.clone(), url.clone());
                tokio::spawn(async move {
                    let client = TestClient::http1();
                    while !stop.load(Ordering::Relaxed) {
                        let r = client
                            .try_send(
                                request(http::Method::POST, &url)
                                    .body(full(r#"{"model":"m"}"#))
                                    .unwrap(),
                            )
                            .await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !matches!(r, Ok(ref r) if r.status == 200) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(every) = every {
                            tokio::time::sleep(every).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            failed,
            tasks,
        }
    }

    /// Stops the clients; (sent, failed).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
