//! Vault benchmark: prints figures, asserts nothing.
//!
//! `cargo bench --bench vault` measures, in one run:
//! - Argon2id through the vault (a full open with the default parameters)
//!   against the raw `argon2` crate with the same parameters;
//! - seal (encrypt + durable write) and open (authenticate + decrypt +
//!   decode) of a 64 KiB state, against raw AES-256-GCM on the same bytes.

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up should stop

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use vtpmd::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::vault::{KdfParams, KdfPolicy, SealedPaths, SealedState, StateArchive};

const STATE_LEN: usize = 64 * 1024;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                black_box(f());
                start.elapsed()
            })
            .collect(),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let guest = GuestId::parse("0f6a2d1e-8c4b-4e2a-9d3f-5b7c1a2e3f40").unwrap();
    let spec = TpmSpec::new(TpmVersion::V2_0, TpmModel::Tis).unwrap();
    let mut pass = SecretBuf::with_capacity(32).unwrap();
    pass.extend_from_slice(b"benchmark passphrase").unwrap();
    let state: Vec<u8> = (0..STATE_LEN)
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    let archive =
        StateArchive::from_entries([("tpm2-00.permall".to_owned(), state.clone())]).unwrap();

    println!(
        "vault benchmark (median of runs; {} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<58} {:>10} {:>10}", "figure", "value", "ratio");

    // Argon2id: the vault's open with the default parameters is one KDF
    // plus a 64 KiB decrypt; the baseline is the argon2 crate alone.
    let default = KdfPolicy::default();
    let p = default.params;
    let paths = SealedPaths::new(dir.path().join("kdf.sealed"));
    SealedState::create(paths.clone(), guest, spec, &pass, &default, &archive).unwrap();
    let raw = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(p.memory_kib(), p.iterations(), p.lanes(), Some(32)).unwrap(),
    );
    // Alternate the two so that drift on a shared machine hits both alike.
    let (mut raw_samples, mut vault_samples) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        raw_samples.push(time(1, || {
            let mut out = [0u8; 32];
            raw.hash_password_into(b"benchmark passphrase", &[7u8; 32], &mut out)
                .unwrap();
            out
        }));
        vault_samples.push(time(1, || {
            SealedState::open(paths.clone(), guest, &pass, &default).unwrap()
        }));
    }
    let (raw_kdf, vault_open) = (median(raw_samples), median(vault_samples));
    println!(
        "{:<58} {:>8.1}ms {:>10}",
        format!("raw argon2 crate, {p}"),
        ms(raw_kdf),
        "1.00"
    );
    println!(
        "{:<58} {:>8.1}ms {:>10.3}",
        "vault open (same KDF + 64 KiB unseal)",
        ms(vault_open),
        vault_open.as_secs_f64() / raw_kdf.as_secs_f64()
    );

    // Seal and unseal with a negligible KDF, so the figure is the body's.
    let cheap = KdfPolicy {
        params: KdfParams::new(8, 1, 1).unwrap(),
        allow_weak: true,
    };
    let paths = SealedPaths::new(dir.path().join("body.sealed"));
    let mut sealed =
        SealedState::create(paths.clone(), guest, spec, &pass, &cheap, &archive).unwrap();
    let runs = 101;
    let key = [9u8; 32];
    let cipher = Aes256Gcm::new_from_slice(&key).unwrap();
    let raw_gcm = time(runs, || {
        let mut buf = state.clone();
        cipher
            .encrypt_inout_detached(&Nonce::from([0u8; 12]), b"", buf.as_mut_slice().into())
            .unwrap()
    });
    let seal = time(runs, || sealed.seal(&archive).unwrap());
    let open = time(runs, || {
        SealedState::open(paths.clone(), guest, &pass, &cheap).unwrap()
    });
    let ratio = |d: Duration| d.as_secs_f64() / raw_gcm.as_secs_f64();
    println!(
        "{:<58} {:>8.0}MB/s {:>8}",
        "raw AES-256-GCM, 64 KiB",
        mb_per_s(STATE_LEN, raw_gcm),
        "1.00"
    );
    println!(
        "{:<58} {:>8.0}MB/s {:>10.1}",
        "vault seal, 64 KiB (encrypt + temp/fsync/rename/fsync dir)",
        mb_per_s(STATE_LEN, seal),
        ratio(seal)
    );
    println!("{:<58} {:>8.3}ms", "  per seal", ms(seal));
    println!(
        "{:<58} {:>8.0}MB/s {:>10.1}",
        "vault open, 64 KiB (read + KDF m=8 KiB + decrypt + decode)",
        mb_per_s(STATE_LEN, open),
        ratio(open)
    );
    println!("{:<58} {:>8.3}ms", "  per open", ms(open));
}
