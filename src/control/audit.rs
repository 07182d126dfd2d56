//! The audit log: `state_dir/audit.jsonl`, one JSON object a line, each fsync'd before the
//! decision it records is reported done.
//!
//! Every record has `seq` (a sequence number shared by all kinds, so it orders records),
//! `id`, `timestamp` (RFC 3339, milliseconds, UTC) and `kind`. The log sets these itself:
//! fields passed to [`Audit::append`] cannot override them. A record's `id` is its kind's
//! prefix and its `seq` (`rb-000042`), except for a decision replicated through a fleet
//! (SPEC section 10), whose id is the same in every replica's log: the prefix and the
//! command's id (`rb-cmd-3fa9c0e1d2b4a576`, [`Audit::append_as`]). Logs written before
//! `seq` existed are read by the number in their ids.
//!
//! # Rotation
//!
//! When a record would take `audit.jsonl` past its limit ([`MAX_FILE_BYTES`] unless set with
//! [`Audit::open_with_limit`]), the file is renamed `audit.jsonl.1`, older files shift up
//! (`.1` -> `.2` ...), the oldest beyond [`KEEP_FILES`] is deleted, the directory is
//! fsync'd and a new `audit.jsonl` starts. Ids continue one sequence across files and
//! restarts: [`Audit::open`] reads the last id from the tail of the newest non-empty file.
//!
//! # Reading
//!
//! Ids grow in file order, through `audit.jsonl.8` ... `.1` to `audit.jsonl`, so
//! [`Audit::since_limited`] reads only what it returns: files newest first until one whose
//! first id is at or below `n`, in that file a bisection by byte offset to the first record
//! after `n`, then at most `limit` records. A torn last line (a crash mid-write) is skipped;
//! [`Audit::open`] ends it with a newline so the next record starts on a line of its own. A
//! line that is not a JSON record is skipped with a warning, never an error.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Deserialize;
use serde_json::{Map, Value};

pub const AUDIT_FILE: &str = "audit.jsonl";

/// `audit.jsonl` is rotated before a record would take it past this size.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Rotated files kept (`audit.jsonl.1` ... `audit.jsonl.8`): with the default size, 512 MiB
/// of history besides the current file.
pub const KEEP_FILES: usize = 8;

/// Records [`Audit::since`] returns at most.
pub const SINCE_LIMIT: usize = 10_000;

/// How much of a file's end [`Audit::open`] reads for the last id (more only if that holds
/// no complete record), and the span below which a bisection stops and reads on.
const TAIL_BYTES: u64 = 64 << 10;

/// The append-only audit log.
#[derive(Debug)]
pub struct Audit {
    dir: PathBuf,
    path: PathBuf,
    max_bytes: u64,
    keep_files: usize,
    /// Held while one record is written and fsync'd, while the files rotate, and while a
    /// reader opens the files (not while it reads them): decisions are rare (cold path),
    /// and the lock keeps ids in file order. Never taken on the request path.
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `audit.jsonl`, opened to append (and read, for repairs).
    file: File,
    /// Its length: complete records only, so readers read up to here and no further.
    len: u64,
    /// The last id's sequence number.
    last: u64,
    /// A write failed part-way: check the file's end before the next record.
    dirty: bool,
}

fn prefix(kind: &str) -> &'static str {
    match kind {
        "rollback" => "rb",
        "rollback_completed" => "rc",
        "fault" => "ft",
        "recovered" => "rv",
        "promote" => "pr",
        "resume" => "rs",
        "weights" => "wt",
        "pause" => "pa",
        "rollout_step" => "ro",
        "config_reload" => "cr",
        "drill" => "dr",
        "degraded" => "dg",
        "override_dropped" => "od",
        _ => "ev",
    }
}

