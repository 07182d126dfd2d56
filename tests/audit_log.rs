//! The audit log as the admin API and the evaluator use it: rotation by size, one id
//! sequence across files and restarts, bounded reads after an id, records the log alone
//! can stamp, and crash leftovers (a torn last line) that never become errors.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rollgate::control::audit::{id_number, log_files, Audit, AUDIT_FILE};
use serde_json::{json, Map, Value};

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object: {v}"),
    }
}

/// A record of about 100 bytes.
fn append(a: &Audit) -> Value {
    a.append(
        "weights",
        fields(json!({"route": "chat", "pad": "x".repeat(40)})),
    )
    .unwrap()
}

fn seq(record: &Value) -> u64 {
    id_number(record["id"].as_str().unwrap()).unwrap()
}

fn seqs(records: &[Value]) -> Vec<u64> {
    records.iter().map(seq).collect()
}

fn rotated(dir: &Path, k: u64) -> PathBuf {
    dir.join(format!("{AUDIT_FILE}.{k}"))
}

fn size(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

#[test]
fn rotation_happens_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let limit = 1024;
    let a = Audit::open_with_limit(d, limit, 8).unwrap();
    let record_len = serde_json::to_vec(&append(&a)).unwrap().len() as u64 + 1;
    let per_file = limit / record_len;
    for _ in 1..per_file {
        append(&a);
        assert!(!rotated(d, 1).exists(), "rotated before the limit");
    }
    assert_eq!(size(a.path()), per_file * record_len);
    append(&a); // would pass the limit: rotates first
    assert_eq!(size(&rotated(d, 1)), per_file * record_len);
    assert_eq!(size(a.path()), record_len);
    for _ in 0..2 * per_file {
        append(&a);
        assert!(size(a.path()) <= limit);
    }
    assert!(rotated(d, 3).exists() && !rotated(d, 4).exists());
    for k in 1..=3 {
        let s = size(&rotated(d, k));
        assert!(s <= limit && s + record_len > limit, "file .{k}: {s} bytes");
    }
    // Oldest first, ending with the current file.
    let files = log_files(d);
    assert_eq!(files.first().unwrap(), &rotated(d, 3));
    assert_eq!(files.last().unwrap(), &d.join(AUDIT_FILE));
    assert_eq!(files.len(), 4);
}

#[test]
fn a_record_bigger_than_the_limit_gets_a_file_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let a = Audit::open_with_limit(dir.path(), 200, 8).unwrap();
    append(&a);
    let big = a
        .append("drill", fields(json!({"pad": "y".repeat(500)})))
        .unwrap();
    append(&a);
    assert_eq!(seqs(&a.since(0).unwrap()), vec![1, 2, 3]);
    assert_eq!(a.since(1).unwrap()[0], big);
    assert!(rotated(dir.path(), 2).exists());
}

#[test]
fn ids_continue_across_rotation_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = Audit::open_with_limit(d, 512, 8).unwrap();
    for i in 1..=20 {
        assert_eq!(seq(&append(&a)), i);
    }
    assert!(rotated(d, 2).exists());
    drop(a);
    let a = Audit::open_with_limit(d, 512, 8).unwrap();
    assert_eq!(a.last_seq(), 20);
    assert_eq!(a.append("resume", Map::new()).unwrap()["id"], "rs-000021");
    assert_eq!(a.last_seq(), 21);
    drop(a);

    // A crash right after a rotation: `audit.jsonl` empty, the last id in `.1`.
    let rotated_now: Vec<u64> = (1..=8).filter(|&k| rotated(d, k).exists()).collect();
    for &k in rotated_now.iter().rev() {
        fs::rename(rotated(d, k), rotated(d, k + 1)).unwrap();
    }
    fs::rename(d.join(AUDIT_FILE), rotated(d, 1)).unwrap();
    fs::File::create(d.join(AUDIT_FILE)).unwrap();
    let a = Audit::open_with_limit(d, 512, 8).unwrap();
    assert_eq!(seq(&append(&a)), 22);
    drop(a);

    // ... or before the new file was created.
    fs::remove_file(d.join(AUDIT_FILE)).unwrap(); // holds record 22 only
    let a = Audit::open(d).unwrap();
    assert_eq!(seq(&append(&a)), 22, "record 22 went with its file");
    assert_eq!(seq(&append(&a)), 23);
}

#[test]
fn since_across_rotated_files_returns_exactly_the_records_after_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = Audit::open_with_limit(dir.path(), 800, 8).unwrap();
    let total = 40;
    let mut written = Vec::new();
    for _ in 0..total {
        written.push(append(&a));
    }
    assert!(rotated(dir.path(), 5).exists(), "spread over several files");
    for n in 0..=total + 2 {
        let got = a.since(n).unwrap();
        let want: Vec<Value> = written.iter().filter(|r| seq(r) > n).cloned().collect();
        assert_eq!(got, want, "since {n}");
    }
    // Bounded: pages of 7 walk the whole log, across file boundaries, with `more` right.
    let (mut from, mut seen) = (0, Vec::new());
    loop {
        let (page, more) = a.since_limited(from, 7).unwrap();
        assert!(page.len() <= 7);
        seen.extend(seqs(&page));
        if !more {
            break;
        }
        assert_eq!(page.len(), 7);
        from = seq(page.last().unwrap());
    }
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    let (page, more) = a.since_limited(total - 7, 7).unwrap();
    assert_eq!((page.len(), more), (7, false));
    let (page, more) = a.since_limited(0, 0).unwrap();
    assert!(page.is_empty() && more);
}

