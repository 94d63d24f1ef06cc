//! The fexit backend, tested where it can load: `raftmap-fexit-check` runs in QEMU guests
//! booting Debian's stock cloud kernels, 12 (6.1) and 13 (6.12), the same binary on both (CO-RE
//! relocates the programs at load time); this machine's kernel refuses tracing programs.
//! Needs the VM assets `scripts/install-deps.sh` prepares; under RAFTMAP_REQUIRE_BPF=1 their
//! absence fails the test instead of skipping it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn fexit_backend_in_vms_with_two_stock_kernels() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/vm-run.sh");
    for kernel in ["debian12", "debian13"] {
        let out = Command::new("bash")
            .arg(&script)
            .arg(env!("CARGO_BIN_EXE_raftmap-fexit-check"))
            .env("RAFTMAP_VM_KERNEL", kernel)
            .output()
            .expect("running scripts/vm-run.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(77) {
            // A VM asset is missing.
            let why = format!("{stdout}{stderr}");
            if std::env::var("RAFTMAP_REQUIRE_BPF").as_deref() == Ok("1") {
                panic!("the fexit VM test is required (RAFTMAP_REQUIRE_BPF=1): {why}");
            }
            eprintln!("SKIPPED fexit_backend_in_vms_with_two_stock_kernels: {why}");
            return;
        }
        let summary = stdout
            .lines()
            .find(|l| l.starts_with("fexit-check:"))
            .unwrap_or_else(|| {
                panic!("the {kernel} guest printed no result; console:\n{stdout}\n{stderr}")
            });
        println!(
            "{kernel}:\n{}",
            stdout
                .lines()
                .filter(|l| l.starts_with("ok ")
                    || l.starts_with("FAIL")
                    || l.starts_with("kernel"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            summary.ends_with(" 0 failed"),
            "{kernel}: {summary}\nconsole:\n{stdout}"
        );
        assert!(
            out.status.success(),
            "vm-run.sh failed on {kernel}:\n{stdout}\n{stderr}"
        );
    }
}
