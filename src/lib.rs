//! vtpmd: one swtpm per virtual machine, with every guest's TPM state
//! encrypted at rest. See `README.md` and `docs/` for the design.

pub mod api;
mod be;
pub mod cli_docs;
pub mod cluster;
pub mod config;
pub mod error_chain;
pub mod log_limit;
pub mod metrics;
pub mod paths;
pub mod privileges;
pub mod protocol;
mod regular;
pub mod secret;
pub mod store;
pub mod supervisor;
pub mod swtpm;
pub mod systemd;
pub mod vault;