/// The sequence number of a local id such as `rb-000042` (`None` for a fleet-wide id such
/// as `rb-cmd-3fa9c0e1d2b4a576`).
pub fn id_number(id: &str) -> Option<u64> {
    let (_, n) = id.split_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// A record's sequence number: its `seq`, or for records from before `seq`, its id's.
pub fn record_seq(record: &Value) -> Option<u64> {
    record["seq"]
        .as_u64()
        .or_else(|| record["id"].as_str().and_then(id_number))
}

/// The audit files in `state_dir`, oldest first (`audit.jsonl.N` ... `audit.jsonl.1`, then
/// `audit.jsonl`), those that exist. For tools that read the whole history.
pub fn log_files(state_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = rotated(state_dir)
        .unwrap_or_default()
        .into_iter()
        .rev()
        .map(|k| rotated_path(state_dir, k))
        .collect();
    let current = state_dir.join(AUDIT_FILE);
    if current.exists() {
        files.push(current);
    }
    files
}

fn rotated_path(dir: &Path, k: u64) -> PathBuf {
    dir.join(format!("{AUDIT_FILE}.{k}"))
}

/// The numbers `k` of the rotated files `audit.jsonl.k` in `dir`, ascending (newest first).
fn rotated(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ks = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let k = name
            .to_str()
            .and_then(|n| n.strip_prefix(AUDIT_FILE)?.strip_prefix('.'))
            .and_then(|k| k.parse::<u64>().ok());
        if let Some(k) = k.filter(|&k| k > 0) {
            ks.push(k);
        }
    }
    ks.sort_unstable();
    Ok(ks)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn with_path(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The sequence number of a line that is a JSON record; `None` for anything else.
fn record_id(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        seq: Option<u64>,
        id: String,
    }
    serde_json::from_slice::<Head>(line)
        .ok()
        .and_then(|h| h.seq.or_else(|| id_number(&h.id)))
}

/// Bytes `start..end` of `file`.
fn read_range(mut file: &File, start: u64, end: u64) -> io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((end - start) as usize);
    file.take(end - start).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The highest id among the complete records near the end of `file` (`len` bytes): the last
/// [`TAIL_BYTES`], more only if those hold no record.
fn last_id(file: &File, len: u64) -> io::Result<Option<u64>> {
    let mut window = TAIL_BYTES;
    loop {
        let start = len.saturating_sub(window);
        let buf = read_range(file, start, len)?;
        let mut lines = buf.split(|&b| b == b'\n');
        if start > 0 {
            lines.next(); // the end of a line that starts before the window
        }
        let best = lines.filter_map(record_id).max();
        if best.is_some() || start == 0 {
            return Ok(best);
        }
        window = window.saturating_mul(4);
    }
}

/// Ends `file` with a newline if it ends in a torn line, so the next record starts a line of
/// its own; returns the file's length.
fn end_torn_line(mut file: &File, path: &Path) -> io::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let mut last = [0u8];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(len);
    }
    tracing::warn!(
        file = %path.display(),
        "the audit log ends in a torn record (a crash or a failed write); it is kept as an \
         invalid line and skipped"
    );
    file.write_all(b"\n")?;
    file.sync_data()?;
    Ok(len + 1)
}

/// Lines of one file up to a byte bound, with their offsets.
struct Lines {
    path: PathBuf,
    reader: BufReader<File>,
    /// Offset of the next line.
    at: u64,
    /// Nothing at or past this offset is read.
    end: u64,
    line: Vec<u8>,
}

impl Lines {
    fn new(path: PathBuf, file: File, end: u64) -> Lines {
        Lines {
            path,
            reader: BufReader::new(file),
            at: 0,
            end,
            line: Vec::new(),
        }
    }

    fn seek(&mut self, pos: u64) -> io::Result<()> {
        self.reader.seek(SeekFrom::Start(pos))?;
        self.at = pos;
        Ok(())
    }

    /// Reads the next line into `self.line` (without its newline); returns its offset and
    /// whether it is complete (a line cut off by the end of the file is torn).
    fn next_line(&mut self) -> io::Result<Option<(u64, bool)>> {
        if self.at >= self.end {
            return Ok(None);
        }
        self.line.clear();
        let start = self.at;
        let n = (&mut self.reader)
            .take(self.end - start)
            .read_until(b'\n', &mut self.line)?;
        if n == 0 {
            return Ok(None);
        }
        self.at += n as u64;
        let complete = self.line.last() == Some(&b'\n');
        if complete {
            self.line.pop();
        }
        Ok(Some((start, complete)))
    }

