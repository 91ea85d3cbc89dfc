//! Crash safety of sealing: a process that is SIGKILLed at any moment while
//! it seals leaves a file that opens to the old or the new generation,
//! never to an error and never to the fallback.
//!
//! The process to kill is this test binary itself, re-executed to run only
//! [`child_seals_in_a_loop`]: a real separate process, so the kill really
//! interrupts system calls half-way, with no helper binary to build.
//!
//! A SIGKILL loses nothing the process already handed to the kernel (the
//! page cache survives it), so this test proves the order of the steps
//! (temp file, link to `.prev`, rename over the current file), not that
//! the fsyncs happen: a missing fsync only shows after a power loss.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vtpmd::protocol::{GuestId, TpmModel, TpmSpec, TpmVersion};
use vtpmd::secret::SecretBuf;
use vtpmd::vault::{KdfParams, KdfPolicy, Opened, SealedPaths, SealedState, StateArchive};

const GUEST: &str = "3c9e6b1a-52f4-4d87-a0b6-9e1f2d3c4b5a";
/// "crash-safety passphrase"
const PASSPHRASE_B64: &[u8] = b"Y3Jhc2gtc2FmZXR5IHBhc3NwaHJhc2U=";

/// Set only in the child: the directory holding the sealed state to seal
/// into. Without it the child test does nothing, so a plain `cargo test
/// -- --include-ignored` does not loop forever.
const CHILD_DIR_VAR: &str = "VTPMD_CRASH_CHILD_DIR";
/// Reproduces a run's kill delays (the child's timing still varies).
const SEED_VAR: &str = "VTPMD_CRASH_SEED";
const CHILD_TEST: &str = "child_seals_in_a_loop";
/// Prefixes the child's report lines; libtest may print on the same line.
const MARKER: &str = "crash-child:";

const ROUNDS: u32 = 200;
/// A generous TPM 2.0 `permall` (swtpm_setup's first one is about 3 KiB).
/// Not bigger: in a debug build AES-GCM runs at a few MB/s, so a bigger
/// state only makes encrypting, which no kill can harm, take more of the
/// child's time than writing and fsyncing, where the kills matter.
const PERMALL_LEN: usize = 16 * 1024;
/// Kills after "ready": from before the child's first seal to after
/// several, through the middle of some writes.
const MAX_DELAY_AFTER_READY: Duration = Duration::from_millis(80);
/// Kills soon after the start: during exec, the test harness's start or
/// the child's own open.
const MAX_EARLY_DELAY: Duration = Duration::from_millis(10);
/// Kills once a temp file appears: about as long as a write and its fsync.
const MAX_DELAY_WHILE_WRITING: Duration = Duration::from_millis(2);
/// Generous: only a hung child takes this long to be ready or to write.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

fn guest() -> GuestId {
    GuestId::parse(GUEST).unwrap()
}

fn spec() -> TpmSpec {
    TpmSpec::new(TpmVersion::V2_0, TpmModel::Crb).unwrap()
}

fn passphrase() -> SecretBuf {
    SecretBuf::from_base64(PASSPHRASE_B64, 4096).unwrap()
}

/// Cheap parameters so that each of the ~400 opens is fast; allowed only
/// because the policy says so.
fn weak_policy() -> KdfPolicy {
    KdfPolicy {
        params: KdfParams::new(64, 1, 1).unwrap(),
        allow_weak: true,
    }
}