#[test]
fn a_torn_last_line_is_skipped_on_reopen_and_ids_continue() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = Audit::open(d).unwrap();
    for _ in 0..3 {
        append(&a);
    }
    drop(a);
    // A crash mid-write: half a record, no newline.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(d.join(AUDIT_FILE))
        .unwrap();
    f.write_all(br#"{"id":"rb-000004","timestamp":"2026-11-22T14:3"#)
        .unwrap();
    drop(f);

    let a = Audit::open(d).unwrap();
    assert_eq!(seqs(&a.since(0).unwrap()), vec![1, 2, 3]);
    let next = a.append("rollback", Map::new()).unwrap();
    assert_eq!(next["id"], "rb-000004");
    let all = a.since(0).unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3, 4]);
    assert_eq!(
        all[3], next,
        "the new record is whole, not glued to the torn one"
    );
    drop(a);
    let a = Audit::open(d).unwrap();
    assert_eq!(seq(&append(&a)), 5);
    assert_eq!(seqs(&a.since(2).unwrap()), vec![3, 4, 5]);
}

#[test]
fn lines_that_are_not_records_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = Audit::open(d).unwrap();
    append(&a);
    drop(a);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(d.join(AUDIT_FILE))
        .unwrap();
    f.write_all(b"not json\n\n{\"no_id\":true}\n[1,2]\n\xff\xfe\n")
        .unwrap();
    drop(f);
    let a = Audit::open(d).unwrap();
    append(&a);
    assert_eq!(seqs(&a.since(0).unwrap()), vec![1, 2]);
}

#[test]
fn a_client_cannot_set_id_kind_or_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = Audit::open(d).unwrap();
    let forged = fields(json!({
        "id": "rb-999999",
        "kind": "promote",
        "timestamp": "1970-01-01T00:00:00.000Z",
        "route": "chat",
    }));
    let r = a.append("rollback", forged).unwrap();
    assert_eq!(r["id"], "rb-000001");
    assert_eq!(r["kind"], "rollback");
    assert_ne!(r["timestamp"], "1970-01-01T00:00:00.000Z");
    assert!(r["timestamp"].as_str().unwrap().starts_with("20"));
    assert_eq!(r["route"], "chat", "other fields are kept");
    assert_eq!(a.since(0).unwrap(), vec![r.clone()], "written as returned");
    drop(a);
    // The forged id did not move the sequence, in memory or on reopen.
    let a = Audit::open(d).unwrap();
    assert_eq!(a.append("pause", Map::new()).unwrap()["id"], "pa-000002");
}

#[test]
fn rotated_files_beyond_keep_files_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = Audit::open_with_limit(d, 300, 3).unwrap();
    for _ in 0..60 {
        append(&a);
    }
    for k in 1..=3 {
        assert!(rotated(d, k).exists(), ".{k} kept");
    }
    assert!(!rotated(d, 4).exists(), ".4 deleted");
    assert_eq!(log_files(d).len(), 4);
    // What is left is the newest records, contiguous, ending with the last.
    let kept = seqs(&a.since(0).unwrap());
    assert!(kept[0] > 1, "the oldest records went with their files");
    assert_eq!(kept, (kept[0]..=60).collect::<Vec<_>>());

    // Files left by a larger `keep_files` go at the next rotation.
    drop(a);
    let a = Audit::open_with_limit(d, 300, 1).unwrap();
    for _ in 0..3 {
        append(&a);
    }
    assert!(rotated(d, 1).exists());
    assert!(!rotated(d, 2).exists() && !rotated(d, 3).exists());
    assert_eq!(seqs(&a.since(0).unwrap()).last(), Some(&63));
}

#[test]
fn readers_see_every_record_while_the_log_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let a = std::sync::Arc::new(Audit::open_with_limit(dir.path(), 1500, 8).unwrap());
    let total = 120;
    let writer = {
        let a = a.clone();
        std::thread::spawn(move || {
            for _ in 0..total {
                append(&a);
            }
        })
    };
    let mut seen = Vec::new();
    let mut last = 0;
    while last < total {
        let page = a.since(last).unwrap();
        if let Some(r) = page.last() {
            last = seq(r);
        }
        seen.extend(seqs(&page));
    }
    writer.join().unwrap();
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
}

#[test]
fn a_missing_state_dir_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("nested").join("state");
    let a = Audit::open(&d).unwrap();
    assert!(a.since(0).unwrap().is_empty());
    assert_eq!(a.path(), d.join(AUDIT_FILE));
    append(&a);
    assert_eq!(a.since(0).unwrap().len(), 1);
}
