//! Secrets leave no trace in the daemon's readable memory: once Start has
//! answered, the passphrase (raw or as the base64 it travelled in) is found
//! nowhere in vtpmd's readable pages; after Stop, neither is the guest's
//! swtpm state key (raw or hex, as handed to swtpm). After every call that
//! derives keys, no key derived from the passphrase and the sealed file
//! (KEK, data key, body keys, state and migration keys, the HKDF PRKs and
//! the AES key schedules) is either, nor, with a key slot and a host slot,
//! the key, its KEK and PRK, or this host's X25519 private key. A
//! passphrase refused for a JSON escape is found
//! neither unescaped nor decoded. Pages of locked secret memory
//! (memfd_secret) cannot be read through /proc at all, which is the point;
//! mlocked pages (the fallback where secretmem is unavailable) are where
//! secrets belong, so they are not searched.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use common::nv::attach_and_write_nv;
use common::{Daemon, b64};
use hkdf::Hkdf;
use secrecy::ExposeSecret;
use serde_json::json;
use sha2::Sha256;
use vtpmd::protocol::GuestId;
use vtpmd::secret::SecretBuf;
use vtpmd::vault::{KdfParams, KdfPolicy, SealedPaths, SealedState};

const GUEST: &str = "0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40";
const PASSPHRASE: &str = "Zq8!unmistakable-passphrase-4711-XyZ";
const NEW_PASSPHRASE: &str = "Wv3?another-unmistakable-passphrase-0815";

/// Every readable mapping of `pid` that is not locked; the ones the kernel
/// will not let us read (secretmem, guard pages, vsyscall) are skipped and
/// counted.
fn readable_memory(pid: i32) -> (Vec<Vec<u8>>, usize) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut mem = File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut regions = Vec::new();
    let mut unreadable = 0;
    for (range, perms, flags) in mappings(&smaps) {
        if !perms.starts_with('r') || flags.iter().any(|f| f == "lo") {
            continue;
        }
        let (start, end) = range;
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap()];
        let read = mem
            .seek(SeekFrom::Start(start))
            .and_then(|_| mem.read_exact(&mut buf));
        match read {
            Ok(()) => regions.push(buf),
            Err(_) => unreadable += 1,
        }
    }
    (regions, unreadable)
}

/// `((start, end), perms, VmFlags)` of each mapping in an smaps text.
fn mappings(smaps: &str) -> Vec<((u64, u64), String, Vec<String>)> {
    let mut out: Vec<((u64, u64), String, Vec<String>)> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.2 = flags.split_whitespace().map(str::to_owned).collect();
            }
        } else if let Some((start, end)) = first.split_once('-') {
            let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            else {
                continue;
            };
            let perms = fields.next().unwrap().to_owned();
            out.push(((start, end), perms, Vec::new()));
        }
    }
    out
}

fn occurrences(regions: &[Vec<u8>], needle: &[u8]) -> usize {
    regions
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .filter(|&(i, &b)| b == needle[0] && r[i..].starts_with(needle))
                .count()
        })
        .sum()
}

/// Byte strings to look for, each with a name; searched in one pass over
/// the memory, filtered on their first two bytes.
#[derive(Default)]
struct Needles {
    named: Vec<(String, Vec<u8>)>,
}

impl Needles {
    fn add(&mut self, name: impl Into<String>, bytes: &[u8]) {
        assert!(bytes.len() >= 16, "too short to search for");
        self.named.push((name.into(), bytes.to_vec()));
    }

