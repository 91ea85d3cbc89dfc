//! One inotify instance for every running guest's runtime directory.
//!
//! An instance per guest would cost each guest an fd and, worse, hit
//! `fs.inotify.max_user_instances` (128 by default) at the 129th running
//! guest. One instance holds one watch per directory; a task reads its
//! events and wakes the guest whose watch fired.
//!
//! Watches are one-shot (see `reseal`): after firing, a watch is gone until
//! its owner re-arms it, so a guest writing in a loop raises one event per
//! reseal, not two per write.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::fdwatch::{self, OwnsFd};

/// A file written and closed, or renamed in.
const MASK: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_ONESHOT);

#[derive(Debug)]
struct InotifyFd(Inotify);

/// The inotify instance owns its fd and is never replaced.
impl OwnsFd for InotifyFd {}

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The shared instance and who each watch belongs to.
#[derive(Debug)]
pub(super) struct Watcher {
    fd: AsyncFd<InotifyFd>,
    owners: Mutex<HashMap<WatchDescriptor, Arc<Notify>>>,
}

impl Watcher {
    /// The instance, with its reading task spawned on the current runtime.
    pub(super) fn start() -> io::Result<Arc<Self>> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let watcher = Arc::new(Self {
            fd: fdwatch::readable(InotifyFd(inotify))?,
            owners: Mutex::new(HashMap::new()),
        });
        tokio::spawn(Arc::clone(&watcher).dispatch());
        Ok(watcher)
    }

    fn owners(&self) -> MutexGuard<'_, HashMap<WatchDescriptor, Arc<Notify>>> {
        self.owners.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches `dir`: the returned handle is woken at its next write.
    pub(super) fn watch(self: &Arc<Self>, dir: &Path) -> io::Result<Watch> {
        let wake = Arc::new(Notify::new());
        let mut owners = self.owners();
        let wd = self.fd.get_ref().0.add_watch(dir, MASK)?;
        owners.insert(wd, Arc::clone(&wake));
        drop(owners);
        Ok(Watch {
            watcher: Arc::clone(self),
            dir: dir.to_owned(),
            wd: Mutex::new(Some(wd)),
            wake,
        })
    }

    /// Reads events for as long as the runtime lives and wakes their
    /// owners. A lost queue (IN_Q_OVERFLOW) wakes every owner: some write
    /// went unseen, and a spare reseal costs little.
    async fn dispatch(self: Arc<Self>) {
        let wakes = AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO;
        loop {
            let mut ready = match self.fd.readable().await {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::error!("inotify failed: {e}; guests are resealed only when they stop");
                    return;
                }
            };
            let events =
                match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                    Ok(Ok(events)) => events,
                    Ok(Err(e)) => {
                        tracing::error!(
                            "reading inotify failed: {e}; guests are resealed only when they stop"
                        );
                        return;
                    }
                    Err(_would_block) => continue,
                };
            let owners = self.owners();
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    tracing::warn!("inotify queue overflowed; resealing every running guest");
                    owners.values().for_each(|wake| wake.notify_one());
                } else if event.mask.intersects(wakes) {
                    if let Some(wake) = owners.get(&event.wd) {
                        wake.notify_one();
                    }
                }
            }
        }
    }
}

/// One directory's watch. Dropping it removes the watch.
#[derive(Debug)]
pub(super) struct Watch {
    watcher: Arc<Watcher>,
    dir: PathBuf,
    /// `None` once re-arming failed.
    wd: Mutex<Option<WatchDescriptor>>,
    wake: Arc<Notify>,
}

impl Watch {
    /// Waits for the next write (returns at once if one came since the
    /// last call).
    pub(super) async fn written(&self) {
        self.wake.notified().await;
    }

    /// Sets the one-shot watch again after it fired. Writes from here on
    /// wake the owner again.
    pub(super) fn rearm(&self) -> io::Result<()> {
        let mut wd = self.wd.lock().unwrap_or_else(PoisonError::into_inner);
        let mut owners = self.watcher.owners();
        if let Some(old) = wd.take() {
            owners.remove(&old);
        }
        let new = self.watcher.fd.get_ref().0.add_watch(&self.dir, MASK)?;
        owners.insert(new, Arc::clone(&self.wake));
        *wd = Some(new);
        Ok(())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let wd = self
            .wd
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(wd) = wd {
            self.watcher.owners().remove(&wd);
            // Gone already when it fired, or with the directory: fine.
            let _ = self.watcher.fd.get_ref().0.rm_watch(wd);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MORE_THAN_THE_INSTANCE_LIMIT: usize = 300;

    async fn woken(watch: &Watch) -> bool {
        tokio::time::timeout(Duration::from_millis(200), watch.written())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn one_instance_serves_hundreds_of_directories_and_wakes_only_the_writer() {
        let root = tempfile::tempdir().unwrap();
        let watcher = Watcher::start().unwrap();
        let watches: Vec<Watch> = (0..MORE_THAN_THE_INSTANCE_LIMIT)
            .map(|i| {
                let dir = root.path().join(i.to_string());
                std::fs::create_dir(&dir).unwrap();
                watcher.watch(&dir).unwrap()
            })
            .collect();

        std::fs::write(root.path().join("250/tpm2-00.permall"), b"one").unwrap();
        assert!(woken(&watches[250]).await, "the writer's watch fired");
        assert!(!woken(&watches[249]).await, "a neighbour was woken");

        // One-shot: further writes stay silent until re-armed…
        std::fs::write(root.path().join("250/tpm2-00.permall"), b"two").unwrap();
        assert!(!woken(&watches[250]).await, "woken again before re-arming");
        // …and wake again once it is.
        watches[250].rearm().unwrap();
        std::fs::rename(
            {
                let tmp = root.path().join("250/TMP2-00.permall");
                std::fs::write(&tmp, b"three").unwrap();
                tmp
            },
            root.path().join("250/tpm2-00.permall"),
        )
        .unwrap();
        assert!(woken(&watches[250]).await, "re-armed watch fired");

        // A dropped watch leaves the others working.
        drop(watches);
        let again = watcher.watch(&root.path().join("7")).unwrap();
        std::fs::write(root.path().join("7/x"), b"x").unwrap();
        assert!(woken(&again).await);
        assert_eq!(watcher.owners().len(), 1);
    }
}
