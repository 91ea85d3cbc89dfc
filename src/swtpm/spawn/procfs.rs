//! What `/proc` says about a process: enough to tell a swtpm vtpmd
//! started from whatever later took its pid. These files are readable for
//! any process of any uid (no ptrace access needed, which vtpmd, without
//! `CAP_SYS_PTRACE`, lacks for a swtpm running as a guest's uid).

use std::io::{self, ErrorKind};

/// The longest `/proc/PID/cmdline` read: swtpm's is a few hundred bytes.
const MAX_CMDLINE: usize = 16 * 1024;

/// Clock ticks since boot when `pid` started (field 22 of `/proc/PID/stat`).
pub(crate) fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no start time"),
        )
    })
}

/// The start time in a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses, so the
/// fields are counted from the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    // After the name: field 3 (state) is the first; 22 is the 20th.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// The real uid of `pid` (the `Uid:` line of `/proc/PID/status`).
pub(crate) fn uid(pid: u32) -> io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                format!("/proc/{pid}/status has no Uid line"),
            )
        })
}

/// The argument vector of `pid`.
pub(crate) fn cmdline(pid: u32) -> io::Result<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    if bytes.len() > MAX_CMDLINE {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("/proc/{pid}/cmdline is longer than {MAX_CMDLINE} bytes"),
        ));
    }
    Ok(bytes
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// Every uid that a live process runs as (real uids, from `/proc`).
pub(crate) fn live_uids() -> io::Result<std::collections::BTreeSet<u32>> {
    let mut uids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exits meanwhile holds no uid any more.
        if let Ok(uid) = uid(pid) {
            uids.insert(uid);
        }
    }
    Ok(uids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_found_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (sw tpm) (x)) S 1 4242 4242 0 -1 4194560 120 0 0 0 1 2 0 0 20 0 1 0 987654 8900000 400";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("4242 (swtpm) S 1 2"), None);
    }

    #[test]
    fn this_process_reads_back_its_own_facts() {
        let me = std::process::id();
        assert!(start_time(me).is_ok_and(|t| t > 0));
        assert_eq!(uid(me).ok(), Some(nix::unistd::getuid().as_raw()));
        assert!(cmdline(me).is_ok_and(|argv| !argv.is_empty()));
        assert!(live_uids().is_ok_and(|u| u.contains(&nix::unistd::getuid().as_raw())));
    }
}
