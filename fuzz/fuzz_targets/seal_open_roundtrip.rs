//! Structure-aware: arbitrary archive entries, passphrases and guests are
//! sealed and opened again in memory (the vault's own code minus the file
//! system); the opened state must equal the sealed one, and a wrong
//! passphrase, another guest or a flipped bit must be refused.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vtpmd::vault::FuzzSealCase;

/// A file name: mostly from the format's alphabet, so that most cases get
/// past the archive's checks, sometimes anything at all.
#[derive(Debug, Arbitrary)]
enum Name {
    Plain(Vec<u8>),
    Raw(String),
}

impl Name {
    fn text(self) -> String {
        const ALPHABET: &[u8] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";
        match self {
            Name::Plain(bytes) => bytes
                .iter()
                .map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
                .collect(),
            Name::Raw(text) => text,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Case {
    guest: [u8; 16],
    tpm2: bool,
    crb: bool,
    entries: Vec<(Name, Vec<u8>)>,
    passphrase: Vec<u8>,
    second_passphrase: Option<Vec<u8>>,
    previous_generation: u64,
    other_guest: [u8; 16],
    flip_bit: u32,
}

fuzz_target!(|case: Case| {
    vtpmd::vault::fuzz_seal_open(&FuzzSealCase {
        guest: case.guest,
        tpm2: case.tpm2,
        crb: case.crb,
        entries: case
            .entries
            .into_iter()
            .map(|(name, data)| (name.text(), data))
            .collect(),
        passphrase: case.passphrase,
        second_passphrase: case.second_passphrase,
        previous_generation: case.previous_generation,
        other_guest: case.other_guest,
        flip_bit: case.flip_bit,
    });
});