    /// Hits per needle name, only those found.
    fn search(&self, regions: &[Vec<u8>]) -> BTreeMap<String, usize> {
        let mut by_prefix: BTreeMap<[u8; 2], Vec<usize>> = BTreeMap::new();
        let mut filter = vec![false; 1 << 16];
        for (i, (_, bytes)) in self.named.iter().enumerate() {
            let prefix = [bytes[0], bytes[1]];
            filter[usize::from(u16::from_le_bytes(prefix))] = true;
            by_prefix.entry(prefix).or_default().push(i);
        }
        let mut hits = BTreeMap::new();
        for region in regions {
            for (at, pair) in region.windows(2).enumerate() {
                let prefix = [pair[0], pair[1]];
                if !filter[usize::from(u16::from_le_bytes(prefix))] {
                    continue;
                }
                for &i in &by_prefix[&prefix] {
                    let (name, bytes) = &self.named[i];
                    if region[at..].starts_with(bytes) {
                        *hits.entry(name.clone()).or_insert(0) += 1;
                    }
                }
            }
        }
        hits
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// --- The keys, derived here from the specification alone ----------------

/// The headers of every generation of the sealed file seen while the test
/// ran (`<name>` and `<name>.prev`, polled), so that the body salts of
/// generations written and rotated out between two scans are known too.
struct Headers {
    seen: Arc<Mutex<BTreeSet<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
}

impl Headers {
    fn watch(current: PathBuf) -> Self {
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let previous = PathBuf::from(format!("{}.prev", current.display()));
        let poller = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for path in [&current, &previous] {
                        if let Some(header) = read_header(path) {
                            seen.lock().unwrap().insert(header);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Self {
            seen,
            stop,
            poller: Some(poller),
        }
    }

    /// Reads both files once more (nothing written since is missed) and
    /// returns every header seen so far.
    fn snapshot(&self, current: &Path) -> Vec<Vec<u8>> {
        let previous = PathBuf::from(format!("{}.prev", current.display()));
        let mut seen = self.seen.lock().unwrap();
        for path in [current, &previous] {
            if let Some(header) = read_header(path) {
                seen.insert(header);
            }
        }
        seen.iter().cloned().collect()
    }
}

impl Drop for Headers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
    }
}

const BOUND_LEN: usize = 84;
const SLOT_LEN: usize = 106;

/// The header (bound bytes, count, keyslots, checksum) of a sealed file.
fn read_header(path: &Path) -> Option<Vec<u8>> {
    let mut bytes = vec![0u8; BOUND_LEN + 1 + 8 * SLOT_LEN + 32];
    let mut file = File::open(path).ok()?;
    let mut filled = 0;
    while filled < bytes.len() {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(_) => return None,
        }
    }
    let count = usize::from(*bytes.get(BOUND_LEN)?);
    let len = BOUND_LEN + 1 + count * SLOT_LEN + 32;
    (filled >= len && &bytes[..8] == b"VTPMSEAL").then(|| bytes[..len].to_vec())
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().unwrap())
}

/// Argon2id over the passphrase with a keyslot's parameters and salt.
fn kek(passphrase: &[u8], slot: &[u8]) -> [u8; 32] {
    let params = argon2::Params::new(
        be_u32(&slot[2..6]),
        be_u32(&slot[6..10]),
        be_u32(&slot[10..14]),
        Some(32),
    )
    .unwrap();
    let mut out = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(passphrase, &slot[14..46], &mut out)
        .unwrap();
    out
}

/// The data key a keyslot wraps, if `kek` opens it.
fn unwrap_data_key(kek: &[u8; 32], guest: &[u8; 16], slot: &[u8]) -> Option<Vec<u8>> {
    let mut aad = b"vtpmd keyslot v1".to_vec();
    aad.extend_from_slice(guest);
    aad.extend_from_slice(&slot[..46]);
    let cipher = Aes256Gcm::new_from_slice(kek).unwrap();
    let nonce = Nonce::try_from(&slot[46..58]).unwrap();
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: &slot[58..106],
                aad: &aad,
            },
        )
        .ok()
}

/// HKDF-SHA256: the PRK and the 32-byte key.
fn hkdf(ikm: &[u8], salt: Option<&[u8]>, info: &[u8]) -> (Vec<u8>, [u8; 32]) {
    let (prk, hk) = Hkdf::<Sha256>::extract(salt, ikm);
    let mut okm = [0u8; 32];
    hk.expand(info, &mut okm).unwrap();
    (prk.to_vec(), okm)
}

/// The AES S-box, generated rather than tabulated.
fn sbox() -> [u8; 256] {
    let mut sbox = [0u8; 256];
    let (mut p, mut q) = (1u8, 1u8);
    loop {
        // p · 3 and q / 3 in GF(2^8): q stays p's inverse.
        p ^= (p << 1) ^ if p & 0x80 != 0 { 0x1b } else { 0 };
        q ^= q << 1;
        q ^= q << 2;
        q ^= q << 4;
        if q & 0x80 != 0 {
            q ^= 0x09;
        }
        let affine = q ^ q.rotate_left(1) ^ q.rotate_left(2) ^ q.rotate_left(3) ^ q.rotate_left(4);
        sbox[usize::from(p)] = affine ^ 0x63;
        if p == 1 {
            break;
        }
    }
    sbox[0] = 0x63;
    sbox
}

