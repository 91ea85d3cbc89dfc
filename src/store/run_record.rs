//! The run record: what a later vtpmd needs to find a guest's swtpm again
//! after this one exits or crashes (`<runtime_dir>/<uuid>.run`, 0600,
//! vtpmd's).
//!
//! ```text
//! vtpmd-run 1
//! pid=4242
//! start_time=987654
//! uid=1879048192
//! ctrl=2049:1311
//! lost_write=SWTPM_NVRAM_StoreData: Error (fatal)
//! ```
//!
//! `lost_write` is there only once the swtpm has said it could not store
//! its state: a later vtpmd that adopts it must still end its run
//! `failed`, though the log line went with the vtpmd that read it.
//!
//! It lives in the runtime directory (RAM) because it describes processes,
//! which a reboot ends anyway. It is written whole to a temporary file and
//! renamed over the old one, so a reader sees the old or the new record,
//! and read with `O_NOFOLLOW | O_NONBLOCK`, bounded, from a regular file
//! only: the runtime directory is vtpmd's, but nothing read from a
//! directory is trusted further than it must be. The pid in it is only a
//! hint: [`crate::swtpm::spawn::adopt`] checks the process behind it.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::StoreError;

const MAGIC: &str = "vtpmd-run 1";
/// A record is well under 400 bytes.
const MAX_RECORD: u64 = 1024;
/// How much of swtpm's line `lost_write` keeps.
const MAX_LOST_WRITE: usize = 200;

/// What vtpmd recorded about one running swtpm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub pid: u32,
    /// Clock ticks since boot when it started (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// Its uid when it runs as the guest's own (`None`: vtpmd's user).
    pub uid: Option<u32>,
    /// (st_dev, st_ino) of the control socket vtpmd bound for it.
    pub ctrl_id: (u64, u64),
    /// swtpm's line saying it could not store its state, once it has.
    pub lost_write: Option<String>,
}

impl RunRecord {
    fn encode(&self) -> String {
        let mut text = format!(
            "{MAGIC}\npid={}\nstart_time={}\n",
            self.pid, self.start_time
        );
        if let Some(uid) = self.uid {
            text.push_str(&format!("uid={uid}\n"));
        }
        text.push_str(&format!("ctrl={}:{}\n", self.ctrl_id.0, self.ctrl_id.1));
        if let Some(line) = &self.lost_write {
            text.push_str(&lost_write_line(line));
        }
        text
    }

    /// The record in `text`; `None` for anything but exactly the format
    /// above (every key once, in order, `uid` optional).
    fn decode(text: &str) -> Option<RunRecord> {
        let mut lines = text.strip_suffix('\n')?.split('\n');
        if lines.next()? != MAGIC {
            return None;
        }
        let pid = lines.next()?.strip_prefix("pid=")?.parse().ok()?;
        let start_time = lines.next()?.strip_prefix("start_time=")?.parse().ok()?;
        let mut next = lines.next()?;
        let uid = match next.strip_prefix("uid=") {
            Some(uid) => {
                let uid = uid.parse().ok()?;
                next = lines.next()?;
                Some(uid)
            }
            None => None,
        };
        let (dev, ino) = next.strip_prefix("ctrl=")?.split_once(':')?;
        let ctrl_id = (dev.parse().ok()?, ino.parse().ok()?);
        let lost_write = match lines.next() {
            Some(line) => Some(line.strip_prefix("lost_write=")?.to_owned()),
            None => None,
        };
        if lines.next().is_some() || pid == 0 {
            return None;
        }
        Some(RunRecord {
            pid,
            start_time,
            uid,
            ctrl_id,
            lost_write,
        })
    }
}

/// `lost_write=…\n`: one line of printable ASCII, whatever swtpm wrote.
fn lost_write_line(line: &str) -> String {
    let line: String = line
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(MAX_LOST_WRITE)
        .collect();
    format!("lost_write={line}\n")
}

