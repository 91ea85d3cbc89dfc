//! The calls being answered, so that the daemon can let their replies go
//! out before it exits: a call that the shutdown refused (`Busy`) or that
//! finished meanwhile must reach its caller, not a closed socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(super) struct InFlight {
    calls: AtomicUsize,
    idle: Notify,
}

/// One call, from its message received to its reply written.
pub(super) struct Call(Arc<InFlight>);

impl InFlight {
    pub(super) fn enter(self: &Arc<Self>) -> Call {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Call(Arc::clone(self))
    }

    /// Waits until no call is being answered, at most `limit`.
    pub(super) async fn settle(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let idle = self.idle.notified();
                if self.calls.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn settle_returns_once_the_last_call_is_answered() {
        let inflight = Arc::new(InFlight::default());
        let call = inflight.enter();
        let waiter = {
            let inflight = Arc::clone(&inflight);
            tokio::spawn(async move { inflight.settle(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(call);
        let settled = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(settled, Ok(Ok(()))), "settle did not return");
    }
}