/// The 15 round keys of AES-256's encryption key schedule (FIPS 197 §5.2).
/// Round keys 0 and 1 are the key itself.
fn aes256_round_keys(key: &[u8; 32]) -> Vec<[u8; 16]> {
    let sbox = sbox();
    let mut w: Vec<[u8; 4]> = key.chunks(4).map(|c| c.try_into().unwrap()).collect();
    let mut rcon = 1u8;
    for i in 8..60 {
        let mut t = w[i - 1];
        if i % 8 == 0 {
            t = [
                sbox[usize::from(t[1])] ^ rcon,
                sbox[usize::from(t[2])],
                sbox[usize::from(t[3])],
                sbox[usize::from(t[0])],
            ];
            rcon = (rcon << 1) ^ if rcon & 0x80 != 0 { 0x1b } else { 0 };
        } else if i % 8 == 4 {
            t = t.map(|b| sbox[usize::from(b)]);
        }
        let prev = w[i - 8];
        w.push([
            prev[0] ^ t[0],
            prev[1] ^ t[1],
            prev[2] ^ t[2],
            prev[3] ^ t[3],
        ]);
    }
    w.chunks(4)
        .map(|c| c.concat().try_into().unwrap())
        .collect()
}

#[test]
fn the_aes_key_schedule_here_is_fips_197s() {
    // FIPS 197 appendix A.3.
    let key: [u8; 32] = (0..32)
        .map(|i| {
            u8::from_str_radix(
                &"603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"
                    [2 * i..2 * i + 2],
                16,
            )
            .unwrap()
        })
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let rk = aes256_round_keys(&key);
    assert_eq!(rk.len(), 15);
    assert_eq!(hex(&rk[2][..4]), "9ba35411");
    assert_eq!(hex(&rk[14][12..]), "706c631e");
}

/// An AES-256 key and the round keys of its schedule beyond the key.
fn add_aes_key(needles: &mut Needles, name: &str, key: &[u8; 32]) {
    needles.add(name, key);
    for (round, rk) in aes256_round_keys(key).iter().enumerate().skip(2) {
        needles.add(format!("{name} round key {round}"), rk);
    }
}

/// Every key derivable from the headers seen and the passphrases: each
/// keyslot's KEK, the data key, each generation's body key and PRK, the
/// swtpm state key (raw and hex) and its PRK.
fn derived_keys(headers: &[Vec<u8>], passphrases: &[&str]) -> Needles {
    let guest: [u8; 16] = GuestId::parse(GUEST).unwrap().as_bytes().to_owned();
    let mut needles = Needles::default();
    let mut data_key = None;
    let mut slots = BTreeSet::new();
    for header in headers {
        assert_eq!(header[10..26], guest);
        for slot in header[BOUND_LEN + 1..header.len() - 32].chunks(SLOT_LEN) {
            slots.insert(slot.to_vec());
        }
    }
    // Passphrase slots only (kind 01): key and host slots have no Argon2
    // parameters; their keys are `key_slot_keys`' and the host key's.
    for slot in slots.iter().filter(|slot| slot[0] == 1) {
        let salt = hex(&slot[14..18]);
        for passphrase in passphrases {
            let kek = kek(passphrase.as_bytes(), slot);
            if let Some(key) = unwrap_data_key(&kek, &guest, slot) {
                add_aes_key(&mut needles, &format!("KEK (slot salt {salt}…)"), &kek);
                data_key = Some(key);
            }
        }
    }
    let data_key = data_key.expect("some keyslot opens with a known passphrase");
    needles.add("data key", &data_key);
    let mut generations = BTreeSet::new();
    for header in headers {
        let generation = u64::from_be_bytes(header[26..34].try_into().unwrap());
        if !generations.insert(generation) {
            continue;
        }
        let (prk, body_key) = hkdf(
            &data_key,
            Some(&header[36..68]),
            b"vtpmd sealed body key v1",
        );
        add_aes_key(
            &mut needles,
            &format!("body key of generation {generation}"),
            &body_key,
        );
        needles.add(format!("body PRK of generation {generation}"), &prk);
    }
    let mut info = b"vtpmd swtpm state key v1".to_vec();
    info.extend_from_slice(&guest);
    let (prk, state_key) = hkdf(&data_key, None, &info);
    needles.add("swtpm state key", &state_key);
    needles.add("swtpm state key (hex)", hex(&state_key).as_bytes());
    needles.add("swtpm state key PRK", &prk);
    let mut info = b"vtpmd swtpm migration key v1".to_vec();
    info.extend_from_slice(&guest);
    let (_, migration_key) = hkdf(&data_key, None, &info);
    needles.add("swtpm migration key", &migration_key);
    needles.add("swtpm migration key (hex)", hex(&migration_key).as_bytes());
    needles
}