fn sealed_paths(dir: &Path) -> SealedPaths {
    SealedPaths::new(dir.join("tpm.sealed"))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// The state sealed as `generation`: every byte of it depends on the
/// generation, so a file mixing one generation's header with another's
/// body, or a half-written body, cannot pass for a valid generation.
fn archive_for(generation: u64) -> StateArchive {
    let permall = generation.to_be_bytes().repeat(PERMALL_LEN / 8);
    let volatile = format!("generation {generation}").into_bytes();
    StateArchive::from_entries([
        ("tpm2-00.permall".to_owned(), permall),
        ("tpm2-00.volatilestate".to_owned(), volatile),
    ])
    .unwrap()
}

fn open(dir: &Path) -> Result<Opened, vtpmd::vault::VaultError> {
    SealedState::open(sealed_paths(dir), guest(), &passphrase(), &weak_policy())
}

/// `.prev` opened on its own, or `None` if it does not exist and need not
/// (only generation 1 has no previous one).
fn open_previous(dir: &Path, must_exist: bool) -> Option<Opened> {
    let previous = sealed_paths(dir).previous().to_owned();
    if !must_exist && !previous.exists() {
        return None;
    }
    let opened = SealedState::open(
        SealedPaths::new(&previous),
        guest(),
        &passphrase(),
        &weak_policy(),
    );
    Some(opened.unwrap_or_else(|e| panic!("{} does not open: {e}", previous.display())))
}

/// The child: opens the state the parent made and seals the next
/// generation over and over until it is killed, reporting on stdout the
/// generation it opened ("ready") and each one it sealed. A report is
/// written only after the seal returned, so the file on disk is always the
/// last reported generation or the one after it.
#[test]
#[ignore = "the child process of sigkill_at_any_moment_leaves_an_openable_generation"]
fn child_seals_in_a_loop() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    let mut state = open(Path::new(&dir))
        .expect("the child opens the state")
        .state;
    report("ready", state.generation());
    loop {
        let next = state.generation() + 1;
        let sealed = state.seal(&archive_for(next)).expect("the child seals");
        assert_eq!(sealed, next, "seal numbers generations consecutively");
        report("sealed", sealed);
    }
}

/// Straight to the stdout pipe, unbuffered: the parent must see every
/// report written before the kill. If the parent died, the write fails
/// (EPIPE) and the child stops, rather than sealing on forever.
fn report(what: &str, generation: u64) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARKER} {what} {generation}").unwrap();
    out.flush().unwrap();
}

/// When a round's kill is meant to land. The delay is random in each case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aim {
    /// Soon after the start, without waiting for "ready".
    Early,
    /// At any moment after "ready".
    AfterReady,
    /// Just after a new temp file appears. In a debug build encrypting takes
    /// most of a seal, so kills at any moment hit few writes; these make
    /// sure that many do, on any disk.
    WhileWriting,
}

impl Aim {
    fn pick(rng: &mut XorShift) -> Self {
        match rng.below(8) {
            0 => Self::Early,
            1 | 2 => Self::WhileWriting,
            _ => Self::AfterReady,
        }
    }
}

/// What one killed child did, from its reports and its remains.
#[derive(Debug)]
struct Kill {
    aim: Aim,
    #[expect(dead_code, reason = "read through Debug, in failure messages")]
    delay: Duration,
    /// The generation the child opened, if it got that far.
    ready: Option<u64>,
    /// The last generation the child reported sealed.
    last_sealed: Option<u64>,
    /// `tpm.sealed.tmp` survived: killed between creating the new
    /// generation's temp file and renaming it over the current file.
    tmp_left: bool,
    /// `tpm.sealed.prev.tmp` survived: killed while rotating `.prev`.
    prev_tmp_left: bool,
}

#[derive(Debug, Default)]
struct Tally {
    killed_before_ready: u32,
    killed_before_first_seal: u32,
    aimed_at_a_write: u32,
    /// Kills that left `tpm.sealed.tmp`, of those aimed at a write and of
    /// the others.
    mid_write_when_aimed: u32,
    mid_write_when_not_aimed: u32,
    /// Kills that left `tpm.sealed.prev.tmp`.
    mid_rotation: u32,
    /// Kills between a seal's rename and its report.
    new_generation_unreported: u32,
}

/// xorshift64: the delays only need to be spread, not unpredictable, and
/// the crate has no random-number dependency for tests.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> (Self, u64) {
        let seed = std::env::var(SEED_VAR)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                now.as_secs()
                    ^ u64::from(now.subsec_nanos())
                    ^ (u64::from(std::process::id()) << 32)
            });
        // Zero is xorshift's one fixed point.
        (Self(seed | 1), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn delay_below(&mut self, bound: Duration) -> Duration {
        let micros = u64::try_from(bound.as_micros()).unwrap();
        Duration::from_micros(self.below(micros))
    }
}

