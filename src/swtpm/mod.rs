//! Everything vtpmd needs to run swtpm: finding it and what it can do
//! (`probe`), provisioning a fresh state (`provision`), spawning and tracking
//! one instance per guest (`spawn`), and speaking its control channel
//! (`ctrl`).
//!
//! This module never holds a passphrase; it receives the per-guest swtpm
//! state key (derived by the vault) and hands it to swtpm through a pipe.

pub mod ctrl;
pub mod probe;
pub mod provision;
mod run;
pub mod spawn;