/// What a key slot's key leads to, from the spec: for every kind 02 slot
/// seen, its KEK (and the KEK's AES schedule) and HKDF PRK; and the key
/// itself, raw and as the base64 it travelled in.
fn key_slot_keys(headers: &[Vec<u8>], key: &[u8; 32]) -> Needles {
    use base64ct::{Base64, Encoding};
    let guest: [u8; 16] = GuestId::parse(GUEST).unwrap().as_bytes().to_owned();
    let mut needles = Needles::default();
    needles.add("key", key);
    needles.add("key (base64)", Base64::encode_string(key).as_bytes());
    let mut info = b"vtpmd key keyslot v2".to_vec();
    info.extend_from_slice(&guest);
    let mut seen = BTreeSet::new();
    for header in headers {
        for slot in header[BOUND_LEN + 1..header.len() - 32].chunks(SLOT_LEN) {
            if slot[0] != 2 || !seen.insert(slot.to_vec()) {
                continue;
            }
            let (prk, kek) = hkdf(key, Some(&slot[14..46]), &info);
            assert!(
                unwrap_data_key(&kek, &guest, slot).is_some(),
                "the key slot's KEK derived here does not open it"
            );
            let salt = hex(&slot[14..18]);
            add_aes_key(&mut needles, &format!("key slot KEK (salt {salt}…)"), &kek);
            needles.add(format!("key slot KEK PRK (salt {salt}…)"), &prk);
        }
    }
    needles
}

/// This host's X25519 private key as the file holds it, and clamped (what
/// x25519-dalek keeps).
fn host_key_needles(host_key_file: &Path) -> Needles {
    let bytes = std::fs::read(host_key_file).unwrap();
    let mut private: [u8; 32] = bytes[10..42].try_into().unwrap();
    let mut needles = Needles::default();
    needles.add("host private key", &private);
    private[0] &= 248;
    private[31] &= 127;
    private[31] |= 64;
    needles.add("host private key (clamped)", &private);
    needles
}

