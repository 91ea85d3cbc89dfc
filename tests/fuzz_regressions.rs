//! Replays the fuzzers' inputs without a fuzzer: every committed seed under
//! `fuzz/corpus/<target>/` and every crash kept under
//! `fuzz/regressions/<target>/` goes through the same entry point as the
//! fuzz target of that name, so a fixed crash stays fixed in plain
//! `cargo test`.
//!
//! The seeds are produced by the code itself:
//! `cargo test --test fuzz_regressions -- --ignored write_seeds` rewrites
//! them.
//!
//! `seal_open_roundtrip` takes `arbitrary`-encoded input, which only the
//! fuzz crate can decode; its cases are written out below instead, crashes
//! included (as `cargo fuzz fmt` prints them).

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::fs;
use std::path::{Path, PathBuf};

use vtpmd::protocol::GuestId;
use vtpmd::secret::SecretBuf;
use vtpmd::vault::{FuzzSealCase, KdfParams, KdfPolicy, SealedPaths, SealedState, StateArchive};

type EntryPoint = fn(&[u8]);
/// Named seeds of one target.
type Seeds = Vec<(String, Vec<u8>)>;

/// The byte-input targets and their entry points.
const TARGETS: &[(&str, EntryPoint)] = &[
    ("varlink_call", vtpmd::api::fuzz_messages),
    ("varlink_message", |b| {
        vtpmd::protocol::fuzz_call(b);
    }),
    ("sealed_file", |b| {
        vtpmd::vault::fuzz_sealed_file(b);
    }),
    ("archive", |b| {
        vtpmd::vault::fuzz_archive(b);
    }),
    ("ctrl_response", vtpmd::swtpm::ctrl::codec::fuzz_decode),
    ("config", |b| {
        vtpmd::config::fuzz_config(b);
    }),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Regular files directly in `dir`, skipping dot-files; none if it is absent.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(items) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = items
        .map(|item| item.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

#[test]
fn every_seed_and_regression_replays_without_panicking() {
    let mut seeds = 0;
    for &(target, run) in TARGETS {
        let corpus = inputs(&fuzz_dir().join("corpus").join(target));
        assert!(!corpus.is_empty(), "no seeds for {target}");
        seeds += corpus.len();
        let regressions = inputs(&fuzz_dir().join("regressions").join(target));
        for path in corpus.iter().chain(&regressions) {
            let bytes = fs::read(path).unwrap();
            // A panic names the input through this message's absence; say
            // which one first.
            eprintln!("{target}: {}", path.display());
            run(&bytes);
        }
    }
    assert!(seeds >= 20, "only {seeds} seeds");
}

#[test]
fn the_seeds_reach_past_the_first_checks() {
    // A seed that every decoder refuses at once teaches the fuzzer little.
    let corpus = |target: &str| inputs(&fuzz_dir().join("corpus").join(target));
    let deepest = corpus("sealed_file")
        .iter()
        .map(|p| vtpmd::vault::fuzz_sealed_file(&fs::read(p).unwrap()))
        .max();
    assert_eq!(deepest, Some(3), "no sealed-file seed reaches the archive");
    assert!(
        corpus("archive")
            .iter()
            .any(|p| vtpmd::vault::fuzz_archive(&fs::read(p).unwrap()))
    );
    assert!(
        corpus("config")
            .iter()
            .any(|p| vtpmd::config::fuzz_config(&fs::read(p).unwrap()))
    );
}

const GUEST: [u8; 16] = [
    0x0f, 0x6a, 0x2d, 0x1e, 0x8c, 0x4b, 0x4e, 0x2a, 0x9d, 0x3f, 0x5b, 0x7c, 0x1a, 0x2e, 0x3f, 0x40,
];

fn case() -> FuzzSealCase {
    FuzzSealCase {
        guest: GUEST,
        tpm2: true,
        crb: true,
        entries: vec![
            ("tpm2-00.volatilestate".to_owned(), vec![2; 100]),
            ("tpm2-00.permall".to_owned(), vec![1; 300]),
        ],
        passphrase: b"correct horse".to_vec(),
        second_passphrase: None,
        previous_generation: 0,
        other_guest: [0; 16],
        flip_bit: 0,
    }
}

#[test]
fn seal_open_roundtrip_cases() {
    let base = case();
    let mut cases = vec![base.clone()];
    let mut with = |f: &dyn Fn(&mut FuzzSealCase)| {
        let mut c = base.clone();
        f(&mut c);
        cases.push(c);
    };
    with(&|c| c.entries.clear());
    with(&|c| c.entries.push(("../escape".to_owned(), vec![])));
    with(&|c| c.entries.push((".lock".to_owned(), vec![])));
    with(&|c| c.entries.push(("tpm2-00.permall".to_owned(), vec![9])));
    with(&|c| c.entries.push(("ä".to_owned(), vec![])));
    with(&|c| {
        c.entries = (0..65).map(|i| (format!("f{i:02}"), vec![])).collect();
    });
    with(&|c| c.passphrase.clear());
    with(&|c| c.passphrase = vec![b'x'; 4097]);
    with(&|c| c.passphrase = vec![0xff; 4096]);
    with(&|c| {
        c.tpm2 = false;
        c.crb = false;
    });
    with(&|c| c.tpm2 = false);
    with(&|c| c.second_passphrase = Some(b"another".to_vec()));
    with(&|c| c.second_passphrase = Some(b"correct horse!".to_vec()));
    with(&|c| c.second_passphrase = Some(b"correct horse".to_vec()));
    with(&|c| c.second_passphrase = Some(Vec::new()));
    with(&|c| c.previous_generation = u64::MAX - 1);
    with(&|c| c.previous_generation = u64::MAX);
    with(&|c| c.other_guest = GUEST);
    with(&|c| c.flip_bit = u32::MAX);
    for (i, c) in cases.iter().enumerate() {
        eprintln!("case {i}");
        vtpmd::vault::fuzz_seal_open(c);
    }
}

#[test]
fn seal_open_roundtrip_refuses_every_flipped_bit_of_a_small_file() {
    let mut c = case();
    c.entries = vec![("a".to_owned(), vec![7])];
    // Header (1 keyslot): 223 bytes; body: archive 12 bytes + tag 16.
    for bit in (0..(223 + 28) * 8).step_by(7) {
        c.flip_bit = bit;
        vtpmd::vault::fuzz_seal_open(&c);
    }
}

// ---- Seeds ----------------------------------------------------------------

fn weak_policy() -> KdfPolicy {
    KdfPolicy {
        params: KdfParams::new(8, 1, 1).unwrap(),
        allow_weak: true,
    }
}

fn passphrase(text: &str) -> SecretBuf {
    let mut buf = SecretBuf::with_capacity(text.len()).unwrap();
    buf.extend_from_slice(text.as_bytes()).unwrap();
    buf
}

fn archive(entries: &[(&str, &[u8])]) -> StateArchive {
    StateArchive::from_entries(
        entries
            .iter()
            .map(|(name, data)| ((*name).to_owned(), data.to_vec())),
    )
    .unwrap()
}

/// The archive's encoding (`docs/sealed-format.md`): u16 count, then per
/// entry u8 name length, name, u32 data length, data; big-endian.
fn encode_archive(archive: &StateArchive) -> Vec<u8> {
    let mut out = u16::try_from(archive.entries().len())
        .unwrap()
        .to_be_bytes()
        .to_vec();
    for e in archive.entries() {
        out.push(u8::try_from(e.name().len()).unwrap());
        out.extend_from_slice(e.name().as_bytes());
        out.extend_from_slice(&u32::try_from(e.data().len()).unwrap().to_be_bytes());
        out.extend_from_slice(e.data());
    }
    out
}

const BOUND_LEN: usize = 84;
const KEYSLOT_LEN: usize = 106;

/// `file` with its body replaced by `plaintext` and a zero tag, and its
/// length and checksum made right: the fuzzer's checksum and body fix-ups
/// then reach the archive decoder with `plaintext`.
fn with_plain_body(file: &[u8], plaintext: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let count = usize::from(file[BOUND_LEN]);
    let header_len = BOUND_LEN + 1 + count * KEYSLOT_LEN + 32;
    let mut out = file[..header_len].to_vec();
    let body_len = u32::try_from(plaintext.len() + 16).unwrap();
    out[BOUND_LEN - 4..BOUND_LEN].copy_from_slice(&body_len.to_be_bytes());
    let checksum = sha2::Sha256::digest(&out[..header_len - 32]);
    out[header_len - 32..].copy_from_slice(&checksum);
    out.extend_from_slice(plaintext);
    out.extend_from_slice(&[0; 16]);
    out
}

fn sealed_files() -> Seeds {
    use vtpmd::protocol::{TpmModel, TpmSpec, TpmVersion};
    let dir = tempfile::tempdir().unwrap();
    let policy = weak_policy();
    let guest = GuestId::from_bytes(GUEST);
    let perm: Vec<u8> = (0..=255).collect();
    let mut files = Vec::new();
    let mut seal = |name: &str, spec: TpmSpec, archive: &StateArchive, extra: u32| {
        let paths = SealedPaths::new(dir.path().join(name));
        let mut state = SealedState::create(
            paths.clone(),
            guest,
            spec,
            &passphrase("fuzz"),
            &policy,
            archive,
        )
        .unwrap();
        for i in 0..extra {
            state
                .add_passphrase(&passphrase(&format!("fuzz{i}")), &policy)
                .unwrap();
        }
        if extra > 0 {
            // A second generation, so `.prev` exists too.
            state.seal(archive).unwrap();
        }
        files.push((name.to_owned(), fs::read(paths.current()).unwrap()));
    };
    let v2_crb = TpmSpec::new(TpmVersion::V2_0, TpmModel::Crb).unwrap();
    let v12_tis = TpmSpec::new(TpmVersion::V1_2, TpmModel::Tis).unwrap();
    let v2_tis = TpmSpec::new(TpmVersion::V2_0, TpmModel::Tis).unwrap();
    seal("empty-archive", v2_crb, &archive(&[]), 0);
    seal(
        "tpm2-two-files",
        v2_crb,
        &archive(&[
            ("tpm2-00.permall", &perm),
            ("tpm2-00.volatilestate", b"volatile"),
        ]),
        0,
    );
    seal(
        "tpm12-one-file",
        v12_tis,
        &archive(&[("tpm-00.permall", b"perm")]),
        0,
    );
    seal(
        "three-keyslots",
        v2_tis,
        &archive(&[("tpm2-00.permall", b"p")]),
        2,
    );
    seal(
        "eight-keyslots",
        v2_crb,
        &archive(&[("tpm2-00.permall", b"p")]),
        7,
    );
    {
        // Format version 2: a passphrase, a key and a host slot.
        let paths = SealedPaths::new(dir.path().join("key-and-host-slots"));
        let mut state = SealedState::create(
            paths.clone(),
            guest,
            v2_tis,
            &passphrase("fuzz"),
            &policy,
            &archive(&[("tpm2-00.permall", &perm[..32])]),
        )
        .unwrap();
        state.add_key(&passphrase(&"k".repeat(32))).unwrap();
        let host = vtpmd::vault::HostKey::generate().unwrap();
        state.add_host(&host.public()).unwrap();
        files.push((
            "key-and-host-slots".to_owned(),
            fs::read(paths.current()).unwrap(),
        ));
    }
    let plain = [
        (
            "plain-body-two-files",
            encode_archive(&archive(&[("a", b"1"), ("tpm2-00.permall", &perm[..64])])),
        ),
        ("plain-body-empty", encode_archive(&archive(&[]))),
    ];
    let base = files[0].1.clone();
    let keyslots3 = files[3].1.clone();
    for (name, body) in plain {
        files.push((name.to_owned(), with_plain_body(&base, &body)));
    }
    files.push((
        "plain-body-three-keyslots".to_owned(),
        with_plain_body(&keyslots3, &encode_archive(&archive(&[("x", b"y")]))),
    ));
    files
}

fn archives() -> Seeds {
    let perm: Vec<u8> = (0..=255).collect();
    let many: Vec<(String, Vec<u8>)> = (0..64).map(|i| (format!("f{i:02}"), vec![])).collect();
    let many = StateArchive::from_entries(many).unwrap();
    vec![
        ("empty".to_owned(), encode_archive(&archive(&[]))),
        (
            "tpm2".to_owned(),
            encode_archive(&archive(&[
                ("tpm2-00.permall", &perm),
                ("tpm2-00.volatilestate", b""),
            ])),
        ),
        (
            "names".to_owned(),
            encode_archive(&archive(&[
                ("A-Z_a-z.0-9", b"x"),
                (&"n".repeat(64), b"long name"),
            ])),
        ),
        ("sixty-four-entries".to_owned(), encode_archive(&many)),
    ]
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// swtpm's answers (`tpm_ioctl.h`), successes and failures; each is checked
/// against the decoder of its command.
fn ctrl_responses() -> Seeds {
    use vtpmd::swtpm::ctrl::codec::{Cmd, decode};
    let mut blob = hex("00000000 00000002 00000008 00000008");
    blob.extend_from_slice(b"TPMSTATE");
    let text = b"{\"TPMSpecification\":{\"family\":\"2.0\",\"level\":0}}\0";
    let len = u32::try_from(text.len()).unwrap().to_be_bytes();
    let mut info = hex("00000000");
    info.extend_from_slice(&len);
    info.extend_from_slice(&len);
    info.extend_from_slice(text);
    let cases: Vec<(Cmd, &str, Vec<u8>)> = vec![
        (Cmd::GetCapability, "caps", hex("000000000001ffff")),
        (Cmd::Init, "ok", hex("00000000")),
        (Cmd::Init, "error", hex("00000009")),
        (
            Cmd::GetTpmEstablished,
            "established",
            hex("00000000 01000000"),
        ),
        (
            Cmd::GetTpmEstablished,
            "error-header",
            hex("0000000a 00000000"),
        ),
        (Cmd::GetStateBlob, "blob", blob),
        (
            Cmd::GetStateBlob,
            "retry",
            hex("00000800 00000000 00000000 00000000"),
        ),
        (Cmd::GetConfig, "config", hex("00000000 00000003")),
        (
            Cmd::SetBufferSize,
            "buffersize",
            hex("00000000 00001000 00000af8 00001000"),
        ),
        (Cmd::GetInfo, "info", info),
    ];
    cases
        .into_iter()
        .map(|(cmd, name, bytes)| {
            decode(cmd, &bytes).unwrap_or_else(|e| panic!("{cmd} {name}: {e}"));
            (format!("{}-{name}", cmd.name()), bytes)
        })
        .collect()
}

fn configs() -> Seeds {
    let default = vtpmd::config::Config::default().to_toml();
    let full = "\
[supervisor]
state_dir = \"/var/lib/vtpmd\"
runtime_dir = \"/run/vtpmd\"
socket_mode = \"0660\"
socket_group = \"kvm\"
swtpm_uid_range = \"1879048192-1879113727\"
stop_grace_ms = 5000
reseal_coalesce_ms = 5
kdf_parallelism = 0
lock_wait_ms = 30000
pcr_banks = \"sha256,sha384\"

[api]
socket = \"/run/vtpmd/vtpmd.sock\"
admin_group = \"vtpmd\"
readonly_group = \"vtpmd-ro\"
max_message_bytes = 65536
max_sealed_bytes = 1048576
max_connections = 128
reserved_connections = 16
max_connections_per_uid = 16
stranger_lifetime_ms = 5000
idle_timeout_ms = 30000
request_timeout_ms = 120000

[log]
burst = 20
per_minute = 60

[swtpm]
swtpm = \"/usr/bin/swtpm\"
swtpm_setup = \"/usr/bin/swtpm_setup\"
swtpm_localca = \"/usr/bin/swtpm_localca\"

[vault]
argon2_memory_kib = 65536
argon2_iterations = 3
argon2_lanes = 4
allow_weak_kdf = false
";
    let weak = "[vault]\nargon2_memory_kib = 8\nargon2_iterations = 1\nargon2_lanes = 1\nallow_weak_kdf = true\n";
    let inline =
        "vault = { argon2_lanes = 2 }\napi.max_connections = 1\napi.reserved_connections = 0\n";
    vec![
        ("default".to_owned(), default.into_bytes()),
        ("every-key".to_owned(), full.as_bytes().to_vec()),
        ("weak-kdf".to_owned(), weak.as_bytes().to_vec()),
        ("inline-tables".to_owned(), inline.as_bytes().to_vec()),
        ("empty".to_owned(), Vec::new()),
    ]
}

/// Streams of NUL-terminated calls, after the byte that picks the limit
/// (index 7: 64 KiB, the default).
/// Also the messages alone, for `varlink_message`.
fn varlink_streams() -> (Seeds, Seeds) {
    use serde_json::json;
    let guest = GuestId::from_bytes(GUEST).to_string();
    let m = |method: &str| format!("io.vtpmd.Manager.{method}");
    let calls = [
        ("get-capabilities", json!({"method": m("GetCapabilities")})),
        ("list", json!({"method": m("List"), "parameters": {}})),
        ("monitor", json!({"method": m("Monitor"), "more": true})),
        (
            "status",
            json!({"method": m("Status"), "parameters": {"guest": guest}}),
        ),
        (
            "stop",
            json!({"method": m("Stop"), "parameters": {"guest": guest}, "oneway": true}),
        ),
        (
            "delete",
            json!({"method": m("Delete"), "parameters": {"guest": guest}}),
        ),
        (
            "start",
            json!({"method": m("Start"), "parameters": {"guest": guest, "passphrase": "cGFzc3BocmFzZQ=="}}),
        ),
        (
            "rekey",
            json!({"method": m("Rekey"), "parameters": {"guest": guest, "passphrase": "b2xk", "new_passphrase": "bmV3IQ=="}}),
        ),
        ("get-host-key", json!({"method": m("GetHostKey")})),
        (
            "start-with-key",
            json!({"method": m("Start"), "parameters": {"guest": guest, "key": "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI="}}),
        ),
        (
            "start-with-host-key",
            json!({"method": m("Start"), "parameters": {"guest": guest}}),
        ),
        (
            "create-deployment",
            json!({"method": m("Create"), "parameters": {"guest": guest, "version": "2.0", "passphrase": "cGFzcw==", "policy": "deployment", "key": "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI="}}),
        ),
        (
            "grant",
            json!({"method": m("Grant"), "parameters": {"guest": guest, "passphrase": "cGFzcw==", "host_public_key": "YFpyXSpK3+6xop4X7dYhwbdZPujNvESsbEq24vgF0jw="}}),
        ),
        (
            "revoke",
            json!({"method": m("Revoke"), "parameters": {"guest": guest, "slot": 1, "key": "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI="}}),
        ),
        (
            "create",
            json!({"method": m("Create"), "parameters": {
                "guest": guest, "version": "2.0", "model": "tpm-crb",
                "passphrase": "cGFzcw==", "ek_certificate": true}}),
        ),
        (
            "create-nova",
            json!({"method": m("Create"), "parameters": {
                "guest": guest, "passphrase": "cGFzcw==",
                "flavor_extra_specs": {"hw:tpm_version": "2.0", "hw:cpu_policy": "dedicated"},
                "image_properties": {"hw_tpm_model": "tpm-tis"}}}),
        ),
        (
            "service-info",
            json!({"method": "org.varlink.service.GetInfo"}),
        ),
        (
            "service-description",
            json!({"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "io.vtpmd.Manager"}}),
        ),
        (
            "export",
            json!({"method": m("Export"), "parameters": {"guest": guest}}),
        ),
        (
            "import",
            json!({"method": m("Import"), "parameters": {"guest": guest, "sealed": "VlRQTVNFQUwAAQ=="}}),
        ),
        // Header shapes the spec allows: null flags, a vendor's extension
        // and an unknown key (ignored), upgrade (refused), oneway with more.
        (
            "null-flags",
            json!({"method": m("List"), "parameters": null, "oneway": null, "more": null, "upgrade": null}),
        ),
        (
            "unknown-header-keys",
            json!({"org.example.trace": {"id": "a1", "hops": [1, 2]}, "method": m("Status"), "parameters": {"guest": guest}, "x": true}),
        ),
        (
            "upgrade",
            json!({"method": m("Delete"), "parameters": {"guest": guest}, "upgrade": true}),
        ),
        (
            "oneway-more",
            json!({"method": m("Monitor"), "more": true, "oneway": true}),
        ),
    ];
    let messages = calls
        .iter()
        .map(|(name, call)| ((*name).to_owned(), call.to_string().into_bytes()))
        .collect();
    let frame = |values: &[&serde_json::Value]| {
        let mut out = vec![7u8];
        for v in values {
            out.extend_from_slice(v.to_string().as_bytes());
            out.push(0);
        }
        out
    };
    let mut streams: Vec<(String, Vec<u8>)> = calls
        .iter()
        .map(|(name, call)| ((*name).to_owned(), frame(&[call])))
        .collect();
    let all: Vec<&serde_json::Value> = calls.iter().map(|(_, c)| c).collect();
    streams.push(("all-in-one-stream".to_owned(), frame(&all)));
    // Three calls, the middle one over a 100-byte limit.
    let mut over = frame(&[&calls[3].1, &calls[9].1, &calls[0].1]);
    over[0] = 3;
    streams.push(("over-the-limit".to_owned(), over));
    // A call bigger than the receiver's first page, under a 9000-byte limit.
    let mut big = frame(&[&json!({"method": m("Start"), "parameters": {
        "guest": guest, "passphrase": "QUFB".repeat(1100)}})]);
    big[0] = 6;
    streams.push(("grows-the-buffer".to_owned(), big));
    (streams, messages)
}

/// Rewrites `fuzz/corpus/<target>/` for the byte-input targets, and a few
/// raw seeds for `seal_open_roundtrip` (any bytes decode as a case).
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the formats change"]
fn write_seeds() {
    let (streams, messages) = varlink_streams();
    let sets = [
        ("varlink_call", streams),
        ("varlink_message", messages),
        ("sealed_file", sealed_files()),
        ("archive", archives()),
        ("ctrl_response", ctrl_responses()),
        ("config", configs()),
    ];
    for (target, seeds) in sets {
        let dir = fuzz_dir().join("corpus").join(target);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            assert!(bytes.len() <= 16 * 1024, "{target}/{name} is too big");
            fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let dir = fuzz_dir().join("corpus").join("seal_open_roundtrip");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    for (name, len) in [("short", 64usize), ("medium", 512), ("long", 2048)] {
        let bytes: Vec<u8> = (0..len)
            .map(|i| u8::try_from(i * 37 % 251).unwrap())
            .collect();
        fs::write(dir.join(name), bytes).unwrap();
    }
}
