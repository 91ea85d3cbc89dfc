use std::fmt;

/// The TPM family a guest gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TpmVersion {
    V1_2,
    V2_0,
}

/// The interface QEMU exposes the TPM through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TpmModel {
    #[default]
    Tis,
    Crb,
}

/// A version and model that go together: CRB exists only for TPM 2.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TpmSpec {
    version: TpmVersion,
    model: TpmModel,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmSpecError {
    #[error("unknown TPM version {0:?}; expected \"1.2\" or \"2.0\"")]
    UnknownVersion(String),
    #[error("unknown TPM model {0:?}; expected \"tpm-tis\" or \"tpm-crb\"")]
    UnknownModel(String),
    #[error("TPM model tpm-crb needs TPM version 2.0, not 1.2")]
    CrbNeedsTpm2,
}

impl TpmVersion {
    pub fn parse(text: &str) -> Result<Self, TpmSpecError> {
        match text {
            "1.2" => Ok(Self::V1_2),
            "2.0" => Ok(Self::V2_0),
            other => Err(TpmSpecError::UnknownVersion(other.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1_2 => "1.2",
            Self::V2_0 => "2.0",
        }
    }
}

impl TpmModel {
    pub fn parse(text: &str) -> Result<Self, TpmSpecError> {
        match text {
            "tpm-tis" => Ok(Self::Tis),
            "tpm-crb" => Ok(Self::Crb),
            other => Err(TpmSpecError::UnknownModel(other.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tis => "tpm-tis",
            Self::Crb => "tpm-crb",
        }
    }
}

impl TpmSpec {
    pub fn new(version: TpmVersion, model: TpmModel) -> Result<Self, TpmSpecError> {
        if version == TpmVersion::V1_2 && model == TpmModel::Crb {
            return Err(TpmSpecError::CrbNeedsTpm2);
        }
        Ok(Self { version, model })
    }

    pub fn version(self) -> TpmVersion {
        self.version
    }

    pub fn model(self) -> TpmModel {
        self.model
    }
}

impl fmt::Display for TpmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for TpmModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for TpmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TPM {} ({})", self.version, self.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crb_with_tpm_1_2_is_refused() {
        assert_eq!(
            TpmSpec::new(TpmVersion::V1_2, TpmModel::Crb),
            Err(TpmSpecError::CrbNeedsTpm2)
        );
    }

    #[test]
    fn every_other_pair_is_accepted() {
        for (v, m) in [
            (TpmVersion::V1_2, TpmModel::Tis),
            (TpmVersion::V2_0, TpmModel::Tis),
            (TpmVersion::V2_0, TpmModel::Crb),
        ] {
            let spec = TpmSpec::new(v, m).unwrap();
            assert_eq!((spec.version(), spec.model()), (v, m));
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for v in [TpmVersion::V1_2, TpmVersion::V2_0] {
            assert_eq!(TpmVersion::parse(v.as_str()), Ok(v));
        }
        for m in [TpmModel::Tis, TpmModel::Crb] {
            assert_eq!(TpmModel::parse(m.as_str()), Ok(m));
        }
        assert!(matches!(
            TpmVersion::parse("2"),
            Err(TpmSpecError::UnknownVersion(_))
        ));
        assert!(matches!(
            TpmModel::parse("crb"),
            Err(TpmSpecError::UnknownModel(_))
        ));
    }
}
