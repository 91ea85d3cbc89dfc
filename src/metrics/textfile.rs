//! The optional node_exporter textfile-collector file (config `[metrics]
//! textfile`): the 0.0.4 text rendered every `textfile_interval_s` and
//! put in place atomically (written beside it as a dot-file, fsynced,
//! renamed), so the collector never reads half a file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Format;
use super::http::Render;

/// Writes `render`'s output to `path` now and every `interval` until the
/// task is aborted; a failed write is logged and tried again next time.
pub fn spawn(path: PathBuf, interval: Duration, render: Render) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failing = false;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let text = render(Format::Prometheus);
            let target = path.clone();
            let written = tokio::task::spawn_blocking(move || write_atomically(&target, &text))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            match written {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(path = %path.display(), "metrics textfile written again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(path = %path.display(), "cannot write the metrics textfile: {e}");
                }
                Err(_) => {}
            }
        }
    })
}

/// `.<name>.tmp` beside `path` (node_exporter reads only `*.prom`), then
/// rename over it.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the textfile path names no file"))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_replaced_whole_and_no_temp_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vtpmd.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vtpmd.prom")]);
    }
}