fn spawn_child(dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            CHILD_TEST,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_VAR, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-execute the test binary as the child")
}

/// Starts a child, SIGKILLs it after a random delay, reaps it and reads
/// what it reported and what it left in `dir`.
fn kill_child_at_random(dir: &Path, rng: &mut XorShift) -> Kill {
    let current = sealed_paths(dir).current().to_owned();
    let (tmp, prev_tmp) = (sibling(&current, ".tmp"), sibling(&current, ".prev.tmp"));
    let stale = (identity(&tmp), identity(&prev_tmp));
    let mut child = spawn_child(dir);
    // A thread reads the reports so that the parent can wait for "ready"
    // with a timeout, and the pipe never fills while the child runs.
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line.contains(&format!("{MARKER} ready ")) {
                // The parent may have stopped listening (early kill).
                let _ = ready_tx.send(());
            }
            lines.push(line);
        }
        lines
    });

    let aim = Aim::pick(rng);
    let delay = match aim {
        Aim::Early => rng.delay_below(MAX_EARLY_DELAY),
        Aim::AfterReady => {
            if ready_rx.recv_timeout(CHILD_TIMEOUT).is_err() {
                give_up(child, reader, "the child never got ready");
            }
            rng.delay_below(MAX_DELAY_AFTER_READY)
        }
        Aim::WhileWriting => {
            let deadline = Instant::now() + CHILD_TIMEOUT;
            // Until the child creates its own temp file; a child that died
            // on its own is reported below.
            while !left_by_this_kill(&tmp, stale.0) && child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    give_up(child, reader, "the child never began a write");
                }
                thread::sleep(Duration::from_micros(20));
            }
            rng.delay_below(MAX_DELAY_WHILE_WRITING)
        }
    };
    thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    let lines = reader.join().unwrap();
    assert_eq!(
        status.signal(),
        Some(nix::libc::SIGKILL),
        "the child must die of the kill, not on its own ({status}); stdout: {lines:?}; stderr: {}",
        read_all(child.stderr.take().unwrap()),
    );

    let reported = |what: &str| {
        let prefix = format!("{MARKER} {what} ");
        lines
            .iter()
            .filter_map(|line| Some(line.split_once(&prefix)?.1.trim().parse::<u64>().unwrap()))
            .next_back()
    };
    Kill {
        aim,
        delay,
        ready: reported("ready"),
        last_sealed: reported("sealed"),
        tmp_left: left_by_this_kill(&tmp, stale.0),
        prev_tmp_left: left_by_this_kill(&prev_tmp, stale.1),
    }
}

/// Kills the child before failing, so that it does not outlive the test.
fn give_up(mut child: Child, reader: thread::JoinHandle<Vec<String>>, why: &str) -> ! {
    child.kill().unwrap();
    let status = child.wait().unwrap();
    panic!(
        "{why} ({status}); stdout: {:?}; stderr: {}",
        reader.join().unwrap(),
        read_all(child.stderr.take().unwrap()),
    );
}

/// Which file a path names: a temp file left by an earlier kill stays
/// until a child gets as far as writing, and must not count again. The
/// inode number alone may be reused at once; the change time may not.
fn identity(path: &Path) -> Option<(u64, i64, i64)> {
    let meta = fs::symlink_metadata(path).ok()?;
    Some((meta.ino(), meta.ctime(), meta.ctime_nsec()))
}

fn left_by_this_kill(path: &Path, before: Option<(u64, i64, i64)>) -> bool {
    let after = identity(path);
    after.is_some() && after != before
}

