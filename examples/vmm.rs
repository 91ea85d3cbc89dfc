//! Plays the VMM against a vtpmd guest's control socket, the way QEMU 7.2
//! attaches (SET_DATAFD, capabilities, STOP, buffer size, INIT), then sends
//! real TPM 2.0 commands and quits with CMD_SHUTDOWN, as QEMU does when the
//! VM ends.
//!
//! `vmm CTRL_SOCKET write TEXT`: TPM2_Startup, GetRandom, NV_DefineSpace +
//! NV_Write of TEXT at index 0x1500016.
//! `vmm CTRL_SOCKET read LEN`: TPM2_Startup, NV_Read of LEN bytes.
//! `vmm CTRL_SOCKET loop STOP_FILE`: TPM2_Startup, an 8-byte NV index
//! (0x1500017), then
//! NV_Write of 1, 2, 3, ... every 10 ms until STOP_FILE exists; every
//! acknowledged value is printed (`acked N`), a failed command ends it
//! with an error. A guest writing its TPM while vtpmd restarts under it.
//! `vmm CTRL_SOCKET read-counter -`: TPM2_Startup, the 8-byte counter.

use std::error::Error;
use std::path::PathBuf;
use std::time::Duration;

use vtpmd::swtpm::ctrl::client::Vmm;
use vtpmd::swtpm::ctrl::tpm::{self, nv_attr};

const NV_INDEX: u32 = 0x0150_0016;
/// `loop` and `read-counter` use an index of their own (8 bytes).
const COUNTER_INDEX: u32 = 0x0150_0017;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ctrl, action, arg] = args.as_slice() else {
        return Err(
            "usage: vmm CTRL_SOCKET write TEXT | read LEN | loop STOP_FILE | read-counter -".into(),
        );
    };
    let mut vmm = Vmm::attach(&PathBuf::from(ctrl), Duration::from_secs(10))?;
    println!("vmm: attached to {ctrl} (caps {:#x})", vmm.capabilities());
    let startup = vmm.transact(&tpm::tpm2_startup_clear())?;
    println!("vmm: TPM2_Startup rc={:#x}", startup.rc);
    match action.as_str() {
        "write" => {
            let random = vmm.transact(&tpm::tpm2_get_random(8))?;
            println!(
                "vmm: TPM2_GetRandom -> {:02x?}",
                random.tpm2_random_bytes()?
            );
            let attrs =
                nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
            let len = u16::try_from(arg.len())?;
            let define = vmm.transact(&tpm::tpm2_nv_define_space(NV_INDEX, attrs, len))?;
            let write = vmm.transact(&tpm::tpm2_nv_write(NV_INDEX, arg.as_bytes(), 0)?)?;
            println!(
                "vmm: NV_DefineSpace rc={:#x}, NV_Write {arg:?} rc={:#x}",
                define.rc, write.rc
            );
        }
        "read" => {
            let len: u16 = arg.parse()?;
            let read = vmm.transact(&tpm::tpm2_nv_read(NV_INDEX, len, 0))?;
            println!(
                "vmm: NV_Read rc={:#x} -> {:?}",
                read.rc,
                String::from_utf8_lossy(read.tpm2_nv_data()?)
            );
        }
        "loop" => {
            let attrs =
                nv_attr::OWNERREAD | nv_attr::OWNERWRITE | nv_attr::AUTHREAD | nv_attr::AUTHWRITE;
            let define = vmm.transact(&tpm::tpm2_nv_define_space(COUNTER_INDEX, attrs, 8))?;
            if define.rc != 0 {
                return Err(format!("NV_DefineSpace rc={:#x}", define.rc).into());
            }
            let stop = PathBuf::from(arg);
            let mut value: u64 = 0;
            while !stop.exists() {
                let next = value + 1;
                let write =
                    vmm.transact(&tpm::tpm2_nv_write(COUNTER_INDEX, &next.to_be_bytes(), 0)?)?;
                if write.rc != 0 {
                    return Err(format!("NV_Write of {next} rc={:#x}", write.rc).into());
                }
                value = next;
                println!("acked {value}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        "read-counter" => {
            let read = vmm.transact(&tpm::tpm2_nv_read(COUNTER_INDEX, 8, 0))?;
            let data: [u8; 8] = read.tpm2_nv_data()?.try_into()?;
            println!("counter {}", u64::from_be_bytes(data));
        }
        other => return Err(format!("unknown action {other:?}").into()),
    }
    vmm.shutdown()?;
    println!("vmm: quit (CMD_SHUTDOWN)");
    Ok(())
}
