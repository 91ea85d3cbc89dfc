//! vtpmd's TOML configuration, with documented defaults.
//!
//! Every key is optional; an unknown key is an error (a typo must not
//! silently fall back to a default). The embedded default is what runs when
//! no file is given, and `vtpmd --check-config` prints the effective result.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use crate::vault::{KdfParams, KdfParamsError, KdfPolicy};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub vault: VaultConfig,
}

/// `[vault]`: how sealed state files are protected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultConfig {
    /// Argon2id memory per key derivation, KiB (default 65536 = 64 MiB,
    /// RFC 9106's second recommended option).
    pub argon2_memory_kib: u32,
    /// Argon2id passes (default 3).
    pub argon2_iterations: u32,
    /// Argon2id lanes (default 4).
    pub argon2_lanes: u32,
    /// Accept parameters below OWASP's floor (m = 19 MiB, t = 2), for tests
    /// and very small hosts. Default false; a warning is logged when used.
    pub allow_weak_kdf: bool,
}

impl Default for VaultConfig {
    fn default() -> Self {
        let params = KdfParams::default();
        Self {
            argon2_memory_kib: params.memory_kib(),
            argon2_iterations: params.iterations(),
            argon2_lanes: params.lanes(),
            allow_weak_kdf: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("[vault] Argon2id parameters are invalid")]
    Kdf(#[source] KdfParamsError),
    #[error(
        "[vault] Argon2id parameters {params} are below OWASP's floor; set allow_weak_kdf = true to accept them"
    )]
    WeakKdf { params: KdfParams },
}

/// The largest config file read; a config is a few hundred bytes.
const MAX_CONFIG_LEN: u64 = 1024 * 1024;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read_err)?
            .take(MAX_CONFIG_LEN)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        Self::parse(path, &text)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(origin: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            source: Box::new(e),
        })?;
        config.kdf_policy()?;
        Ok(config)
    }

    /// The vault's KDF policy; refuses weak parameters unless allowed, so a
    /// bad config fails at start-up rather than at the first Create.
    pub fn kdf_policy(&self) -> Result<KdfPolicy, ConfigError> {
        let v = &self.vault;
        let params = KdfParams::new(v.argon2_memory_kib, v.argon2_iterations, v.argon2_lanes)
            .map_err(ConfigError::Kdf)?;
        if params.is_weak() && !v.allow_weak_kdf {
            return Err(ConfigError::WeakKdf { params });
        }
        Ok(KdfPolicy {
            params,
            allow_weak: v.allow_weak_kdf,
        })
    }

    /// The effective configuration as TOML, for `--check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.kdf_policy().unwrap(), KdfPolicy::default());
    }

    #[test]
    fn the_rendered_default_parses_back_to_itself() {
        let config = Config::default();
        assert_eq!(parse(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(matches!(
            parse("[vault]\nargon2_memroy_kib = 1\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(parse("[vualt]\n"), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn weak_parameters_need_allow_weak_kdf() {
        let weak = "[vault]\nargon2_memory_kib = 1024\nargon2_iterations = 1\nargon2_lanes = 1\n";
        assert!(matches!(parse(weak), Err(ConfigError::WeakKdf { .. })));
        let allowed = parse(&format!("{weak}allow_weak_kdf = true\n")).unwrap();
        assert!(allowed.kdf_policy().unwrap().allow_weak);
    }

    #[test]
    fn out_of_range_parameters_are_refused() {
        assert!(matches!(
            parse("[vault]\nargon2_lanes = 0\n"),
            Err(ConfigError::Kdf(_))
        ));
        assert!(matches!(
            parse("[vault]\nargon2_iterations = -1\n"),
            Err(ConfigError::Parse { .. })
        ));
    }
}