    /// The first complete record starting at or after `pos` and before `limit`: its offset
    /// and sequence number.
    fn first_record_from(&mut self, pos: u64, limit: u64) -> io::Result<Option<(u64, u64)>> {
        if pos == 0 {
            self.seek(0)?;
        } else {
            // The line holding byte `pos - 1` ends before the first line at or after `pos`.
            self.seek(pos - 1)?;
            self.next_line()?;
        }
        while let Some((start, complete)) = self.next_line()? {
            if start >= limit {
                break;
            }
            if let Some(id) = complete.then(|| record_id(&self.line)).flatten() {
                return Ok(Some((start, id)));
            }
        }
        Ok(None)
    }

    /// An offset at which a line starts and before which every record's id is at most
    /// `after`, close below the first record with a higher id: a bisection over offsets,
    /// since ids grow through the file.
    fn seek_after(&mut self, after: u64) -> io::Result<u64> {
        let (mut lo, mut hi) = (0, self.end);
        while hi - lo > TAIL_BYTES {
            let mid = lo + (hi - lo) / 2;
            match self.first_record_from(mid, hi)? {
                Some((start, id)) if id <= after => lo = start,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    /// Appends the records after `after` from the current offset to `out`, until `out` holds
    /// `limit`; returns whether there were more.
    fn read_after(&mut self, after: u64, limit: usize, out: &mut Vec<Value>) -> io::Result<bool> {
        while let Some((start, complete)) = self.next_line()? {
            if !complete {
                // A record being written when the file was read, or cut short by a crash.
                tracing::debug!(file = %self.path.display(), offset = start, "skipping a torn audit line");
                continue;
            }
            if self.line.trim_ascii().is_empty() {
                continue;
            }
            let record = serde_json::from_slice::<Value>(&self.line).ok();
            let Some(n) = record.as_ref().and_then(record_seq) else {
                tracing::warn!(
                    file = %self.path.display(),
                    offset = start,
                    "skipping an audit line that is not a JSON record with an id"
                );
                continue;
            };
            if n <= after {
                continue;
            }
            if out.len() >= limit {
                return Ok(true);
            }
            out.extend(record);
        }
        Ok(false)
    }
}

impl Audit {
    /// Opens (creating) the log in `state_dir` and continues its id sequence, rotating at
    /// [`MAX_FILE_BYTES`] and keeping [`KEEP_FILES`] old files.
    pub fn open(state_dir: &Path) -> io::Result<Audit> {
        Audit::open_with_limit(state_dir, MAX_FILE_BYTES, KEEP_FILES)
    }

    /// As [`open`](Self::open), rotating `audit.jsonl` before a record would take it past
    /// `max_bytes` and keeping `keep_files` rotated files (at least 1: the newest rotated
    /// file holds the last id after a rotation).
    pub fn open_with_limit(
        state_dir: &Path,
        max_bytes: u64,
        keep_files: usize,
    ) -> io::Result<Audit> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            io::Error::new(e.kind(), format!("state_dir {}: {e}", state_dir.display()))
        })?;
        let path = state_dir.join(AUDIT_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(with_path(&path))?;
        if !existed {
            sync_dir(state_dir).map_err(with_path(state_dir))?;
        }
        let len = end_torn_line(&file, &path).map_err(with_path(&path))?;
        let mut last = last_id(&file, len).map_err(with_path(&path))?;
        if last.is_none() {
            // Empty (just rotated, or new): the newest rotated file with a record has it.
            for k in rotated(state_dir).map_err(with_path(state_dir))? {
                let p = rotated_path(state_dir, k);
                let f = File::open(&p).map_err(with_path(&p))?;
                let len = f.metadata()?.len();
                last = last_id(&f, len).map_err(with_path(&p))?;
                if last.is_some() {
                    break;
                }
            }
        }
        Ok(Audit {
            dir: state_dir.to_path_buf(),
            path,
            max_bytes: max_bytes.max(1),
            keep_files: keep_files.max(1),
            inner: Mutex::new(Inner {
                file,
                len,
                last: last.unwrap_or(0),
                dirty: false,
            }),
        })
    }

    /// The current file, `state_dir/audit.jsonl`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sequence number of the last record written (0 for none): a cursor for "from now
    /// on" without reading the log.
    pub fn last_seq(&self) -> u64 {
        self.inner().last
    }

    /// From now on every append fails as on a full disk: writes go to `/dev/full`.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self) {
        let full = File::options().append(true).open("/dev/full");
        self.inner().file = full.expect("/dev/full");
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a record of `kind` with `fields`, durably, and returns it. `id`, `kind` and
    /// `timestamp` are the log's: those keys in `fields` are overwritten. Blocking (write +
    /// fsync, a rotation now and then): call it from `spawn_blocking` or a background task,
    /// never from the request path.
    pub fn append(&self, kind: &str, fields: Map<String, Value>) -> io::Result<Value> {
        self.append_as(kind, fields, None)
    }

    /// [`append`](Self::append), with the fleet-wide id `{prefix}-{command_id}` when
    /// `command_id` is given: the same record id on every replica that applies the command.
    pub fn append_as(
        &self,
        kind: &str,
        fields: Map<String, Value>,
        command_id: Option<&str>,
    ) -> io::Result<Value> {
        let mut inner = self.inner();
        if inner.dirty {
            inner.len = end_torn_line(&inner.file, &self.path)?;
            inner.dirty = false;
        }
        let n = inner.last + 1;
        let mut record = fields;
        let id = match command_id {
            Some(c) => format!("{}-{c}", prefix(kind)),
            None => format!("{}-{n:06}", prefix(kind)),
        };
        record.insert("id".into(), Value::String(id));
        record.insert("seq".into(), Value::from(n));
        record.insert(
            "timestamp".into(),
            Value::String(timestamp(SystemTime::now())),
        );
        record.insert("kind".into(), Value::String(kind.to_string()));
        let record = Value::Object(record);
        let mut line = serde_json::to_vec(&record).map_err(io::Error::other)?;
        line.push(b'\n');
        if inner.len > 0 && inner.len + line.len() as u64 > self.max_bytes {
            if let Err(e) = self.rotate(&mut inner) {
                // The record matters more than the file's size: write it where we are, and
                // try to rotate again before the next one.
                tracing::warn!(file = %self.path.display(), "rotating the audit log failed: {e}");
            }
        }
        let written = inner
            .file
            .write_all(&line)
            .and_then(|()| inner.file.sync_data());
        if let Err(e) = written {
            inner.dirty = true;
            return Err(e);
        }
        inner.len += line.len() as u64;
        inner.last = n;
        Ok(record)
    }

    /// `audit.jsonl` -> `audit.jsonl.1`, `.1` -> `.2` ..., the oldest beyond `keep_files`
    /// deleted, then a new `audit.jsonl`. Each step leaves the files in id order, so a crash
    /// or an error part-way loses nothing and the next rotation carries on.
    fn rotate(&self, inner: &mut Inner) -> io::Result<()> {
        let dir = &self.dir;
        for k in rotated(dir)?.into_iter().rev() {
            let from = rotated_path(dir, k);
            if k >= self.keep_files as u64 {
                std::fs::remove_file(&from).map_err(with_path(&from))?;
            } else {
                std::fs::rename(&from, rotated_path(dir, k + 1)).map_err(with_path(&from))?;
            }
        }
        match std::fs::rename(&self.path, rotated_path(dir, 1)) {
            // Gone already: an earlier rotation failed after this step.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            r => r.map_err(with_path(&self.path))?,
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)
            .map_err(with_path(&self.path))?;
        sync_dir(dir).map_err(with_path(dir))?;
        inner.len = file.metadata()?.len();
        inner.file = file;
        Ok(())
    }

    /// The sequence number of the record with `id`, newest file first (a fleet-wide id
    /// carries no number: `GET /api/v1/events?since=rb-cmd-...` finds it here).
    pub fn seq_of(&self, id: &str) -> io::Result<Option<u64>> {
        let needle = format!("\"id\":{}", Value::String(id.to_string()));
        for path in log_files(&self.dir).into_iter().rev() {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for line in BufReader::new(file).split(b'\n') {
                let line = line?;
                if !line.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    continue;
                }
                let record = serde_json::from_slice::<Value>(&line).ok();
                if let Some(r) = record.filter(|r| r["id"] == id) {
                    return Ok(record_seq(&r));
                }
            }
        }
        Ok(None)
    }

