//! The operations on one guest's sealed state, composed from the format,
//! the crypto steps and durable writes.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::protocol::{GuestId, TpmSpec};
use crate::secret::SecretBuf;
use secrecy::{ExposeSecret, ExposeSecretMut};

use super::archive::{ArchiveError, StateArchive};
use super::crypto::{self, DataKey};
use super::durable::{self, SealedPaths};
use super::format::{
    self, BOUND_LEN, Bound, Header, Keyslot, MAX_FILE_LEN, MAX_KEYSLOTS, SlotKind, TAG_LEN,
};
use super::host_key::{HostKey, HostPublicKey};
use super::inspect::decode;
use super::kdf::{self, KdfPolicy};
use super::{MAX_PASSPHRASE_LEN, VaultError};

/// An unlocked guest state: the data key in locked memory, and what is
/// needed to write the next generation without asking for the passphrase.
#[derive(Debug)]
pub struct SealedState {
    paths: SealedPaths,
    guest: GuestId,
    spec: TpmSpec,
    generation: u64,
    keyslots: Vec<Keyslot>,
    data_key: DataKey,
    unlocked_slot: Option<usize>,
    /// Set when opening fell back to the previous generation: the damaged
    /// current file must not become the new `.prev`.
    current_damaged: bool,
    /// SHA-256 of the encoded archive the current generation holds (as
    /// opened or last sealed), so a state that has not changed is not
    /// sealed again ([`seal_if_changed`](Self::seal_if_changed)).
    sealed_digest: Option<[u8; 32]>,
}

/// A new guest's data key before its first keyslot: [`SealedState::prepare`]
/// in two steps. Its swtpm state key is there at once, so a Create can
/// provision the TPM under it while the passphrase slot's Argon2id runs
/// elsewhere; it becomes a state only with that slot
/// ([`with_passphrase`](Self::with_passphrase)), so a state without a
/// keyslot never exists and cannot be sealed.
#[derive(Debug)]
pub struct FreshKey {
    paths: SealedPaths,
    guest: GuestId,
    spec: TpmSpec,
    data_key: DataKey,
}

impl FreshKey {
    /// A random data key for `guest`; refuses if a sealed file (current
    /// or previous) exists already.
    pub fn generate(paths: SealedPaths, guest: GuestId, spec: TpmSpec) -> Result<Self, VaultError> {
        refuse_existing(&paths)?;
        Ok(Self {
            paths,
            guest,
            spec,
            data_key: DataKey::generate()?,
        })
    }

    /// The key swtpm encrypts its state with: the same as the state's
    /// ([`SealedState::swtpm_state_key`]) once it has its keyslot.
    pub fn swtpm_state_key(&self) -> Result<SecretBuf, VaultError> {
        self.data_key.swtpm_state_key(&self.guest)
    }

    /// The state, with one keyslot for `passphrase` (Argon2id: the slow
    /// step), in memory only, as [`SealedState::prepare`] returns it.
    pub fn with_passphrase(
        self,
        passphrase: &SecretBuf,
        policy: &KdfPolicy,
    ) -> Result<SealedState, VaultError> {
        let slot = new_keyslot(&self.data_key, &self.guest, passphrase, policy)?;
        Ok(SealedState {
            paths: self.paths,
            guest: self.guest,
            spec: self.spec,
            generation: 0,
            keyslots: vec![slot],
            data_key: self.data_key,
            unlocked_slot: Some(0),
            current_damaged: false,
            sealed_digest: None,
        })
    }
}

/// What opens a sealed file: each finds only the slots of its own kind.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    /// A person's passphrase: Argon2id, passphrase slots.
    Passphrase(&'a SecretBuf),
    /// A 256-bit key from a key manager: HKDF, `key` slots.
    Key(&'a SecretBuf),
    /// This host's key: HPKE, the `host` slots with its fingerprint.
    Host(&'a HostKey),
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Passphrase(_) => "Credential::Passphrase(<redacted>)",
            Self::Key(_) => "Credential::Key(<redacted>)",
            Self::Host(_) => "Credential::Host(<redacted>)",
        })
    }
}

impl Credential<'_> {
    pub fn kind(&self) -> SlotKind {
        match self {
            Self::Passphrase(_) => SlotKind::Passphrase,
            Self::Key(_) => SlotKind::Key,
            Self::Host(_) => SlotKind::Host,
        }
    }

    /// What is refused before a file is opened (spec, step 0).
    fn check(&self) -> Result<(), VaultError> {
        match self {
            Self::Passphrase(p) => check_passphrase(p),
            Self::Key(k) => check_key(k),
            Self::Host(_) => Ok(()),
        }
    }
}

/// One keyslot as an operator sees it (Status, inspect).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotSummary {
    pub index: usize,
    pub kind: SlotKind,
    /// A host slot's host: the fingerprint of its public key, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_fingerprint: Option<String>,
}

pub(crate) fn summarize(keyslots: &[Keyslot]) -> Vec<SlotSummary> {
    keyslots
        .iter()
        .enumerate()
        .map(|(index, slot)| SlotSummary {
            index,
            kind: slot.kind(),
            host_fingerprint: match slot {
                Keyslot::Host { fingerprint, .. } => Some(super::host_key::hex(fingerprint)),
                _ => None,
            },
        })
        .collect()
}

/// The result of [`SealedState::open`].
#[derive(Debug)]
pub struct Opened {
    pub state: SealedState,
    pub archive: StateArchive,
    /// `Some` when the current file was damaged or missing and the previous
    /// generation was opened instead.
    pub fell_back: Option<Fallback>,
    /// Time spent in Argon2 (every keyslot tried, in every file tried):
    /// the part of opening that the parameters decide, reported apart from
    /// the decryption so an operator can tell the two costs apart.
    pub kdf_time: Duration,
}