/// What opening a host slot computes, from the spec's spelled-out
/// OpenBase: for every kind 03 slot seen, the KEM's shared secret (by the
/// hpke crate's own decapsulation, the DH itself being internal to it),
/// the key schedule's secret, its AEAD key (and AES schedule) and its
/// exporter secret.
fn host_slot_keys(headers: &[Vec<u8>], host_key_file: &Path) -> Needles {
    use hpke::Deserializable;
    use hpke::kem::{Kem, X25519HkdfSha256};
    let guest: [u8; 16] = GuestId::parse(GUEST).unwrap().as_bytes().to_owned();
    let file = std::fs::read(host_key_file).unwrap();
    let sk = <X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(&file[10..42]).unwrap();
    let suite = b"HPKE\x00\x20\x00\x01\x00\x02";
    let extract = |salt: &[u8], label: &[u8], ikm: &[u8]| {
        let mut labeled = b"HPKE-v1".to_vec();
        labeled.extend_from_slice(suite);
        labeled.extend_from_slice(label);
        labeled.extend_from_slice(ikm);
        let salt = (!salt.is_empty()).then_some(salt);
        Hkdf::<Sha256>::extract(salt, &labeled).0.to_vec()
    };
    let expand = |prk: &[u8], label: &[u8], info: &[u8], len: usize| {
        let mut labeled = u16::try_from(len).unwrap().to_be_bytes().to_vec();
        labeled.extend_from_slice(b"HPKE-v1");
        labeled.extend_from_slice(suite);
        labeled.extend_from_slice(label);
        labeled.extend_from_slice(info);
        let mut out = vec![0u8; len];
        Hkdf::<Sha256>::from_prk(prk)
            .unwrap()
            .expand(&labeled, &mut out)
            .unwrap();
        out
    };
    let mut info = b"vtpmd host keyslot v2".to_vec();
    info.extend_from_slice(&guest);
    let mut context = vec![0u8];
    context.extend_from_slice(&extract(b"", b"psk_id_hash", b""));
    context.extend_from_slice(&extract(b"", b"info_hash", &info));
    let mut needles = Needles::default();
    let mut seen = BTreeSet::new();
    for header in headers {
        for slot in header[BOUND_LEN + 1..header.len() - 32].chunks(SLOT_LEN) {
            if slot[0] != 3 || !seen.insert(slot.to_vec()) {
                continue;
            }
            let enc = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&slot[26..58]).unwrap();
            let Ok(shared) = X25519HkdfSha256::decap(&sk, None, &enc) else {
                continue;
            };
            let shared = shared.0.to_vec();
            let secret = extract(&shared, b"secret", b"");
            let key: [u8; 32] = expand(&secret, b"key", &context, 32).try_into().unwrap();
            let nonce = expand(&secret, b"base_nonce", &context, 12);
            // The key schedule is right if it opens the slot (for a slot
            // of another host, decap gives garbage and the open fails).
            let mut aad = b"vtpmd keyslot v1".to_vec();
            aad.extend_from_slice(&guest);
            aad.extend_from_slice(&slot[..26]);
            let opens = Aes256Gcm::new_from_slice(&key)
                .unwrap()
                .decrypt(
                    &Nonce::try_from(nonce.as_slice()).unwrap(),
                    Payload {
                        msg: &slot[58..106],
                        aad: &aad,
                    },
                )
                .is_ok();
            if !opens {
                continue;
            }
            let tag = hex(&slot[26..30]);
            needles.add(format!("HPKE shared secret (enc {tag}…)"), &shared);
            needles.add(format!("HPKE key schedule secret (enc {tag}…)"), &secret);
            add_aes_key(&mut needles, &format!("HPKE AEAD key (enc {tag}…)"), &key);
            needles.add(
                format!("HPKE exporter secret (enc {tag}…)"),
                &expand(&secret, b"exp", &context, 32),
            );
        }
    }
    assert!(
        !needles.named.is_empty() || seen.is_empty(),
        "no host slot of this host opens with the key schedule derived here"
    );
    needles
}