/// Appends `lost_write` to the record at `path` with one `write(2)`: no new
/// file, and within the record's one page, so it needs no space on a file
/// system that has none left. A record that has one already is left as it
/// is.
pub(super) fn append_lost_write(path: &Path, line: &str) -> Result<(), StoreError> {
    let record = read(path)?.ok_or_else(|| StoreError::BadRunRecord {
        path: path.to_owned(),
    })?;
    if record.lost_write.is_some() {
        return Ok(());
    }
    let err = |source| StoreError::WriteRunRecord {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    if !file.metadata().map_err(err)?.is_file() {
        return Err(StoreError::BadRunRecord {
            path: path.to_owned(),
        });
    }
    file.write_all(lost_write_line(line).as_bytes())
        .map_err(err)
}

/// Writes `record` at `path` (temporary file, then rename).
pub(super) fn write(path: &Path, record: &RunRecord) -> Result<(), StoreError> {
    let err = |source| StoreError::WriteRunRecord {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("run.tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(record.encode().as_bytes()).map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}

/// The record at `path`; `Ok(None)` when there is none.
pub(super) fn read(path: &Path) -> Result<Option<RunRecord>, StoreError> {
    let err = |source| StoreError::ReadRunRecord {
        path: path.to_owned(),
        source,
    };
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() || meta.size() > MAX_RECORD {
        return Err(StoreError::BadRunRecord {
            path: path.to_owned(),
        });
    }
    let mut text = String::new();
    file.take(MAX_RECORD)
        .read_to_string(&mut text)
        .map_err(err)?;
    RunRecord::decode(&text)
        .map(Some)
        .ok_or_else(|| StoreError::BadRunRecord {
            path: path.to_owned(),
        })
}

/// Removes the record at `path`, if any.
pub(super) fn remove(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::Remove {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_record_round_trips_with_and_without_a_uid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.run");
        for uid in [Some(1_879_048_192), None] {
            let record = RunRecord {
                pid: 4242,
                start_time: 987_654,
                uid,
                ctrl_id: (2049, 1311),
                lost_write: None,
            };
            write(&path, &record).unwrap();
            assert_eq!(read(&path).unwrap(), Some(record));
        }
        remove(&path).unwrap();
        assert_eq!(read(&path).unwrap(), None);
    }

    #[test]
    fn a_lost_write_is_kept_as_one_printable_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.run");
        let mut record = RunRecord {
            pid: 4242,
            start_time: 987_654,
            uid: None,
            ctrl_id: (2049, 1311),
            lost_write: Some("SWTPM_NVRAM_StoreData: Error (fatal)".to_owned()),
        };
        write(&path, &record).unwrap();
        assert_eq!(read(&path).unwrap().as_ref(), Some(&record));
        record.lost_write = None;
        write(&path, &record).unwrap();
        append_lost_write(&path, &format!("a\nb\u{1b}[31m{}", "x".repeat(500))).unwrap();
        append_lost_write(&path, "a second one is not recorded").unwrap();
        let back = read(&path).unwrap().unwrap().lost_write.unwrap();
        assert!(back.starts_with("a?b?[31mxxx"), "{back}");
        assert_eq!(back.len(), MAX_LOST_WRITE);
    }

    #[test]
    fn anything_but_the_exact_format_is_refused() {
        let good = "vtpmd-run 1\npid=1\nstart_time=2\nctrl=3:4\n";
        assert!(RunRecord::decode(good).is_some());
        for bad in [
            "vtpmd-run 2\npid=1\nstart_time=2\nctrl=3:4\n",
            "vtpmd-run 1\npid=0\nstart_time=2\nctrl=3:4\n",
            "vtpmd-run 1\npid=1\nstart_time=2\nctrl=3:4",
            "vtpmd-run 1\nstart_time=2\npid=1\nctrl=3:4\n",
            "vtpmd-run 1\npid=1\nstart_time=2\nctrl=3:4\nextra=1\n",
            "vtpmd-run 1\npid=1\nstart_time=2\nctrl=3:4\nlost_write=x\nextra=1\n",
            "vtpmd-run 1\npid=-1\nstart_time=2\nctrl=3:4\n",
        ] {
            assert!(RunRecord::decode(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_fifo_in_place_of_the_record_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.run");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(read(&path), Err(StoreError::BadRunRecord { .. })));
    }
}