fn read_all(mut pipe: impl Read) -> String {
    let mut text = String::new();
    pipe.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn sigkill_at_any_moment_leaves_an_openable_generation() {
    // Arrange: generation 1 on disk, as a guest's first start leaves it.
    // Under the target directory rather than /tmp: on a tmpfs fsync costs
    // nothing, and the writes would be too quick for any kill to hit.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    SealedState::create(
        sealed_paths(dir.path()),
        guest(),
        spec(),
        &passphrase(),
        &weak_policy(),
        &archive_for(1),
    )
    .unwrap();
    let (mut rng, seed) = XorShift::seeded();
    eprintln!("crash safety: {ROUNDS} kills, {SEED_VAR}={seed}");
    let started = Instant::now();
    let mut on_disk = 1;
    let mut tally = Tally::default();

    for round in 0..ROUNDS {
        // Act
        let kill = kill_child_at_random(dir.path(), &mut rng);
        let opened = open(dir.path());

        // Assert: the current file is complete at every instant, so it
        // opens, and without falling back to `.prev`.
        let opened = opened.unwrap_or_else(|e| {
            panic!("round {round}: after {kill:?} the sealed state does not open: {e}")
        });
        assert!(
            opened.fell_back.is_none(),
            "round {round}: after {kill:?} the current file was unusable: {:?}",
            opened.fell_back,
        );
        let generation = opened.state.generation();
        assert_eq!(
            opened.archive,
            archive_for(generation),
            "round {round}: after {kill:?} generation {generation} holds another generation's state",
        );
        // The fallback must stay usable too: `.prev` is the generation
        // before, or, between rotating it and renaming the new file, the
        // current one again.
        if let Some(previous) = open_previous(dir.path(), generation > 1) {
            let prev_generation = previous.state.generation();
            assert!(
                previous.fell_back.is_none()
                    && (prev_generation == generation - 1 || prev_generation == generation),
                "round {round}: after {kill:?} with generation {generation} current, \
                 .prev is generation {prev_generation} ({:?})",
                previous.fell_back,
            );
            assert_eq!(previous.archive, archive_for(prev_generation));
        }
        assert!(
            generation >= on_disk,
            "round {round}: after {kill:?} the generation went back from {on_disk} to {generation}",
        );
        // The old generation is the last one the child reported (or, if it
        // reported none, the one it opened); the new one is the next,
        // sealed but killed before it could report it.
        match kill.ready {
            None => assert_eq!(
                generation, on_disk,
                "round {round}: {kill:?} never began a seal, yet the generation changed",
            ),
            Some(ready) => {
                assert_eq!(
                    ready, on_disk,
                    "round {round}: the child opened another generation"
                );
                let old = kill.last_sealed.unwrap_or(ready);
                assert!(
                    generation == old || generation == old + 1,
                    "round {round}: after {kill:?} found generation {generation}, \
                     neither the old {old} nor the new {}",
                    old + 1,
                );
                tally.new_generation_unreported += u32::from(generation == old + 1);
            }
        }
        tally.killed_before_ready += u32::from(kill.ready.is_none());
        tally.killed_before_first_seal +=
            u32::from(kill.ready == Some(generation) && kill.last_sealed.is_none());
        if kill.aim == Aim::WhileWriting {
            tally.aimed_at_a_write += 1;
            tally.mid_write_when_aimed += u32::from(kill.tmp_left);
        } else {
            tally.mid_write_when_not_aimed += u32::from(kill.tmp_left);
        }
        tally.mid_rotation += u32::from(kill.prev_tmp_left);
        on_disk = generation;
    }
    eprintln!(
        "crash safety: {ROUNDS} kills in {:.1?}, generation 1 -> {on_disk}, {tally:?}",
        started.elapsed(),
    );
    // Without these the test could pass without ever interrupting a write.
    assert!(on_disk > 1, "the children never sealed a generation");
    assert!(
        tally.mid_write_when_aimed + tally.mid_write_when_not_aimed > 0,
        "no kill landed in the middle of a write"
    );

    // Act: the next start seals over whatever the last kill left.
    let mut state = open(dir.path()).unwrap().state;
    let sealed = state.seal(&archive_for(on_disk + 1)).unwrap();

    // Assert: it opens as the new generation, and every temp file of the
    // interrupted writes is gone.
    let reopened = open(dir.path()).unwrap();
    assert_eq!(sealed, on_disk + 1);
    assert_eq!(reopened.state.generation(), sealed);
    assert_eq!(reopened.archive, archive_for(sealed));
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["tpm.sealed", "tpm.sealed.prev"]);
}