#[test]
fn no_key_slot_kek_nor_host_private_key_in_readable_memory() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: reading a non-dumpable daemon's memory needs root");
        return;
    }
    use base64ct::{Base64, Encoding};
    let d = Daemon::start();
    let headers = Headers::watch(d.sealed_file(GUEST));
    let key: [u8; 32] = std::array::from_fn(|i| 0xa5 ^ u8::try_from(i * 37 % 251).unwrap());
    let key_b64 = Base64::encode_string(&key);
    let mut c = d.client();
    let me = c.manager("GetHostKey", json!({})).unwrap();
    let host_key_file = d.state_dir.join("host.key");
    let mut found: Vec<(&str, BTreeMap<String, usize>)> = Vec::new();
    let mut look = |after: &'static str, headers: &Headers| {
        let seen = headers.snapshot(&d.sealed_file(GUEST));
        let mut needles = derived_keys(&seen, &[PASSPHRASE]);
        needles.named.extend(key_slot_keys(&seen, &key).named);
        needles.named.extend(host_key_needles(&host_key_file).named);
        needles
            .named
            .extend(host_slot_keys(&seen, &host_key_file).named);
        let (regions, unreadable) = readable_memory(d.pid());
        // The control: the daemon holds its state directory's path.
        assert!(
            occurrences(&regions, d.state_dir.to_str().unwrap().as_bytes()) > 0,
            "the scan finds nothing at all"
        );
        let hits = needles.search(&regions);
        eprintln!(
            "after {after}: {} byte strings searched ({unreadable} regions unreadable): {} hits {hits:?}",
            needles.named.len(),
            hits.values().sum::<usize>()
        );
        found.push((after, hits));
    };

    c.manager(
        "Create",
        json!({"guest": GUEST, "version": "2.0", "passphrase": b64(PASSPHRASE),
               "policy": "deployment", "key": key_b64}),
    )
    .unwrap();
    look("Create (deployment)", &headers);
    c.manager(
        "Grant",
        json!({"guest": GUEST, "key": key_b64, "host_public_key": me["public_key"]}),
    )
    .unwrap();
    look("Grant", &headers);
    let running = c
        .manager("Start", json!({"guest": GUEST, "key": key_b64}))
        .unwrap();
    assert_eq!(running["guest"]["state"], "running");
    let ctrl = running["guest"]["ctrl_socket"].as_str().unwrap().to_owned();
    let vmm = attach_and_write_nv(Path::new(&ctrl), b"a guest's write");
    look("Start with the key", &headers);
    c.manager("Stop", json!({"guest": GUEST})).unwrap();
    drop(vmm);
    look("Stop", &headers);
    let running = c.manager("Start", json!({"guest": GUEST})).unwrap();
    assert_eq!(running["guest"]["state"], "running");
    look("Start with this host's key", &headers);
    c.manager("Revoke", json!({"guest": GUEST, "slot": 2}))
        .unwrap();
    look("Revoke", &headers);
    c.manager("Stop", json!({"guest": GUEST})).unwrap();
    look("Stop again", &headers);

    let total: usize = found.iter().flat_map(|(_, h)| h.values()).sum();
    assert_eq!(total, 0, "keys in readable memory: {found:?}");
}

#[test]
fn the_keys_derived_here_open_a_file_the_vault_wrote() {
    // The independent derivation must agree with the implementation, or
    // the memory test below would search for the wrong bytes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tpm.sealed");
    let mut pass = SecretBuf::with_capacity(PASSPHRASE.len()).unwrap();
    pass.extend_from_slice(PASSPHRASE.as_bytes()).unwrap();
    let policy = KdfPolicy {
        params: KdfParams::new(64, 1, 1).unwrap(),
        allow_weak: true,
    };
    let guest = GuestId::parse(GUEST).unwrap();
    let spec = vtpmd::protocol::TpmSpec::new(
        vtpmd::protocol::TpmVersion::V2_0,
        vtpmd::protocol::TpmModel::Tis,
    )
    .unwrap();
    let archive = vtpmd::vault::StateArchive::from_entries(vec![(
        "tpm2-00.permall".to_owned(),
        b"state".to_vec(),
    )])
    .unwrap();
    let state = SealedState::create(
        SealedPaths::new(&path),
        guest,
        spec,
        &pass,
        &policy,
        &archive,
    )
    .unwrap();
    let needles = derived_keys(&[read_header(&path).unwrap()], &[PASSPHRASE]);
    let state_key = state.swtpm_state_key().unwrap();
    let named = |name: &str| {
        needles
            .named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.clone())
            .unwrap()
    };
    assert_eq!(named("swtpm state key"), state_key.expose_secret());
    let migration_key = state.swtpm_migration_key().unwrap();
    assert_eq!(named("swtpm migration key"), migration_key.expose_secret());
    let file = std::fs::read(&path).unwrap();
    let header_len = read_header(&path).unwrap().len();
    let mut aad = file[..BOUND_LEN].to_vec();
    aad.extend_from_slice(guest.as_bytes());
    let body_key = named("body key of generation 1");
    let plaintext = Aes256Gcm::new_from_slice(&body_key)
        .unwrap()
        .decrypt(
            &Nonce::try_from(&file[68..80]).unwrap(),
            Payload {
                msg: &file[header_len..],
                aad: &aad,
            },
        )
        .unwrap();
    // The archive encoding of one entry, per the specification.
    let mut expected = vec![0, 1, 15];
    expected.extend_from_slice(b"tpm2-00.permall");
    expected.extend_from_slice(&5u32.to_be_bytes());
    expected.extend_from_slice(b"state");
    assert_eq!(plaintext, expected);
}