    /// Up to [`SINCE_LIMIT`] records with a sequence number above `since`, oldest first.
    pub fn since(&self, since: u64) -> io::Result<Vec<Value>> {
        self.since_limited(since, SINCE_LIMIT)
            .map(|(records, _)| records)
    }

    /// Up to `limit` records with a sequence number above `since`, oldest first, and whether
    /// there are more (ask again from the last one's id). Reads only the files that can hold
    /// such records, and in the oldest of them only from about the first one on.
    pub fn since_limited(&self, since: u64, limit: usize) -> io::Result<(Vec<Value>, bool)> {
        // Newest first: (path, file, bytes to read). Opened under the lock so that a
        // rotation cannot shift names in between, and the current file is read only up to
        // its last complete record; read after it, as the handles keep their files.
        let files = {
            let inner = self.inner();
            let mut files = Vec::new();
            match File::open(&self.path) {
                Ok(f) => files.push((self.path.clone(), f, inner.len)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_path(&self.path)(e)),
            }
            for k in rotated(&self.dir)? {
                let p = rotated_path(&self.dir, k);
                match File::open(&p) {
                    Ok(f) => {
                        let len = f.metadata()?.len();
                        files.push((p, f, len));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(with_path(&p)(e)),
                }
            }
            files
        };
        // Newest first, down to the first file that starts at or below `since`.
        let mut wanted = Vec::new();
        for (path, file, len) in files {
            let mut lines = Lines::new(path, file, len);
            let Some((_, first)) = lines.first_record_from(0, len)? else {
                continue; // no records at all
            };
            let last_needed = first <= since;
            wanted.push((lines, first));
            if last_needed {
                break;
            }
        }
        let mut out = Vec::new();
        for (mut lines, first) in wanted.into_iter().rev() {
            let from = if first <= since {
                lines.seek_after(since)?
            } else {
                0
            };
            lines.seek(from)?;
            if lines.read_after(since, limit, &mut out)? {
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }
}

/// `2026-11-22T14:35:23.101Z`
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(records: &[Value]) -> Vec<u64> {
        records
            .iter()
            .map(|r| id_number(r["id"].as_str().unwrap()).unwrap())
            .collect()
    }

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

    #[test]
    fn kinds_have_their_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(dir.path()).unwrap();
        let kinds = [
            ("rollback_completed", "rc-000001"),
            ("override_dropped", "od-000002"),
            ("something_new", "ev-000003"),
        ];
        for (kind, id) in kinds {
            assert_eq!(a.append(kind, Map::new()).unwrap()["id"], id);
        }
    }

    /// Writes records 1..=n straight into `audit.jsonl` (no fsync per record), with a line
    /// that is not JSON every 997 records and a blank line every 1009.
    fn write_big_log(dir: &Path, n: u64) {
        let mut text = String::new();
        for i in 1..=n {
            text.push_str(&format!(
                "{{\"id\":\"ev-{i:06}\",\"kind\":\"x\",\"pad\":\"{}\"}}\n",
                "p".repeat((i % 50) as usize)
            ));
            if i % 997 == 0 {
                text.push_str("not json {\n");
            }
            if i % 1009 == 0 {
                text.push('\n');
            }
        }
        std::fs::write(dir.join(AUDIT_FILE), text).unwrap();
    }

    #[test]
    fn since_bisects_a_big_file_and_returns_exactly_the_records_after() {
        let dir = tempfile::tempdir().unwrap();
        let n = 20_000;
        write_big_log(dir.path(), n);
        assert!(
            std::fs::metadata(dir.path().join(AUDIT_FILE))
                .unwrap()
                .len()
                > 10 * TAIL_BYTES
        );
        let a = Audit::open(dir.path()).unwrap();
        for since in [0, 1, 996, 997, 998, 5_000, 12_345, 19_999, 20_000, 30_000] {
            let (got, more) = a.since_limited(since, usize::MAX).unwrap();
            let want: Vec<u64> = (since + 1..=n).collect();
            assert_eq!(ids(&got), want, "since {since}");
            assert!(!more);
        }
        let (got, more) = a.since_limited(12_000, 100).unwrap();
        assert_eq!(ids(&got), (12_001..=12_100).collect::<Vec<_>>());
        assert!(more);
        let (got, more) = a.since_limited(19_900, 100).unwrap();
        assert_eq!(got.len(), 100);
        assert!(!more, "exactly the limit left");
        assert_eq!(a.since(0).unwrap().len(), SINCE_LIMIT);
        assert_eq!(a.append("x", Map::new()).unwrap()["id"], "ev-020001");
    }

    #[test]
    fn seek_after_lands_close_below_the_first_record_after() {
        let dir = tempfile::tempdir().unwrap();
        write_big_log(dir.path(), 20_000);
        let path = dir.path().join(AUDIT_FILE);
        let file = File::open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        let mut lines = Lines::new(path, file, len);
        for after in [0, 500, 10_000, 19_999] {
            let from = lines.seek_after(after).unwrap();
            let (start, id) = lines.first_record_from(from, len).unwrap().unwrap();
            assert_eq!(start, from, "a record starts where the read starts");
            assert!(
                id <= after + 1,
                "nothing after {after} is skipped (found {id})"
            );
            assert!(
                after == 0 || id <= after,
                "{id} is not the first after {after}"
            );
            // The read starts within a bisection span of the wanted record.
            let mut scan = Lines::new(lines.path.clone(), File::open(&lines.path).unwrap(), len);
            scan.seek(from).unwrap();
            let mut first_after = None;
            while let Some((s, complete)) = scan.next_line().unwrap() {
                if complete && record_id(&scan.line).is_some_and(|i| i > after) {
                    first_after = Some(s);
                    break;
                }
            }
            let first_after = first_after.unwrap();
            assert!(
                first_after - from <= 2 * TAIL_BYTES,
                "read {} bytes too many",
                first_after - from
            );
        }
    }

    #[test]
    fn open_finds_the_last_id_past_a_tail_of_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("{\"id\":\"rb-000041\"}\n{\"id\":\"rb-000042\"}\n");
        for _ in 0..3_000 {
            text.push_str("garbage that is longer than a few bytes, to fill 64 KiB\n");
        }
        std::fs::write(dir.path().join(AUDIT_FILE), text).unwrap();
        let a = Audit::open(dir.path()).unwrap();
        assert_eq!(a.append("pause", Map::new()).unwrap()["id"], "pa-000043");
    }

    #[test]
    fn a_failed_rotation_keeps_the_record_and_retries() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open_with_limit(dir.path(), 1, 2).unwrap();
        a.append("x", Map::new()).unwrap();
        // A non-empty directory named `audit.jsonl.2` cannot be deleted as the oldest file.
        std::fs::create_dir(rotated_path(dir.path(), 2)).unwrap();
        std::fs::create_dir(rotated_path(dir.path(), 2).join("keep")).unwrap();
        a.append("x", Map::new()).unwrap(); // the rotation fails: written to audit.jsonl
        assert!(!rotated_path(dir.path(), 1).exists());
        std::fs::remove_dir_all(rotated_path(dir.path(), 2)).unwrap();
        a.append("x", Map::new()).unwrap();
        assert_eq!(ids(&a.since(0).unwrap()), vec![1, 2, 3]);
    }
}