/// A sealed file a keyslot change did not rewrite, because it does not
/// decode with this state's guest and data key (its body included): the
/// spec leaves such a file as it is, and the caller must hear of it (the
/// old passphrase still opens whatever it holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftAsIs {
    pub path: std::path::PathBuf,
    pub problem: String,
}

impl std::fmt::Display for LeftAsIs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} left as it is by the keyslot change: {}",
            self.path.display(),
            self.problem
        )
    }
}

/// Why the previous generation was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// What was wrong with the current file.
    pub current_problem: String,
}

impl SealedState {
    /// Seals a fresh state (generation 1) under a new data key with one
    /// keyslot for `passphrase`. Refuses to replace existing state.
    pub fn create(
        paths: SealedPaths,
        guest: GuestId,
        spec: TpmSpec,
        passphrase: &SecretBuf,
        policy: &KdfPolicy,
        archive: &StateArchive,
    ) -> Result<Self, VaultError> {
        let mut state = Self::prepare(paths, guest, spec, passphrase, policy)?;
        state.seal(archive)?;
        Ok(state)
    }

    /// A new data key and keyslot, held in memory only: nothing is written
    /// until the first [`seal`](Self::seal), which writes generation 1. The
    /// swtpm state key is available at once, so a state can be provisioned
    /// encrypted before it is sealed, and a failed provisioning leaves no
    /// file behind. [`FreshKey`] is the same in two steps.
    pub fn prepare(
        paths: SealedPaths,
        guest: GuestId,
        spec: TpmSpec,
        passphrase: &SecretBuf,
        policy: &KdfPolicy,
    ) -> Result<Self, VaultError> {
        FreshKey::generate(paths, guest, spec)?.with_passphrase(passphrase, policy)
    }

    /// Opens the current generation with `passphrase`; if the current file
    /// is damaged or missing, the previous generation, saying so.
    pub fn open(
        paths: SealedPaths,
        guest: GuestId,
        passphrase: &SecretBuf,
        policy: &KdfPolicy,
    ) -> Result<Opened, VaultError> {
        Self::open_with(paths, guest, Credential::Passphrase(passphrase), policy)
    }

    /// [`open`](Self::open) with any credential: a passphrase, a key or
    /// this host's key, each trying only the slots of its kind.
    pub fn open_with(
        paths: SealedPaths,
        guest: GuestId,
        credential: Credential<'_>,
        policy: &KdfPolicy,
    ) -> Result<Opened, VaultError> {
        let passphrase = credential;
        let mut kdf_time = Duration::ZERO;
        let current_problem =
            match open_file(paths.current(), &guest, passphrase, policy, &mut kdf_time) {
                Ok((state, archive)) => {
                    return Ok(Opened {
                        state: state.with_paths(paths, false),
                        archive,
                        fell_back: None,
                        kdf_time,
                    });
                }
                Err(e) if e.is_damage() => e,
                Err(e) => return Err(e),
            };
        match open_file(paths.previous(), &guest, passphrase, policy, &mut kdf_time) {
            Ok((state, archive)) => {
                tracing::warn!(
                    %guest,
                    problem = %current_problem,
                    generation = state.generation,
                    "current sealed state unusable; opened the previous generation"
                );
                Ok(Opened {
                    state: state.with_paths(paths, true),
                    archive,
                    fell_back: Some(Fallback {
                        current_problem: current_problem.to_string(),
                    }),
                    kdf_time,
                })
            }
            // Whatever the previous generation says (even "wrong
            // passphrase": its keyslots can lag after an interrupted
            // keyslot change), the current file is the one that is damaged,
            // and that is what the operator must hear.
            Err(previous_problem) => {
                tracing::warn!(%guest, problem = %previous_problem, "previous sealed generation unusable too");
                Err(current_problem)
            }
        }
    }

    /// Seals `archive` as the next generation, with the data key in memory.
    /// Returns the new generation number.
    pub fn seal(&mut self, archive: &StateArchive) -> Result<u64, VaultError> {
        if self.generation == 0 {
            // The first seal of a prepared state must not replace anything.
            refuse_existing(&self.paths)?;
        }
        let generation = self
            .generation
            .checked_add(1)
            .ok_or(VaultError::GenerationsExhausted)?;
        let file = self.sealed_bytes(generation, archive)?;
        if self.current_damaged {
            durable::replace(self.paths.current(), &file)?;
            self.current_damaged = false;
        } else {
            durable::write_new_generation(&self.paths, &file)?;
        }
        self.generation = generation;
        self.sealed_digest = Some(archive_digest(archive));
        Ok(generation)
    }

    /// [`seal`](Self::seal), unless `archive` is exactly what the current
    /// generation holds already (and that file is sound): then nothing is
    /// written and `None` is returned. Writing an unchanged state again
    /// would cost two fsyncs for nothing, at every restart of vtpmd for
    /// every guest.
    pub fn seal_if_changed(&mut self, archive: &StateArchive) -> Result<Option<u64>, VaultError> {
        if !self.current_damaged && self.sealed_digest == Some(archive_digest(archive)) {
            return Ok(None);
        }
        self.seal(archive).map(Some)
    }

