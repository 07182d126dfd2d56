//! Persisted runtime state: quarantines, overrides, pauses, promoted baselines and rollout
//! progress survive restarts. Written as `state_dir/state.json` by write-temp, fsync,
//! rename, fsync-directory, so a crash leaves either the old file or the new one.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::routing::table::RuntimeState;

pub const STATE_FILE: &str = "state.json";

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

/// Reads the state, or the default when there is none yet. A file that exists but does not
/// parse is an error: silently forgetting a quarantine would put a bad version back.
pub fn load(state_dir: &Path) -> io::Result<RuntimeState> {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e} (fix or remove the file)", p.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(RuntimeState::default()),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
    }
}

/// Writes the state durably. Blocking: call from `spawn_blocking` or a cold path.
pub fn save(state_dir: &Path, state: &RuntimeState) -> io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let final_path = path(state_dir);
    let tmp = state_dir.join(format!(".{STATE_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &final_path)?;
    // The rename itself must reach the disk too.
    if let Ok(dir) = std::fs::File::open(state_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_missing_is_default() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), RuntimeState::default());
        let mut s = RuntimeState::default();
        s.quarantined.insert("v2.5".into(), "5be1".into());
        s.paused.insert("chat".into());
        save(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path()).unwrap(), s);
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        assert!(load(dir.path())
            .unwrap_err()
            .to_string()
            .contains("state.json"));
    }
}
