//! Wire-level vocabulary shared by the daemon and its clients.
//!
//! Pure: no I/O and nothing else of this crate, so it can be fuzzed and
//! used by `vtpmctl` without pulling in the daemon. Every type here is built
//! only through validation, so code that holds one may trust it (a
//! [`GuestId`] is safe in a path or a swtpm option).

mod guest_id;
pub mod manager;
mod tpm_spec;
pub mod varlink;

pub use guest_id::{GuestId, GuestIdError};
pub use tpm_spec::{TpmModel, TpmSpec, TpmSpecError, TpmVersion};