    /// The whole sealed file of `archive` as generation `generation`: a
    /// fresh body salt and nonce, the body sealed with the data key, the
    /// current keyslots. No I/O.
    ///
    /// The archive is encoded straight into the file's buffer and encrypted
    /// there: a seal holds the archive and one file-sized buffer, not
    /// three copies of up to 16 MiB each.
    fn sealed_bytes(&self, generation: u64, archive: &StateArchive) -> Result<Vec<u8>, VaultError> {
        let archive_len = archive.encoded_len();
        // StateArchive bounds its size well below u32::MAX.
        let body_len = u32::try_from(archive_len + TAG_LEN)
            .map_err(|_| VaultError::Archive(ArchiveError::TooLarge))?;
        let bound = Bound {
            guest: self.guest,
            generation,
            spec: self.spec,
            body_salt: crypto::random_array()?,
            body_nonce: crypto::random_array()?,
            body_len,
        };
        let aad = body_aad(&bound.encode(), &self.guest);
        let header = Header {
            bound,
            keyslots: self.keyslots.clone(),
        };
        // Sized for the body too.
        let mut file = header.encode();
        let body_start = file.len();
        archive.encode_into(&mut file);
        let tag = crypto::seal_in_place(
            &self.data_key,
            &header.bound.body_salt,
            &header.bound.body_nonce,
            &aad,
            &mut file[body_start..],
        )?;
        file.extend_from_slice(&tag);
        Ok(file)
    }

    /// Rewraps the keyslot that unlocked this state under a new passphrase
    /// (with the policy's current parameters). The body is not touched.
    /// Returns the files that were left as they are (damaged ones).
    pub fn change_passphrase(
        &mut self,
        new_passphrase: &SecretBuf,
        policy: &KdfPolicy,
    ) -> Result<Vec<LeftAsIs>, VaultError> {
        let index = self.unlocked_slot.ok_or(VaultError::UnlockingSlotRemoved)?;
        self.change_passphrase_of(index, new_passphrase, policy)
    }

    /// Rewraps passphrase slot `index` under a new passphrase: a running
    /// guest may have been unlocked by a key or host slot, and Rekey must
    /// replace the slot its old passphrase opened, never that one.
    pub fn change_passphrase_of(
        &mut self,
        index: usize,
        new_passphrase: &SecretBuf,
        policy: &KdfPolicy,
    ) -> Result<Vec<LeftAsIs>, VaultError> {
        match self.keyslots.get(index).map(Keyslot::kind) {
            None => return Err(VaultError::NoSuchKeyslot { index }),
            Some(SlotKind::Passphrase) => {}
            Some(kind) => return Err(VaultError::NotAPassphraseSlot { index, kind }),
        }
        let slot = new_keyslot(&self.data_key, &self.guest, new_passphrase, policy)?;
        let mut keyslots = self.keyslots.clone();
        *keyslots
            .get_mut(index)
            .ok_or(VaultError::NoSuchKeyslot { index })? = slot;
        self.commit_keyslots(keyslots)
    }

    /// Adds a keyslot for another passphrase; returns its index.
    pub fn add_passphrase(
        &mut self,
        passphrase: &SecretBuf,
        policy: &KdfPolicy,
    ) -> Result<usize, VaultError> {
        if self.keyslots.len() >= MAX_KEYSLOTS {
            return Err(VaultError::KeyslotsFull { max: MAX_KEYSLOTS });
        }
        let slot = new_keyslot(&self.data_key, &self.guest, passphrase, policy)?;
        let mut keyslots = self.keyslots.clone();
        keyslots.push(slot);
        // Logged by `commit_keyslots`; the index is what callers need.
        let _left_as_is = self.commit_keyslots(keyslots)?;
        Ok(self.keyslots.len() - 1)
    }

    /// Adds a `key` slot for `key` (32 bytes from a key manager); returns
    /// its index.
    pub fn add_key(&mut self, key: &SecretBuf) -> Result<usize, VaultError> {
        check_key(key)?;
        if self.keyslots.len() >= MAX_KEYSLOTS {
            return Err(VaultError::KeyslotsFull { max: MAX_KEYSLOTS });
        }
        let mut slot = Keyslot::Key {
            salt: crypto::random_array()?,
            nonce: [0; format::NONCE_LEN],
            wrapped_key: [0; format::WRAPPED_KEY_LEN],
        };
        let Keyslot::Key { salt, .. } = &slot else {
            return Err(VaultError::Crypto {
                what: "key slot layout",
            });
        };
        let kek = crypto::key_slot_kek(key, salt, &self.guest)?;
        crypto::wrap_key(&kek, &self.data_key, &self.guest, &mut slot)?;
        let mut keyslots = self.keyslots.clone();
        keyslots.push(slot);
        // Logged by `commit_keyslots`; the index is what callers need.
        let _left_as_is = self.commit_keyslots(keyslots)?;
        Ok(self.keyslots.len() - 1)
    }

    /// Adds a `host` slot for `host`; returns its index. A host that has
    /// one already keeps it (its index is returned, nothing is written):
    /// granting twice is not an error, and one slot per host is enough.
    pub fn add_host(&mut self, host: &HostPublicKey) -> Result<usize, VaultError> {
        let fingerprint = host.fingerprint();
        if let Some(index) = self
            .keyslots
            .iter()
            .position(|s| matches!(s, Keyslot::Host { fingerprint: f, .. } if *f == fingerprint))
        {
            return Ok(index);
        }
        if self.keyslots.len() >= MAX_KEYSLOTS {
            return Err(VaultError::KeyslotsFull { max: MAX_KEYSLOTS });
        }
        let slot = crypto::wrap_for_host(&self.data_key, &self.guest, host)?;
        let mut keyslots = self.keyslots.clone();
        keyslots.push(slot);
        let _left_as_is = self.commit_keyslots(keyslots)?;
        Ok(self.keyslots.len() - 1)
    }

    /// Each keyslot's kind (and host), in order.
    pub fn keyslots(&self) -> Vec<SlotSummary> {
        summarize(&self.keyslots)
    }

