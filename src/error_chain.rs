//! Printing an error with its causes, for the binaries' last word.
//!
//! Messages do not repeat their cause (it is a `#[source]`), so the chain
//! is walked here, once, at the edge.

use std::error::Error;
use std::fmt::Write;

/// `top: cause: deeper cause`.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_are_appended_in_order() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let err = crate::config::ConfigError::Read {
            path: "/x.toml".into(),
            source: io,
        };
        assert_eq!(super::chain(&err), "cannot read config file /x.toml: gone");
    }
}
