//! Test helpers: reading `/proc/self/{smaps,maps,status}` and running one
//! test in a child process (for tests that change process-wide state such as
//! rlimits or the dumpable flag).

use std::process::Command;

const CHILD_ENV: &str = "VTPMD_SECRET_TEST_CHILD";
const CAP_IPC_LOCK: u32 = 14;

#[derive(Debug, Clone)]
pub(crate) struct Mapping {
    pub start: usize,
    pub end: usize,
    pub perms: String,
    pub locked_kb: u64,
    pub flags: Vec<String>,
}

fn parse_header(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    Some(Mapping {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        perms: perms.to_owned(),
        locked_kb: 0,
        flags: Vec::new(),
    })
}

/// All mappings of this process with their smaps details.
pub(crate) fn mappings() -> Vec<Mapping> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Locked:") {
            let kb = rest.trim().trim_end_matches("kB").trim();
            out.last_mut().unwrap().locked_kb = kb.parse().unwrap();
        } else if let Some(rest) = line.strip_prefix("VmFlags:") {
            out.last_mut().unwrap().flags = rest.split_whitespace().map(str::to_owned).collect();
        } else if let Some(m) = parse_header(line) {
            out.push(m);
        }
    }
    out
}

/// The mapping that contains `addr`.
pub(crate) fn mapping_at(addr: usize) -> Option<Mapping> {
    mappings()
        .into_iter()
        .find(|m| m.start <= addr && addr < m.end)
}

/// Whether this process has CAP_IPC_LOCK in its effective set (which makes
/// mlock and secretmem ignore RLIMIT_MEMLOCK).
pub(crate) fn has_cap_ipc_lock() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    let eff = u64::from_str_radix(hex, 16).unwrap();
    eff & (1 << CAP_IPC_LOCK) != 0
}

/// True inside the child started by [`run_in_child`].
pub(crate) fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Re-runs the test `name` of module `module` (pass `module_path!()`) alone
/// in a child process and fails unless it ran and passed there.
pub(crate) fn run_in_child(module: &str, name: &str) {
    run_child(module, name, false);
}

/// Like [`run_in_child`], but the child runs without CAP_IPC_LOCK (via
/// `setpriv` when this process has it, e.g. root), so RLIMIT_MEMLOCK binds.
pub(crate) fn run_in_child_without_ipc_lock(module: &str, name: &str) {
    run_child(module, name, has_cap_ipc_lock());
}

fn run_child(module: &str, name: &str, drop_ipc_lock: bool) {
    let path = match module.split_once("::") {
        Some((_crate, rest)) => format!("{rest}::{name}"),
        None => name.to_owned(),
    };
    let exe = std::env::current_exe().unwrap();
    let mut cmd = if drop_ipc_lock {
        let mut c = Command::new("setpriv");
        c.args(["--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"])
            .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args([path.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child test {path} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
