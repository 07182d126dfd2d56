//! A rollgate instance started in the test's process from files in a temp dir the test
//! keeps (so its audit log can be read after shutdown), and a stalled disk: a FIFO where a
//! file is about to be written blocks the writer until the test opens the read end.

use std::path::{Path, PathBuf};

/// A running instance and the files it was started from.
pub struct Instance {
    pub running: rollgate::app::Running,
    pub dir: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub config: PathBuf,
}

/// A config with one version `a` at `endpoint` and one route `chat`, `drain_timeout: 2s`,
/// the evaluator unable to decide; `extra` goes at the top level, `version_extra` into
/// version `a`'s flow mapping (", key: value").
pub fn instance_yaml(state_dir: &Path, endpoint: &str, extra: &str, version_extra: &str) -> String {
    format!(
        "admin: {{listen: \"127.0.0.1:0\"}}\nstate_dir: \"{}\"\ndrain_timeout: 2s\n\
         evaluator: {{min_requests: 1000000}}\n{extra}versions:\n  a: {{endpoints: [\"{endpoint}\"]{version_extra}}}\n\
         routes:\n  - {{name: chat, owner: t, match: {{path_prefix: /}}, baseline: a, split: {{a: 100}}}}\n",
        state_dir.display()
    )
}

impl Instance {
    /// Writes `text_of(state_dir)` as the config file and starts from it.
    pub async fn start(text_of: impl Fn(&Path) -> String) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        let config = dir.path().join("rollgate.yaml");
        let text = text_of(&state_dir);
        std::fs::write(&config, &text).unwrap();
        let parsed = rollgate::config::Config::from_str(&text, &config).unwrap();
        let listeners = rollgate::app::Listeners {
            data: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            health: None,
        };
        let running = rollgate::app::start(parsed, listeners).await.unwrap();
        Instance {
            running,
            dir,
            state_dir,
            config,
        }
    }

    /// Writes `text` over the config file and waits (5 s, bounded) for the watcher's
    /// reload to swap it in: with a [`Stall`] at [`state_tmp`](Self::state_tmp), the
    /// reload is then blocked in its persist.
    pub async fn edit_config_and_wait_for_the_swap(&self, text: String) {
        let g0 = self.running.store.load().generation;
        std::fs::write(&self.config, text).unwrap();
        assert_eventually!(
            self.running.store.load().generation != g0,
            std::time::Duration::from_secs(5),
            "the watcher's reload swaps"
        );
    }

    /// Where persisting the runtime state writes first: a FIFO here stalls the persist.
    pub fn state_tmp(&self) -> PathBuf {
        self.state_dir.join(".state.json.tmp")
    }

    /// Sends `POST /api/v1/pause` for route `chat` with the state's persist stalled (a
    /// [`Stall`] at [`state_tmp`](Self::state_tmp)), waits for the
    /// pause to swap in (its command then holds the decision lock, blocked in the persist),
    /// and hangs up. Returns the stall, to release.
    pub async fn stalled_pause_then_hang_up(&self) -> Stall {
        use tokio::io::AsyncWriteExt;
        let store = self.running.store.clone();
        let g0 = store.load().generation;
        let stall = Stall::new(&self.state_tmp());
        let body = br#"{"route": "chat", "paused": true}"#;
        let mut req = format!(
            "POST /api/v1/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        let mut s = tokio::net::TcpStream::connect(self.running.admin_addr)
            .await
            .unwrap();
        s.write_all(&req).await.unwrap();
        assert_eventually!(
            store.load().generation == g0 + 1,
            std::time::Duration::from_secs(5),
            "the pause swaps in"
        );
        drop(s);
        stall
    }
}

/// A FIFO at a path a writer is about to open: the writer blocks until [`release`]
/// (Self::release) opens the read end. Dropped unreleased (a test that failed half way),
/// it releases too: a writer left blocked for good would hold the drop of the test's
/// runtime, which waits for blocking tasks, and turn a failure into a hang.
pub struct Stall {
    path: PathBuf,
    released: bool,
}

impl Stall {
    pub fn new(path: &Path) -> Stall {
        let ok = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo");
        assert!(ok.success());
        Stall {
            path: path.to_path_buf(),
            released: false,
        }
    }

    /// Opens the read end without blocking: the stalled writer goes on (and fails at
    /// fsync, which a FIFO refuses). Keep the handle until the writer is done. The path
    /// is removed at once: a persist that fails at fsync leaves its temp file, and a
    /// later writer must not find a FIFO nobody reads.
    pub fn release(&mut self) -> Option<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        if std::mem::replace(&mut self.released, true) {
            return None;
        }
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o4000) // O_NONBLOCK (Linux)
            .open(&self.path)
            .expect("open the FIFO's read end");
        let _ = std::fs::remove_file(&self.path);
        Some(reader)
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Runs `running`'s shutdown and reports whether it returned within `bound` (and how long
/// it took); then releases `stall` and lets the shutdown end, bounded, so the test's
/// runtime can drop.
pub async fn shutdown_within(
    running: rollgate::app::Running,
    stall: &mut Stall,
    bound: std::time::Duration,
) -> (bool, std::time::Duration) {
    let t0 = tokio::time::Instant::now();
    let mut shutdown = tokio::spawn(running.shutdown());
    let in_time = tokio::time::timeout(bound, &mut shutdown).await.is_ok();
    let _reader = stall.release();
    if !in_time {
        tokio::time::timeout(std::time::Duration::from_secs(20), shutdown)
            .await
            .expect("shutdown ends once the stall does")
            .unwrap();
    }
    (in_time, t0.elapsed())
}
