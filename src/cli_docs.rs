//! Man pages and shell completions, generated from the very clap
//! definitions the binaries parse their arguments with, so they cannot
//! drift from the options. Both binaries answer a hidden first argument
//! (as `rg --generate` does), which the Debian package build runs:
//!
//! ```text
//! vtpmd   --generate man DIR        # DIR/vtpmd.8
//! vtpmctl --generate man DIR        # DIR/vtpmctl.1, DIR/vtpmctl-<subcommand>.1 …
//! vtpmctl --generate bash|zsh|fish|elvish|powershell   # the script on stdout
//! ```
//!
//! It is looked for before clap parses anything, so it needs no place in
//! the usage (vtpmctl's subcommand stays required) and shows in no help.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap_complete::Shell;

/// The hidden first argument.
pub const FLAG: &str = "--generate";

/// When the process was started as `BIN --generate …`, does what it asks
/// (man pages in `section`, or a completion script) and returns the exit
/// code; otherwise `None`, and the caller parses its arguments as usual.
pub fn generate_if_asked(
    command: impl FnOnce() -> clap::Command,
    section: &str,
) -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(FLAG)) {
        return None;
    }
    let rest: Vec<OsString> = args.collect();
    let cmd = command();
    let name = cmd.get_name().to_owned();
    Some(match generate(cmd, section, &rest) {
        Ok(()) => ExitCode::SUCCESS,
        Err(GenerateError::Usage(why)) => {
            eprintln!(
                "{name}: {why}\nusage: {name} {FLAG} man DIR | {name} {FLAG} bash|zsh|fish|elvish|powershell"
            );
            ExitCode::from(2)
        }
        Err(GenerateError::Io(e)) => {
            eprintln!("{name}: {FLAG}: {e}");
            ExitCode::FAILURE
        }
    })
}

/// Why `--generate` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `args`: what followed `--generate`.
pub fn generate(cmd: clap::Command, section: &str, args: &[OsString]) -> Result<(), GenerateError> {
    let text = |a: &OsString| a.to_str().map(str::to_owned);
    match args {
        [kind, dir] if kind == "man" => man_pages(cmd, section, Path::new(dir)),
        [kind] if kind == "man" => Err(GenerateError::Usage(format!(
            "{FLAG} man needs the directory to write the pages into"
        ))),
        [shell] => {
            let shell: Shell = text(shell)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| GenerateError::Usage(format!("unknown kind {shell:?}")))?;
            let mut cmd = cmd;
            let name = cmd.get_name().to_owned();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, name, &mut out);
            std::io::stdout().lock().write_all(&out)?;
            Ok(())
        }
        _ => Err(GenerateError::Usage(format!("{FLAG} takes a kind"))),
    }
}

/// One page for the command and one for each (visible) subcommand, named
/// `vtpmctl-state-verify.1` and so on, all in `section`.
pub fn man_pages(cmd: clap::Command, section: &str, dir: &Path) -> Result<(), GenerateError> {
    fn page(cmd: clap::Command, section: &str, dir: &Path) -> Result<(), GenerateError> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            page(sub, section, dir)?;
        }
        let version = cmd.get_version().unwrap_or_default().to_owned();
        clap_mangen::Man::new(cmd)
            .section(section)
            .source(format!("vtpmd {version}"))
            .manual("vtpmd")
            .generate_to(dir)?;
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    page(cmd, section, dir)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn toy() -> clap::Command {
        clap::Command::new("toy")
            .version("1.2")
            .about("A toy")
            .subcommand_required(true)
            .subcommand(
                clap::Command::new("state")
                    .about("State tools")
                    .subcommand(clap::Command::new("verify").about("Verify a file")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn man_writes_a_page_per_visible_subcommand_in_the_section() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(toy(), "8", dir.path()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["toy-state-verify.8", "toy-state.8", "toy.8"]);
        let top = std::fs::read_to_string(dir.path().join("toy.8")).unwrap();
        assert!(top.contains(".TH toy 8"), "{top}");
        assert!(top.contains("vtpmd 1.2"), "{top}");
        assert!(!top.contains("secret"), "{top}");
    }

    #[test]
    fn usage_errors_name_what_is_wrong() {
        let err = |args: &[&str]| {
            let args: Vec<OsString> = args.iter().map(OsString::from).collect();
            match generate(toy(), "1", &args) {
                Err(GenerateError::Usage(why)) => why,
                other => panic!("{other:?}"),
            }
        };
        assert!(err(&[]).contains("takes a kind"));
        assert!(err(&["man"]).contains("directory"));
        assert!(err(&["tcsh"]).contains("unknown kind"));
    }
}