    /// Removes a keyslot; the last one cannot go.
    pub fn remove_keyslot(&mut self, index: usize) -> Result<(), VaultError> {
        if index >= self.keyslots.len() {
            return Err(VaultError::NoSuchKeyslot { index });
        }
        if self.keyslots.len() == 1 {
            return Err(VaultError::LastKeyslot { index });
        }
        let mut keyslots = self.keyslots.clone();
        keyslots.remove(index);
        // Logged by `commit_keyslots`.
        let _left_as_is = self.commit_keyslots(keyslots)?;
        self.unlocked_slot = match self.unlocked_slot {
            Some(i) if i == index => None,
            Some(i) if i > index => Some(i - 1),
            other => other,
        };
        Ok(())
    }

    /// Writes `keyslots` into both generations (so no old passphrase keeps
    /// opening the previous one), copying each body verbatim. The previous
    /// generation first: the change takes effect when the current file is
    /// replaced, and an interruption before that leaves the current file
    /// as it was. Then, when every file there was rewritten, the current
    /// state is sealed once more as the next generation: a keyslot change
    /// is a change of the sealed file like a reseal, so a copy from before
    /// it (one a revoked passphrase opens) is an older generation, refused
    /// as a rollback wherever generations are compared, and a cluster's
    /// replica (which only takes a newer generation) gets the new keyslots.
    ///
    /// Only a file that decodes completely (header, guest, and a body that
    /// opens with the data key into a valid archive) is rewritten: a header
    /// that checks out says nothing of the body, and new keyslots on a
    /// damaged body would make it look sound to `inspect` and to the
    /// operator. Such a file is left as it is and returned.
    fn commit_keyslots(&mut self, keyslots: Vec<Keyslot>) -> Result<Vec<LeftAsIs>, VaultError> {
        let mut left_as_is = Vec::new();
        let mut current_archive = None;
        let previous = self.paths.previous().to_owned();
        let current = self.paths.current().to_owned();
        for path in [previous.as_path(), current.as_path()] {
            let Some(bytes) = durable::read(path, MAX_FILE_LEN)? else {
                continue;
            };
            let decoded = decode(path, &bytes).and_then(|(header, body)| {
                if header.bound.guest != self.guest {
                    return Err(VaultError::GuestMismatch {
                        path: path.to_owned(),
                        expected: self.guest,
                        found: header.bound.guest,
                    });
                }
                let archive = open_body(path, &header, body, &self.data_key, &self.guest)?;
                Ok((header, body, archive))
            });
            let (header, body, archive) = match decoded {
                Ok(decoded) => decoded,
                Err(e) => {
                    let left = LeftAsIs {
                        path: path.to_owned(),
                        problem: crate::error_chain::chain(&e),
                    };
                    tracing::warn!("{left}");
                    // The next seal must replace a damaged current file in
                    // place, never keep it as the previous generation.
                    if path == current {
                        self.current_damaged = true;
                    }
                    left_as_is.push(left);
                    continue;
                }
            };
            let generation = header.bound.generation;
            let rewritten = Header {
                bound: header.bound,
                keyslots: keyslots.clone(),
            };
            let mut file = rewritten.encode();
            file.extend_from_slice(body);
            durable::replace(path, &file)?;
            if path == current && generation == self.generation {
                current_archive = Some(archive);
            }
        }
        self.keyslots = keyslots;
        // A damaged file stays as it is for whoever looks at it; sealing a
        // generation now would rotate a damaged `.prev` away.
        if let (Some(archive), true) = (current_archive, left_as_is.is_empty()) {
            self.seal(&archive)?;
        }
        Ok(left_as_is)
    }

    /// Removes both generations of this guest's sealed state.
    pub fn delete(paths: &SealedPaths) -> Result<(), VaultError> {
        durable::remove_all(paths)
    }

    pub fn guest(&self) -> GuestId {
        self.guest
    }

