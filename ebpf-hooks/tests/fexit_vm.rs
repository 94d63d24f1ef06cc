//! The fexit backend, tested where it can load: `raftmap-fexit-check` runs in QEMU guests
//! booting Debian's stock cloud kernels, 12 (6.1) and 13 (6.12), the same binary on both (CO-RE
//! relocates the programs at load time); this machine's kernel refuses tracing programs.
//! Needs the VM assets `scripts/install-deps.sh` prepares; under RAFTMAP_REQUIRE_BPF=1 their
//! absence fails the test instead of skipping it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use raftmap_ebpf_hooks::{run_in_guest, GUEST_KERNELS};

#[test]
fn fexit_backend_in_vms_with_two_stock_kernels() {
    let bin = Path::new(env!("CARGO_BIN_EXE_raftmap-fexit-check"));
    for kernel in GUEST_KERNELS {
        let Some(run) = run_in_guest("fexit_vm", kernel, bin, &[], &[], 600).unwrap() else {
            return;
        };
        let summary = run.tagged("fexit-check:").next().unwrap_or_else(|| {
            panic!(
                "the {kernel} guest printed no result:\n{}",
                run.transcript()
            )
        });
        println!("{kernel} ({}):", run.kernel_release);
        for l in run.console.lines() {
            if l.starts_with("ok ") || l.starts_with("FAIL") {
                println!("  {l}");
            }
        }
        assert!(
            summary.ends_with(" 0 failed") && run.success,
            "{kernel}: {summary}\n{}",
            run.transcript()
        );
    }
}
