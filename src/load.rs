//! A small closed-loop load generator for `rollgate demo` and `rollgate drill`: `clients`
//! tasks each POST a chat completion to `url`, wait for the whole answer, and repeat until
//! stopped. It counts what clients see: answers, failures (non-2xx, broken body, no
//! answer), and answers from one named version (by `x-rollgate-version`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use http::{Method, Request};
use http_body_util::BodyExt;
use tokio::task::JoinHandle;

use crate::proxy::body::ReqBody;

#[derive(Debug, Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    ok_from_watched: AtomicU64,
}

/// Running load; [`Load::stop`] ends it.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `clients` loops against `url`; answers from `watch` are also counted apart.
    pub fn start(url: &str, clients: usize, watch: &str) -> std::io::Result<Load> {
        let client = crate::proxy::client::control_client()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let tasks = (0..clients)
            .map(|i| {
                let (client, stop, counts) = (client.clone(), stop.clone(), counts.clone());
                let (url, watch) = (url.to_string(), watch.as_bytes().to_vec());
                let body = bytes::Bytes::from(format!(
                    r#"{{"model":"demo","messages":[{{"role":"user","content":"ticket {i}: my order is late"}}]}}"#
                ));
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let req = Request::builder()
                            .method(Method::POST)
                            .uri(&url)
                            .header("content-type", "application/json")
                            .body(ReqBody::full(body.clone(), None));
                        let Ok(req) = req else { return };
                        let answered = match client.request(req).await {
                            Ok(resp) => {
                                let from_watched = resp
                                    .headers()
                                    .get("x-rollgate-version")
                                    .is_some_and(|v| v.as_bytes() == watch);
                                let ok = resp.status().is_success()
                                    && resp.into_body().collect().await.is_ok();
                                ok.then_some(from_watched)
                            }
                            Err(_) => None,
                        };
                        match answered {
                            Some(from_watched) => {
                                counts.ok.fetch_add(1, Ordering::Relaxed);
                                if from_watched {
                                    counts.ok_from_watched.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            None => {
                                counts.failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Ok(Load {
            stop,
            counts,
            tasks,
        })
    }

    /// Requests answered (2xx, whole body).
    pub fn ok(&self) -> u64 {
        self.counts.ok.load(Ordering::Relaxed)
    }

    /// Requests that failed as clients see it.
    pub fn failed(&self) -> u64 {
        self.counts.failed.load(Ordering::Relaxed)
    }

    /// Answers from the watched version.
    pub fn ok_from_watched(&self) -> u64 {
        self.counts.ok_from_watched.load(Ordering::Relaxed)
    }

    pub fn sent(&self) -> u64 {
        self.ok() + self.failed()
    }

    /// Stops every loop and waits for their last requests; the counts stay readable.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}
