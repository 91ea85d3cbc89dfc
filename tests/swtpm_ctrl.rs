//! The control-channel client against a real swtpm 0.7.1, acting as QEMU
//! does: swtpm is started without `--server` and gets its data channel
//! through `CMD_SET_DATAFD`.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vtpmd::swtpm::ctrl::codec::{cap, info};
use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};
use vtpmd::swtpm::ctrl::{BlobType, Cmd, CtrlClient, CtrlError, DataChannel, Op, ResultCode, Vmm};

const TIMEOUT: Duration = Duration::from_secs(5);
const NV_INDEX: u32 = 0x0150_0016;

/// One swtpm child on a state directory; killed and reaped on drop.
struct Swtpm {
    child: Child,
    ctrl: PathBuf,
}

impl Swtpm {
    /// Starts `swtpm socket` with its state in `dir/state` and its control
    /// socket at `dir/ctrl.sock`, and waits until the socket accepts.
    fn start(dir: &Path, tpm2: bool) -> Self {
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let ctrl = dir.join("ctrl.sock");
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket");
        if tpm2 {
            cmd.arg("--tpm2");
        }
        cmd.arg("--tpmstate")
            .arg(format!("dir={},mode=0600", state.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={},mode=0600", ctrl.display()))
            .arg("--log")
            .arg(format!("file={},level=1", dir.join("log").display()))
            .stdin(Stdio::null());
        let child = cmd.spawn().unwrap();
        let swtpm = Self { child, ctrl };
        swtpm.wait_ready();
        swtpm
    }

    /// The test fixture may poll; vtpmd binds the socket itself instead.
    fn wait_ready(&self) {
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(&self.ctrl).is_err() {
            assert!(
                Instant::now() < deadline,
                "swtpm control socket never came up"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn attach(&self) -> Vmm {
        Vmm::attach(&self.ctrl, TIMEOUT).unwrap()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "swtpm did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tpm2_started(swtpm: &Swtpm) -> Vmm {
    let mut vmm = swtpm.attach();
    let rsp = vmm.transact(&tpm::tpm2_startup_clear()).unwrap();
    assert_eq!(rsp.rc, 0, "TPM2_Startup");
    vmm
}

#[test]
fn tpm2_nv_data_written_before_shutdown_is_read_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = b"sealed by vtpmd";
    let attrs = nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
    let mut first = Swtpm::start(dir.path(), true);
    let mut vmm = tpm2_started(&first);
    let random = vmm.transact(&tpm::tpm2_get_random(16)).unwrap();
    let define = vmm
        .transact(&tpm::tpm2_nv_define_space(NV_INDEX, attrs, 32))
        .unwrap();
    let write = vmm
        .transact(&tpm::tpm2_nv_write(NV_INDEX, data, 0).unwrap())
        .unwrap();

    vmm.shutdown().unwrap();
    let status = first.wait_exit();
    let second = Swtpm::start(dir.path(), true);
    let mut vmm = tpm2_started(&second);
    let read = vmm.transact(&tpm::tpm2_nv_read(NV_INDEX, 15, 0)).unwrap();

    assert_eq!(random.rc, 0);
    assert_eq!(random.tpm2_random_bytes().unwrap().len(), 16);
    assert_eq!(define.rc, 0, "NV_DefineSpace");
    assert_eq!(write.rc, 0, "NV_Write");
    assert!(status.success(), "swtpm exit after CMD_SHUTDOWN: {status}");
    assert_eq!(read.rc, 0, "NV_Read");
    assert_eq!(read.tpm2_nv_data().unwrap(), data);
}

#[test]
fn tpm12_startup_and_get_random_are_answered_on_an_empty_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(dir.path(), false);
    let mut vmm = swtpm.attach();

    let startup = vmm.transact(&tpm::tpm12_startup_clear()).unwrap();
    let random = vmm.transact(&tpm::tpm12_get_random(8)).unwrap();
    let info = vmm.ctrl().get_info(info::TPM_SPECIFICATION).unwrap();

    assert_eq!(vmm.capabilities(), 0x7fff);
    assert_eq!((startup.tag, startup.rc), (tpm::TPM12_TAG_RSP_COMMAND, 0));
    assert_eq!(random.rc, 0, "TPM_GetRandom");
    assert_eq!(random.tpm12_random_bytes().unwrap().len(), 8);
    assert!(info.contains("\"family\":\"1.2\""), "{info}");
}

#[test]
fn tpm2_control_queries_answer_as_measured() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(dir.path(), true);
    let mut vmm = tpm2_started(&swtpm);

    let info = vmm
        .ctrl()
        .get_info(info::TPM_SPECIFICATION | info::TPM_ATTRIBUTES)
        .unwrap();
    let config = vmm.ctrl().get_config().unwrap();
    let established = vmm.ctrl().get_tpm_established().unwrap();
    let sizes = vmm.ctrl().set_buffer_size(0).unwrap();
    let resize_while_running = vmm.ctrl().set_buffer_size(3968).unwrap_err();

    assert_eq!(vmm.capabilities(), 0xffff);
    assert_ne!(vmm.capabilities() & cap::SET_DATAFD, 0);
    assert_eq!(
        (
            vmm.buffer_sizes().size,
            vmm.buffer_sizes().min,
            vmm.buffer_sizes().max
        ),
        (4096, 2808, 4096)
    );
    assert_eq!(sizes, vmm.buffer_sizes());
    assert!(info.starts_with('{') && info.ends_with('}'), "{info}");
    assert!(info.contains("\"family\":\"2.0\""), "{info}");
    assert_eq!(config, 0);
    assert!(!established);
    assert_eq!(
        resize_while_running.result_code(),
        Some(ResultCode::BAD_ORDINAL)
    );
}

#[test]
fn a_second_set_data_fd_is_refused_with_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(dir.path(), true);
    let mut vmm = swtpm.attach();
    let (_ours, theirs) = DataChannel::new_pair().unwrap();

    let err = vmm.ctrl().set_data_fd(theirs.as_fd()).unwrap_err();

    assert!(
        matches!(
            err,
            CtrlError::Result {
                cmd: Cmd::SetDataFd,
                code: ResultCode::IOERROR
            }
        ),
        "{err:?}"
    );
    // The first data channel still works.
    assert_eq!(vmm.transact(&tpm::tpm2_startup_clear()).unwrap().rc, 0);
}

#[test]
fn permanent_state_blob_is_returned_and_a_missing_one_is_refused_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(dir.path(), true);
    let mut vmm = tpm2_started(&swtpm);

    let permanent = vmm
        .ctrl()
        .get_state_blob(BlobType::Permanent, true)
        .unwrap();
    // TPM2 has no savestate blob: swtpm answers TPM_RETRY with the whole
    // 16-byte header, which the client must consume.
    let savestate = vmm
        .ctrl()
        .get_state_blob(BlobType::SaveState, true)
        .unwrap_err();
    let config_after = vmm.ctrl().get_config();

    assert!(!permanent.encrypted);
    assert!(
        (500..64 * 1024).contains(&permanent.data.len()),
        "permanent blob of {} bytes",
        permanent.data.len()
    );
    assert_eq!(savestate.result_code(), Some(ResultCode::RETRY));
    assert_eq!(config_after.unwrap(), 0);
}

#[test]
fn commands_needing_a_running_tpm_are_refused_before_init_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(dir.path(), true);
    let mut ctrl = CtrlClient::connect(&swtpm.ctrl, TIMEOUT).unwrap();

    let established = ctrl.get_tpm_established().unwrap_err();
    let blob = ctrl.get_state_blob(BlobType::Permanent, false).unwrap_err();
    let caps = ctrl.get_capability().unwrap();

    assert_eq!(established.result_code(), Some(ResultCode::BAD_ORDINAL));
    assert_eq!(blob.result_code(), Some(ResultCode::BAD_ORDINAL));
    assert_eq!(caps, 0xffff);
}

#[test]
fn an_unresponsive_peer_times_out_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mute.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let timeout = Duration::from_millis(300);
    let mut ctrl = CtrlClient::connect(&path, timeout).unwrap();
    let started = Instant::now();

    let err = ctrl.get_capability().unwrap_err();
    let elapsed = started.elapsed();

    assert!(
        matches!(
            err,
            CtrlError::Timeout {
                op: Op::Ctrl(Cmd::GetCapability),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(elapsed >= timeout && elapsed < timeout * 3, "{elapsed:?}");
}

#[test]
fn a_missing_socket_is_a_connect_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");

    let err = CtrlClient::connect(&path, TIMEOUT).unwrap_err();

    assert!(
        matches!(&err, CtrlError::Connect { path: p, .. } if p == &path),
        "{err:?}"
    );
}
