//! The audit log: `state_dir/audit.jsonl`, one JSON object a line, each fsync'd before the
//! decision it records is reported done.
//!
//! Every record has `id` (`rb-000042`: a kind prefix and a sequence number shared by all
//! kinds, so ids order records), `timestamp` (RFC 3339, milliseconds, UTC) and `kind`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{Map, Value};

pub const AUDIT_FILE: &str = "audit.jsonl";

/// The append-only audit log.
#[derive(Debug)]
pub struct Audit {
    path: PathBuf,
    /// Held while one record is written and fsync'd: decisions are rare (cold path), and
    /// the lock keeps ids in file order. Never taken on the request path.
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    last: u64,
}

fn prefix(kind: &str) -> &'static str {
    match kind {
        "rollback" => "rb",
        "promote" => "pr",
        "resume" => "rs",
        "weights" => "wt",
        "pause" => "pa",
        "rollout_step" => "ro",
        "config_reload" => "cr",
        "drill" => "dr",
        "degraded" => "dg",
        _ => "ev",
    }
}

/// The sequence number of an id such as `rb-000042`.
pub fn id_number(id: &str) -> Option<u64> {
    id.rsplit('-').next()?.parse().ok()
}

impl Audit {
    /// Opens (creating) the log and continues its id sequence.
    pub fn open(state_dir: &Path) -> io::Result<Audit> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            io::Error::new(e.kind(), format!("state_dir {}: {e}", state_dir.display()))
        })?;
        let path = state_dir.join(AUDIT_FILE);
        let mut last = 0;
        if let Ok(f) = File::open(&path) {
            for line in io::BufReader::new(f).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if let Some(n) = v["id"].as_str().and_then(id_number) {
                        last = last.max(n);
                    }
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(Audit {
            path,
            inner: Mutex::new(Inner { file, last }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record of `kind` with `fields`, durably. Blocking (write + fsync): call it
    /// from `spawn_blocking` or a background task, never from the request path.
    pub fn append(&self, kind: &str, fields: Map<String, Value>) -> io::Result<Value> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = inner.last + 1;
        let mut record = Map::new();
        record.insert(
            "id".into(),
            Value::String(format!("{}-{n:06}", prefix(kind))),
        );
        record.insert(
            "timestamp".into(),
            Value::String(timestamp(SystemTime::now())),
        );
        record.insert("kind".into(), Value::String(kind.to_string()));
        record.extend(fields);
        let record = Value::Object(record);
        let mut line = serde_json::to_vec(&record).map_err(io::Error::other)?;
        line.push(b'\n');
        inner.file.write_all(&line)?;
        inner.file.sync_data()?;
        inner.last = n;
        Ok(record)
    }

    /// Records with a sequence number above `since`, oldest first.
    pub fn since(&self, since: u64) -> io::Result<Vec<Value>> {
        let f = File::open(&self.path)?;
        Ok(io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .filter(|v| {
                v["id"]
                    .as_str()
                    .and_then(id_number)
                    .is_some_and(|n| n > since)
            })
            .collect())
    }
}

/// `2026-11-22T14:35:23.101Z`
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_continue_across_reopen_and_filter_by_since() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(dir.path()).unwrap();
        let r1 = a.append("rollback", Map::new()).unwrap();
        assert_eq!(r1["id"], "rb-000001");
        assert!(r1["timestamp"].as_str().unwrap().ends_with('Z'));
        drop(a);
        let a = Audit::open(dir.path()).unwrap();
        let r2 = a.append("resume", Map::new()).unwrap();
        assert_eq!(r2["id"], "rs-000002");
        let after = a.since(1).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0]["kind"], "resume");
    }
}
