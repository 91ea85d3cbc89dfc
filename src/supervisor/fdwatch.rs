//! Registering an fd with tokio's reactor for readability, without
//! `unsafe`.
//!
//! tokio 1.54 deprecated `AsyncFd::with_interest` in favour of the
//! `unsafe` `register_with_interest`, whose contract is that the inner
//! value owns its fd for the `AsyncFd`'s whole life and always returns the
//! same one from `as_raw_fd`. The deprecation is about arbitrary `T`; the
//! types allowed here ([`OwnsFd`]) keep that contract by construction (an
//! `OwnedFd`, or a wrapper of one that is never replaced), so the safe,
//! deprecated constructor is used for them only, and this module forbids
//! `unsafe` like the rest of the supervisor.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// An owner of exactly one fd for its whole life.
pub(super) trait OwnsFd: AsRawFd {}

impl OwnsFd for OwnedFd {}

/// `inner`'s fd, registered for readability.
pub(super) fn readable<T: OwnsFd>(inner: T) -> io::Result<AsyncFd<T>> {
    #[allow(deprecated)] // sound for `OwnsFd` types: see the module docs
    AsyncFd::with_interest(inner, Interest::READABLE)
}