/// Scans vtpmd's readable memory for every key derivable so far; returns
/// the hits and prints what was searched.
fn scan(
    d: &Daemon,
    headers: &Headers,
    passphrases: &[&str],
    after: &str,
) -> BTreeMap<String, usize> {
    let needles = derived_keys(&headers.snapshot(&d.sealed_file(GUEST)), passphrases);
    let (regions, unreadable) = readable_memory(d.pid());
    let scanned: usize = regions.iter().map(Vec::len).sum();
    // A control: the daemon holds its state directory's path for its
    // whole life (a guest id in a freed buffer may or may not survive).
    let control = d.state_dir.to_str().unwrap();
    assert!(
        occurrences(&regions, control.as_bytes()) > 0,
        "the scan finds nothing at all"
    );
    let hits = needles.search(&regions);
    eprintln!(
        "after {after}: {} byte strings searched in {} KiB ({} regions, {unreadable} unreadable): {} hits {hits:?}",
        needles.named.len(),
        scanned / 1024,
        regions.len(),
        hits.values().sum::<usize>(),
    );
    hits
}

#[test]
fn no_derived_key_in_readable_memory_after_any_call() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: reading a non-dumpable daemon's memory needs root");
        return;
    }
    let d = Daemon::start();
    let headers = Headers::watch(d.sealed_file(GUEST));
    let mut c = d.client();
    let mut found: Vec<(&str, BTreeMap<String, usize>)> = Vec::new();
    let old = &[PASSPHRASE][..];
    let both = &[PASSPHRASE, NEW_PASSPHRASE][..];

    c.manager(
        "Create",
        json!({"guest": GUEST, "version": "2.0", "passphrase": b64(PASSPHRASE)}),
    )
    .unwrap();
    found.push(("Create", scan(&d, &headers, old, "Create")));

    let running = c
        .manager(
            "Start",
            json!({"guest": GUEST, "passphrase": b64(PASSPHRASE)}),
        )
        .unwrap();
    assert_eq!(running["guest"]["state"], "running");
    found.push(("Start", scan(&d, &headers, old, "Start")));

    let generation = d.guest_status(GUEST)["generation"].as_u64().unwrap();
    let ctrl = running["guest"]["ctrl_socket"].as_str().unwrap();
    // The VMM stays attached (a closed data channel ends swtpm) until Stop.
    let vmm = attach_and_write_nv(Path::new(ctrl), b"a guest's write");
    d.wait_generation_above(GUEST, generation, Duration::from_secs(10));
    found.push(("reseal", scan(&d, &headers, old, "a reseal")));

    c.manager(
        "Rekey",
        json!({"guest": GUEST, "passphrase": b64(PASSPHRASE), "new_passphrase": b64(NEW_PASSPHRASE)}),
    )
    .unwrap();
    found.push(("Rekey", scan(&d, &headers, both, "Rekey")));

    c.manager("Stop", json!({"guest": GUEST})).unwrap();
    drop(vmm);
    found.push(("Stop", scan(&d, &headers, both, "Stop")));

    // Delete removes the files: the keys are derived from what was seen.
    let needles_before_delete = headers.snapshot(&d.sealed_file(GUEST));
    c.manager("Delete", json!({"guest": GUEST})).unwrap();
    let needles = derived_keys(&needles_before_delete, both);
    let (regions, _) = readable_memory(d.pid());
    let hits = needles.search(&regions);
    eprintln!(
        "after Delete: {} hits {hits:?}",
        hits.values().sum::<usize>()
    );
    found.push(("Delete", hits));

    let total: usize = found.iter().flat_map(|(_, h)| h.values()).sum();
    assert_eq!(total, 0, "derived keys in readable memory: {found:?}");
}