    pub fn spec(&self) -> TpmSpec {
        self.spec
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn keyslot_count(&self) -> usize {
        self.keyslots.len()
    }

    /// The keyslot the passphrase opened, if it still exists.
    pub fn unlocked_slot(&self) -> Option<usize> {
        self.unlocked_slot
    }

    pub fn paths(&self) -> &SealedPaths {
        &self.paths
    }

    /// What a later vtpmd needs to go on resealing this state without the
    /// passphrase ([`SealedState::resume`]): a version byte, the index of
    /// the keyslot that was unlocked (0xff: none) and the data key, in
    /// locked memory. It is only ever handed to the service manager's fd
    /// store, never written to a file.
    pub fn handover(&self) -> Result<SecretBuf, VaultError> {
        let mut out = SecretBuf::zeroed(HANDOVER_LEN)?;
        let bytes = out.expose_secret_mut();
        bytes[0] = HANDOVER_VERSION;
        bytes[1] = self
            .unlocked_slot
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(NO_SLOT);
        self.data_key.copy_into(&mut bytes[2..]);
        Ok(out)
    }

    /// A migration ticket for `destination` (docs/sealed-format.md,
    /// "Migration tickets"): this state's data key, for this generation,
    /// valid for `ttl`.
    pub fn migration_ticket(
        &self,
        destination: &HostPublicKey,
        ttl: Duration,
    ) -> Result<Vec<u8>, VaultError> {
        super::ticket::seal(
            &self.data_key,
            &self.guest,
            self.generation,
            destination,
            ttl,
        )
    }

    /// The bytes of the current sealed file (what the last seal wrote),
    /// e.g. to hand it to another host.
    pub fn current_file(&self) -> Result<Vec<u8>, VaultError> {
        durable::read(self.paths.current(), super::format::MAX_FILE_LEN)?.ok_or_else(|| {
            VaultError::Missing {
                path: self.paths.current().to_owned(),
            }
        })
    }

    /// Raises the generation the next seal writes above `floor`: a
    /// migration's destination starts above anything its source can have
    /// sealed meanwhile, so its history is the newer one.
    pub fn raise_generation_above(&mut self, floor: u64) {
        self.generation = self.generation.max(floor);
    }

    /// Opens the guest's sealed state with a [`handover`](Self::handover)
    /// instead of a passphrase: no KDF. The current file, or the previous
    /// generation when the current one is damaged, must open with it.
    pub fn resume(
        paths: SealedPaths,
        guest: GuestId,
        handover: &SecretBuf,
    ) -> Result<Opened, VaultError> {
        let bytes = handover.expose_secret();
        if bytes.len() != HANDOVER_LEN || bytes[0] != HANDOVER_VERSION {
            return Err(VaultError::BadHandover);
        }
        let slot = (bytes[1] != NO_SLOT).then_some(usize::from(bytes[1]));
        let data_key = DataKey::from_bytes(&bytes[2..])?.ok_or(VaultError::BadHandover)?;
        let current = match resume_file(paths.current(), &guest, &data_key) {
            Ok((header, archive)) => {
                let mut state =
                    SealedState::from_header(paths, guest, header, data_key, slot, false);
                state.sealed_digest = Some(archive_digest(&archive));
                return Ok(Opened {
                    state,
                    archive,
                    fell_back: None,
                    kdf_time: Duration::ZERO,
                });
            }
            Err(e) if e.is_damage() => e,
            Err(e) => return Err(e),
        };
        let Ok((header, archive)) = resume_file(paths.previous(), &guest, &data_key) else {
            tracing::debug!(%guest, problem = %current, "the handover opens neither generation");
            return Err(VaultError::WrongHandover {
                path: paths.current().to_owned(),
            });
        };
        let problem = format!(
            "{} does not open with the handed-over key",
            paths.current().display()
        );
        // The previous generation's content is not what the current file
        // holds: `sealed_digest` stays unset, and `current_damaged` makes
        // the next seal replace the current file anyway.
        let state = SealedState::from_header(paths, guest, header, data_key, slot, true);
        Ok(Opened {
            state,
            archive,
            fell_back: Some(Fallback {
                current_problem: problem,
            }),
            kdf_time: Duration::ZERO,
        })
    }

    fn from_header(
        paths: SealedPaths,
        guest: GuestId,
        header: Header,
        data_key: DataKey,
        unlocked_slot: Option<usize>,
        current_damaged: bool,
    ) -> SealedState {
        let unlocked_slot = unlocked_slot.filter(|i| *i < header.keyslots.len());
        SealedState {
            paths,
            guest,
            spec: header.bound.spec,
            generation: header.bound.generation,
            keyslots: header.keyslots,
            data_key,
            unlocked_slot,
            current_damaged,
            sealed_digest: None,
        }
    }

    /// The key for swtpm's own state encryption (see [`DataKey::swtpm_state_key`]).
    pub fn swtpm_state_key(&self) -> Result<SecretBuf, VaultError> {
        self.data_key.swtpm_state_key(&self.guest)
    }

    /// The key of swtpm's `--migration-key` (docs/sealed-format.md).
    pub fn swtpm_migration_key(&self) -> Result<SecretBuf, VaultError> {
        self.data_key.swtpm_migration_key(&self.guest)
    }

    fn with_paths(mut self, paths: SealedPaths, current_damaged: bool) -> Self {
        self.paths = paths;
        self.current_damaged = current_damaged;
        self
    }
}

/// What identifies an archive's content, for [`SealedState::seal_if_changed`].
fn archive_digest(archive: &StateArchive) -> [u8; 32] {
    archive.digest()
}

/// A handover of `data_key` with no unlocked slot: what a migration
/// ticket carries.
pub(crate) fn handover_of(data_key: &DataKey) -> Result<SecretBuf, VaultError> {
    let mut out = SecretBuf::zeroed(HANDOVER_LEN)?;
    let bytes = out.expose_secret_mut();
    bytes[0] = HANDOVER_VERSION;
    bytes[1] = NO_SLOT;
    data_key.copy_into(&mut bytes[2..]);
    Ok(out)
}

/// [`SealedState::handover`]'s layout.
const HANDOVER_VERSION: u8 = 1;
const NO_SLOT: u8 = 0xff;
const HANDOVER_LEN: usize = 2 + format::DATA_KEY_LEN;

/// Decodes one file and opens its body with `data_key` (a handover).
/// A body that fails authentication counts as damage, so the previous
/// generation is tried: the key cannot tell a corrupt body from its own
/// mismatch.
fn resume_file(
    path: &Path,
    guest: &GuestId,
    data_key: &DataKey,
) -> Result<(Header, StateArchive), VaultError> {
    let bytes = durable::read(path, MAX_FILE_LEN)?.ok_or_else(|| VaultError::Missing {
        path: path.to_owned(),
    })?;
    let (header, body) = decode(path, &bytes)?;
    if header.bound.guest != *guest {
        return Err(VaultError::GuestMismatch {
            path: path.to_owned(),
            expected: *guest,
            found: header.bound.guest,
        });
    }
    let archive = open_body(path, &header, body, data_key, guest)?;
    Ok((header, archive))
}

fn refuse_existing(paths: &SealedPaths) -> Result<(), VaultError> {
    for path in [paths.current(), paths.previous()] {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(VaultError::AlreadyExists {
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

/// The body's associated data: the bound header bytes exactly as written,
/// then the guest id the caller expects.
fn body_aad(bound: &[u8; BOUND_LEN], guest: &GuestId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(BOUND_LEN + 16);
    aad.extend_from_slice(bound);
    aad.extend_from_slice(guest.as_bytes());
    aad
}

fn check_key(key: &SecretBuf) -> Result<(), VaultError> {
    if key.len() != super::KEY_LEN {
        return Err(VaultError::InvalidKey { len: key.len() });
    }
    Ok(())
}

fn check_passphrase(passphrase: &SecretBuf) -> Result<(), VaultError> {
    if passphrase.is_empty() {
        return Err(VaultError::EmptyPassphrase);
    }
    if passphrase.len() > MAX_PASSPHRASE_LEN {
        return Err(VaultError::InvalidKdf {
            what: format!("passphrase longer than {MAX_PASSPHRASE_LEN} bytes"),
        });
    }
    Ok(())
}

fn new_keyslot(
    data_key: &DataKey,
    guest: &GuestId,
    passphrase: &SecretBuf,
    policy: &KdfPolicy,
) -> Result<Keyslot, VaultError> {
    check_passphrase(passphrase)?;
    policy.check(policy.params)?;
    let salt = crypto::random_array()?;
    let kek = kdf::derive(passphrase, &salt, policy.params)?;
    let mut slot = Keyslot::Passphrase {
        kdf: policy.params,
        salt,
        nonce: [0; format::NONCE_LEN],
        wrapped_key: [0; format::WRAPPED_KEY_LEN],
    };
    crypto::wrap_key(&kek, data_key, guest, &mut slot)?;
    Ok(slot)
}

/// Opens one file: decode, check the guest, find a keyslot the passphrase
/// opens, authenticate and decode the body.
fn open_file(
    path: &Path,
    guest: &GuestId,
    passphrase: Credential<'_>,
    policy: &KdfPolicy,
    kdf_time: &mut Duration,
) -> Result<(SealedState, StateArchive), VaultError> {
    passphrase.check()?;
    let bytes = durable::read(path, MAX_FILE_LEN)?.ok_or_else(|| VaultError::Missing {
        path: path.to_owned(),
    })?;
    open_bytes(path, &bytes, guest, passphrase, policy, kdf_time)
}

/// Opens a sealed file already in memory; `path` names it in errors and
/// becomes the state's current path. No I/O. Adds the time spent in
/// Argon2 to `kdf_time`.
fn open_bytes(
    path: &Path,
    bytes: &[u8],
    guest: &GuestId,
    passphrase: Credential<'_>,
    policy: &KdfPolicy,
    kdf_time: &mut Duration,
) -> Result<(SealedState, StateArchive), VaultError> {
    let (header, body) = decode(path, bytes)?;
    if header.bound.guest != *guest {
        return Err(VaultError::GuestMismatch {
            path: path.to_owned(),
            expected: *guest,
            found: header.bound.guest,
        });
    }
    let (data_key, slot_index) = unlock(path, &header, guest, passphrase, policy, kdf_time)?;
    let archive = open_body(path, &header, body, &data_key, guest)?;
    let state = SealedState {
        paths: SealedPaths::new(path),
        guest: *guest,
        spec: header.bound.spec,
        generation: header.bound.generation,
        keyslots: header.keyslots,
        data_key,
        unlocked_slot: Some(slot_index),
        current_damaged: false,
        sealed_digest: Some(archive_digest(&archive)),
    };
    Ok((state, archive))
}

/// Authenticates and decrypts the body with the unlocked data key, then
/// decodes its archive.
fn open_body(
    path: &Path,
    header: &Header,
    body: &[u8],
    data_key: &DataKey,
    guest: &GuestId,
) -> Result<StateArchive, VaultError> {
    let corrupt = |what: String| VaultError::Corrupt {
        path: path.to_owned(),
        what,
    };
    let aad = body_aad(&header.bound.encode(), guest);
    let plaintext = crypto::open_body(
        data_key,
        &header.bound.body_salt,
        &header.bound.body_nonce,
        &aad,
        body,
    )?
    .ok_or_else(|| corrupt("the body fails authentication".to_owned()))?;
    StateArchive::decode(&plaintext).map_err(|e| corrupt(format!("the state archive: {e}")))
}

/// For the fuzzer: the sealed-file reader on `bytes`, with no key and no
/// I/O. Never panics. Three passes, each reaching further:
///
/// 1. the bytes as read from disk (what `open` and `inspect` decode first);
/// 2. the same bytes with their header checksum made right, so that
///    mutations reach the field checks behind it (a decoded header must
///    re-encode to exactly its bytes);
/// 3. the body re-sealed under a fixed data key, so that authentication
///    passes and the archive decoder behind it runs on the body's bytes.
///
/// Keyslots are decoded but not unwrapped: that takes an Argon2id
/// derivation with the file's own parameters (up to 4 GiB per try).
/// Returns how far the input got (0 to 3).
#[doc(hidden)]
pub fn fuzz_sealed_file(bytes: &[u8]) -> u8 {
    static KEY: std::sync::OnceLock<DataKey> = std::sync::OnceLock::new();
    let path = Path::new("fuzz.sealed");
    let as_read = decode(path, bytes);
    let info = super::inspect_bytes(path, bytes);
    assert_eq!(as_read.is_ok(), info.is_ok());
    if let Ok((header, body)) = &as_read {
        assert_eq!(header.encode(), bytes[..header.encoded_len()]);
        assert_eq!(body.len(), header.bound.body_len as usize);
    }

    let Some(fixed) = format::with_valid_checksum(bytes) else {
        return 0;
    };
    let Ok((header, body)) = decode(path, &fixed) else {
        return 1;
    };
    let header_bytes = header.encode();
    assert_eq!(header_bytes, fixed[..header_bytes.len()], "not canonical");

    let key = KEY.get_or_init(|| DataKey::generate().expect("a data key"));
    // The decoder bounds the body to at least a tag's length.
    let plaintext = &body[..body.len() - TAG_LEN];
    let aad = body_aad(&header.bound.encode(), &header.bound.guest);
    let sealed = crypto::seal_body(
        key,
        &header.bound.body_salt,
        &header.bound.body_nonce,
        &aad,
        plaintext.to_vec(),
    )
    .expect("sealing a bounded body");
    assert_eq!(sealed.len(), body.len());
    match open_body(path, &header, &sealed, key, &header.bound.guest) {
        Ok(archive) => {
            assert_eq!(archive.encode(), plaintext, "archive not canonical");
            3
        }
        Err(VaultError::Corrupt { .. }) => 2,
        Err(other) => panic!("opening an authentic body: {other}"),
    }
}

/// One seal → open round trip for the fuzzer, in memory (see
/// [`fuzz_seal_open`]).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuzzSealCase {
    pub guest: [u8; 16],
    /// TPM 2.0 rather than 1.2.
    pub tpm2: bool,
    /// tpm-crb rather than tpm-tis (refused with 1.2).
    pub crb: bool,
    /// The archive's entries, in any order and not necessarily valid.
    pub entries: Vec<(String, Vec<u8>)>,
    pub passphrase: Vec<u8>,
    /// A second keyslot's passphrase.
    pub second_passphrase: Option<Vec<u8>>,
    /// Sealed as the generation after this one.
    pub previous_generation: u64,
    /// Another guest, whose open must be refused.
    pub other_guest: [u8; 16],
    /// Which bit of the file to flip for the damaged copy.
    pub flip_bit: u32,
}

/// For the fuzzer: builds an archive from arbitrary entries (invalid ones
/// must be refused by [`StateArchive::from_entries`], by an independent
/// check of the format's rules), seals it under a fresh data key with the
/// weakest Argon2id parameters the format allows, and opens the file again
/// through the same code as [`SealedState::open`], minus the file system.
/// The opened state must equal the sealed one; a wrong passphrase, another
/// guest and a flipped bit must each be refused with their own error.
#[doc(hidden)]
pub fn fuzz_seal_open(case: &FuzzSealCase) {
    use std::collections::BTreeSet;

    use super::archive::{MAX_ARCHIVE_LEN, MAX_ENTRIES, is_valid_name};
    use super::kdf::KdfParams;
    use crate::protocol::{TpmModel, TpmVersion};
    use secrecy::ExposeSecret;

    let names: BTreeSet<&str> = case.entries.iter().map(|(n, _)| n.as_str()).collect();
    let size: usize = case
        .entries
        .iter()
        .map(|(n, d)| 1 + n.len() + 4 + d.len())
        .sum();
    let valid = names.len() == case.entries.len()
        && case.entries.len() <= MAX_ENTRIES
        && names.iter().all(|n| is_valid_name(n))
        && 2 + size <= MAX_ARCHIVE_LEN;
    let archive = match StateArchive::from_entries(case.entries.clone()) {
        Ok(archive) => {
            assert!(valid, "invalid entries accepted: {case:?}");
            archive
        }
        Err(e) => {
            assert!(!valid, "valid entries refused: {e}");
            return;
        }
    };
    let got: Vec<&str> = archive.entries().iter().map(|e| e.name()).collect();
    assert_eq!(got, names.iter().copied().collect::<Vec<_>>());
    for (name, data) in &case.entries {
        assert_eq!(archive.get(name), Some(data.as_slice()));
    }

    let version = if case.tpm2 {
        TpmVersion::V2_0
    } else {
        TpmVersion::V1_2
    };
    let model = if case.crb {
        TpmModel::Crb
    } else {
        TpmModel::Tis
    };
    let Ok(spec) = TpmSpec::new(version, model) else {
        assert!(!case.tpm2 && case.crb);
        return;
    };
    let Some(generation) = case.previous_generation.checked_add(1) else {
        return;
    };
    let guest = GuestId::from_bytes(case.guest);
    let policy = KdfPolicy {
        params: KdfParams::new(8, 1, 1).expect("the smallest parameters"),
        allow_weak: true,
    };
    let secret = |bytes: &[u8]| {
        let mut buf = SecretBuf::with_capacity(bytes.len()).expect("locked memory");
        buf.extend_from_slice(bytes).expect("capacity");
        buf
    };
    let acceptable = |p: &[u8]| !p.is_empty() && p.len() <= MAX_PASSPHRASE_LEN;
    let passphrase = secret(&case.passphrase);
    let data_key = DataKey::generate().expect("a data key");
    let mut keyslots = Vec::new();
    for p in std::iter::once(&case.passphrase).chain(&case.second_passphrase) {
        match new_keyslot(&data_key, &guest, &secret(p), &policy) {
            Ok(slot) => {
                assert!(acceptable(p));
                keyslots.push(slot);
            }
            Err(e) => {
                assert!(!acceptable(p), "passphrase refused: {e}");
                return;
            }
        }
    }
    let path = Path::new("fuzz.sealed");
    let sealed = SealedState {
        paths: SealedPaths::new(path),
        guest,
        spec,
        generation: case.previous_generation,
        keyslots,
        data_key,
        unlocked_slot: Some(0),
        current_damaged: false,
        sealed_digest: None,
    };
    let file = sealed
        .sealed_bytes(generation, &archive)
        .expect("sealing in memory");

    let info = super::inspect_bytes(path, &file).expect("inspect a fresh file");
    assert_eq!(info.guest, guest);
    assert_eq!(info.generation, generation);
    assert_eq!(info.keyslots.len(), sealed.keyslots.len());
    assert_eq!(info.header_bytes + info.body_bytes, file.len());

    let (opened, got) = open_bytes(
        path,
        &file,
        &guest,
        Credential::Passphrase(&passphrase),
        &policy,
        &mut Duration::default(),
    )
    .expect("open a fresh file");
    assert_eq!(got, archive);
    assert_eq!(opened.guest, guest);
    assert_eq!(opened.spec, spec);
    assert_eq!(opened.generation, generation);
    assert_eq!(opened.keyslots, sealed.keyslots);
    assert_eq!(opened.unlocked_slot, Some(0));
    let state_key = |s: &SealedState| s.swtpm_state_key().expect("state key");
    assert!(state_key(&opened).ct_eq(&state_key(&sealed)));

    if let Some(second) = case
        .second_passphrase
        .as_ref()
        .filter(|s| **s != case.passphrase)
    {
        let (by_second, again) = open_bytes(
            path,
            &file,
            &guest,
            Credential::Passphrase(&secret(second)),
            &policy,
            &mut Duration::default(),
        )
        .expect("second keyslot");
        assert_eq!(again, archive);
        assert_eq!(by_second.unlocked_slot, Some(1));
    }

    let mut wrong = case.passphrase.clone();
    wrong.push(b'!');
    let wrong_works = case.second_passphrase.as_ref() == Some(&wrong);
    if wrong.len() <= MAX_PASSPHRASE_LEN && !wrong_works {
        let result = open_bytes(
            path,
            &file,
            &guest,
            Credential::Passphrase(&secret(&wrong)),
            &policy,
            &mut Duration::default(),
        );
        assert!(
            matches!(result, Err(VaultError::WrongPassphrase { .. })),
            "wrong passphrase: {:?}",
            result.map(|_| ())
        );
    }

    let other = GuestId::from_bytes(case.other_guest);
    if other != guest {
        let result = open_bytes(
            path,
            &file,
            &other,
            Credential::Passphrase(&passphrase),
            &policy,
            &mut Duration::default(),
        );
        assert!(matches!(result, Err(VaultError::GuestMismatch { .. })));
    }

    let bits = file.len() * 8;
    let bit = usize::try_from(case.flip_bit).unwrap_or(usize::MAX) % bits;
    let mut damaged = file.clone();
    damaged[bit / 8] ^= 1 << (bit % 8);
    let result = open_bytes(
        path,
        &damaged,
        &guest,
        Credential::Passphrase(&passphrase),
        &policy,
        &mut Duration::default(),
    );
    assert!(
        matches!(
            result,
            Err(VaultError::Corrupt { .. } | VaultError::UnsupportedVersion { .. })
        ),
        "bit {bit} flipped: {:?}",
        result.map(|_| ())
    );
    // Secrets stay where they were put.
    assert_eq!(passphrase.expose_secret(), case.passphrase.as_slice());
}

/// Tries every keyslot of the credential's kind (a passphrase: those whose
/// parameters the policy accepts; a host key: those with its fingerprint).
/// The header's checksum has passed, so a tag that fails here means a
/// wrong secret.
fn unlock(
    path: &Path,
    header: &Header,
    guest: &GuestId,
    credential: Credential<'_>,
    policy: &KdfPolicy,
    kdf_time: &mut Duration,
) -> Result<(DataKey, usize), VaultError> {
    let mut refused = None;
    let mut tried = false;
    let own_fingerprint = match credential {
        Credential::Host(host) => Some(host.public().fingerprint()),
        _ => None,
    };
    for (index, slot) in header.keyslots.iter().enumerate() {
        let opened = match (credential, slot) {
            (Credential::Passphrase(passphrase), Keyslot::Passphrase { kdf, salt, .. }) => {
                if let Err(e) = policy.check(*kdf) {
                    refused = Some(e);
                    continue;
                }
                tried = true;
                let began = Instant::now();
                let kek = kdf::derive(passphrase, salt, *kdf);
                *kdf_time += began.elapsed();
                crypto::unwrap_key(&kek?, guest, slot)?
            }
            (Credential::Key(key), Keyslot::Key { salt, .. }) => {
                tried = true;
                let began = Instant::now();
                let kek = crypto::key_slot_kek(key, salt, guest);
                *kdf_time += began.elapsed();
                crypto::unwrap_key(&kek?, guest, slot)?
            }
            (Credential::Host(host), Keyslot::Host { fingerprint, .. })
                if Some(*fingerprint) == own_fingerprint =>
            {
                tried = true;
                let began = Instant::now();
                let opened = crypto::unwrap_for_host(host, guest, slot);
                *kdf_time += began.elapsed();
                opened?
            }
            _ => continue,
        };
        if let Some(key) = opened {
            return Ok((key, index));
        }
    }
    let kind = credential.kind();
    match (credential, refused) {
        (Credential::Passphrase(_), Some(e)) if !tried => Err(e),
        _ if !tried => Err(VaultError::NoKeyslot {
            path: path.to_owned(),
            kind,
            for_host: match credential {
                Credential::Host(host) => Some(host.public().fingerprint_hex()),
                _ => None,
            },
        }),
        (Credential::Passphrase(_), _) => Err(VaultError::WrongPassphrase {
            path: path.to_owned(),
        }),
        _ => Err(VaultError::WrongKey {
            path: path.to_owned(),
            kind,
        }),
    }
}