#[test]
fn no_passphrase_after_start_and_no_key_after_stop_in_readable_memory() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: reading a non-dumpable daemon's memory needs root");
        return;
    }
    let d = Daemon::start();
    let mut c = d.client();
    c.manager(
        "Create",
        json!({"guest": GUEST, "version": "2.0", "passphrase": b64(PASSPHRASE)}),
    )
    .unwrap();
    let running = c
        .manager(
            "Start",
            json!({"guest": GUEST, "passphrase": b64(PASSPHRASE)}),
        )
        .unwrap();
    assert_eq!(running["guest"]["state"], "running");

    let (regions, unreadable) = readable_memory(d.pid());
    let scanned: usize = regions.iter().map(Vec::len).sum();
    eprintln!(
        "after Start: scanned {} KiB in {} regions, {unreadable} unreadable",
        scanned / 1024,
        regions.len()
    );
    // A control: the daemon holds its state directory's path for its
    // whole life (a guest id in a freed buffer may or may not survive).
    let control = d.state_dir.to_str().unwrap();
    assert!(
        occurrences(&regions, control.as_bytes()) > 0,
        "the scan finds nothing at all"
    );
    assert_eq!(
        occurrences(&regions, PASSPHRASE.as_bytes()),
        0,
        "passphrase in readable memory"
    );
    assert_eq!(
        occurrences(&regions, b64(PASSPHRASE).as_bytes()),
        0,
        "base64 passphrase in readable memory"
    );

    c.manager("Stop", json!({"guest": GUEST})).unwrap();
    // The key the daemon held while the guest ran, derived here from the
    // sealed file with the passphrase.
    let mut pass = SecretBuf::with_capacity(PASSPHRASE.len()).unwrap();
    pass.extend_from_slice(PASSPHRASE.as_bytes()).unwrap();
    let policy = KdfPolicy {
        params: KdfParams::new(64, 1, 1).unwrap(),
        allow_weak: true,
    };
    let sealed = SealedState::open(
        SealedPaths::new(d.sealed_file(GUEST)),
        GuestId::parse(GUEST).unwrap(),
        &pass,
        &policy,
    )
    .unwrap();
    let key = sealed.state.swtpm_state_key().unwrap();

    let (regions, _) = readable_memory(d.pid());
    assert_eq!(
        occurrences(&regions, key.expose_secret()),
        0,
        "state key in readable memory"
    );
    assert_eq!(
        occurrences(&regions, hex(key.expose_secret()).as_bytes()),
        0,
        "hex state key in readable memory"
    );
    assert_eq!(occurrences(&regions, PASSPHRASE.as_bytes()), 0);
}

/// A passphrase whose base64 has a `/` (the bytes `???` encode as
/// `Pz8/`), which PHP's json_encode writes as `\/`.
const SLASHED_PASSPHRASE: &str = "unmistakable???escaped-passphrase-0815";

#[test]
fn an_escaped_passphrase_is_refused_before_it_is_unescaped() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: reading a non-dumpable daemon's memory needs root");
        return;
    }
    let text = b64(SLASHED_PASSPHRASE);
    assert!(text.contains('/'), "{text}");
    let d = Daemon::start();
    let mut c = d.client();
    let escaped = text.replace('/', "\\/");
    let mut message = format!(
        r#"{{"method":"io.vtpmd.Manager.Create","parameters":{{"guest":"{GUEST}","version":"2.0","passphrase":"{escaped}"}}}}"#
    )
    .into_bytes();
    message.push(0);
    c.send_raw(&message);
    let reply = c.read_reply();
    assert_eq!(
        reply["error"], "org.varlink.service.InvalidParameter",
        "{reply}"
    );
    assert_eq!(reply["parameters"], json!({"parameter": "passphrase"}));
    assert!(!d.sealed_file(GUEST).exists(), "nothing was created");

    let (regions, _) = readable_memory(d.pid());
    // A control: the daemon holds its state directory's path for its
    // whole life (a guest id in a freed buffer may or may not survive).
    let control = d.state_dir.to_str().unwrap();
    assert!(
        occurrences(&regions, control.as_bytes()) > 0,
        "the scan finds nothing at all"
    );
    assert_eq!(
        occurrences(&regions, text.as_bytes()),
        0,
        "the unescaped base64 in readable memory"
    );
    assert_eq!(
        occurrences(&regions, SLASHED_PASSPHRASE.as_bytes()),
        0,
        "the decoded passphrase in readable memory"
    );
    // Nor any part of the value longer than what serde could leave of it
    // before the first escape.
    let after_escape = &text[text.find('/').unwrap()..];
    if after_escape.len() >= 8 {
        assert_eq!(occurrences(&regions, after_escape.as_bytes()), 0);
    }
}
