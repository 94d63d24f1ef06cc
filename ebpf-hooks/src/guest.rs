//! For tests of what this machine's kernel refuses (fexit): run a binary in a QEMU guest
//! booting one of Debian's stock kernels, through `scripts/vm-run.sh`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernels a guest can boot (directories of `RAFTMAP_VM_DIR` that `scripts/install-deps.sh`
/// fills): Debian 12's 6.1 and Debian 13's 6.12 cloud kernels.
pub const GUEST_KERNELS: &[&str] = &["debian12", "debian13"];

/// What a guest printed, and whether the binary exited 0 there.
#[derive(Debug)]
pub struct GuestRun {
    /// The guest's console (the binary's output among the kernel's).
    pub console: String,
    /// vm-run.sh's own messages.
    pub stderr: String,
    pub success: bool,
    /// `uname -r` in the guest.
    pub kernel_release: String,
}

impl GuestRun {
    /// The console and vm-run.sh's messages, each line indented with `| `, for a failure
    /// message (so that the guest's own `test result:` line is not taken for the host's).
    pub fn transcript(&self) -> String {
        self.console
            .lines()
            .chain(self.stderr.lines())
            .map(|l| format!("  | {l}\n"))
            .collect()
    }

    /// The guest kernel's report of the emulator's known fault, if it died of that: one of its
    /// CPUs executed a breakpoint that was no longer in memory. The kernel patches call sites
    /// (fentry when a tracing program attaches or detaches, tracepoints, static calls) by
    /// writing an `int3` first and removing it last; QEMU's multi-threaded TCG can keep running
    /// another vCPU's stale translation of the patched bytes afterwards (QEMU issue 4669: seen
    /// with ftrace as well; single-threaded TCG, KVM and real CPUs do not). The kernel then
    /// either oopses on an `int3` whose `Code:` shows no `cc` before the trapping address (6.12)
    /// or backs up over the "removed" breakpoint and traps again forever, a soft lockup or RCU
    /// stall with the CPU at a function's first byte holding a `call` (6.1). A lockup anywhere
    /// else (a spinning lock, say) is not this, and is reported as the failure it is.
    pub fn emulator_fault(&self) -> Option<String> {
        let lines: Vec<&str> = self.console.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let oops = l.contains("Oops: int3");
            let stuck = l.contains("soft lockup") || l.contains("self-detected stall");
            if !oops && !stuck {
                continue;
            }
            // The report's first RIP and the code bytes after it.
            let report = &lines[i..(i + 40).min(lines.len())];
            let Some(at) = report.iter().position(|l| l.contains("RIP: 0010:")) else {
                continue;
            };
            let rip = report[at];
            let Some(code) = report[at..].iter().find_map(|l| l.split_once("Code: ")) else {
                continue;
            };
            let bytes: Vec<&str> = code.1.split_whitespace().collect();
            let Some(mark) = bytes.iter().position(|b| b.starts_with('<')) else {
                continue;
            };
            let stale = if oops {
                // The trap reports the address after the breakpoint.
                mark > 0 && bytes[mark - 1] != "cc"
            } else {
                rip.contains("+0x0/") && bytes[mark] == "<e8>"
            };
            if stale {
                let rip = rip.split_once("RIP: ").map_or(rip, |r| r.1);
                return Some(format!("{} at {rip}", l.trim()));
            }
        }
        None
    }

    /// The console lines carrying `tag` (`"guest-scenario:"`, say), each from the tag on: a
    /// kernel message can land on the console in the middle of the binary's line.
    pub fn tagged<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.console
            .lines()
            .filter_map(move |l| l.find(tag).map(|at| &l[at..]))
    }
}

/// Boots `kernel` (one of [`GUEST_KERNELS`]) and runs `bin` with `args` in it, with `files`
/// copied in at their own paths, killing the guest after `timeout_secs`. `Ok(None)`: a VM asset
/// is missing, and the caller skips (this prints why); under `RAFTMAP_REQUIRE_BPF=1` (as in
/// CI) a missing asset is an error instead. A guest whose kernel died of the emulator's fault
/// ([`GuestRun::emulator_fault`]) is booted once more (and this says so on stderr); the second
/// run is returned as it is. `scripts/vm-run.sh` is found next to the calling crate's directory.
pub fn run_in_guest(
    test: &str,
    kernel: &str,
    bin: &Path,
    args: &[&str],
    files: &[PathBuf],
    timeout_secs: u64,
) -> std::io::Result<Option<GuestRun>> {
    // The calling test's crate, set by cargo when it runs tests (a build cache shared between
    // checkouts can hold this library built from another one: its own path may be stale).
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let script = crate_dir.join("../scripts/vm-run.sh");
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let files = files.join(" ");
    let boot = || {
        Command::new("bash")
            .arg(&script)
            .arg(bin)
            .args(args)
            .env("RAFTMAP_VM_KERNEL", kernel)
            .env("RAFTMAP_VM_TIMEOUT", timeout_secs.to_string())
            .env("RAFTMAP_VM_FILES", &files)
            .output()
    };
    let Some(first) = guest_run(test, boot()?)? else {
        return Ok(None);
    };
    // The emulator's fault (see `GuestRun::emulator_fault`) struck a few guest boots in a hundred
    // under this suite's load and is no fault of the code under test: such a guest is booted
    // once more, and the fault is reported. Anything else, or the fault twice, stands.
    match first.emulator_fault() {
        Some(fault) if !first.success => {
            // Straight to stderr, past the test harness's capture: a passing run shows it too.
            let _ = writeln!(
                std::io::stderr(),
                "{test}: the {kernel} guest's kernel died of the emulator's stale-breakpoint \
                 fault (QEMU multi-threaded TCG, see GuestRun::emulator_fault): {fault}; \
                 booting it once more"
            );
            guest_run(test, boot()?)
        }
        _ => Ok(Some(first)),
    }
}

/// What a boot of `scripts/vm-run.sh` printed, as a [`GuestRun`]; `Ok(None)` when a VM asset is
/// missing and the test may skip.
fn guest_run(test: &str, out: std::process::Output) -> std::io::Result<Option<GuestRun>> {
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.code() == Some(77) {
        let why = format!("{console}{stderr}");
        if std::env::var("RAFTMAP_REQUIRE_BPF").as_deref() == Ok("1") {
            return Err(std::io::Error::other(format!(
                "{test}: the QEMU guest is required (RAFTMAP_REQUIRE_BPF=1): {why}"
            )));
        }
        eprintln!("SKIPPED {test}: {why}");
        return Ok(None);
    }
    let mut run = GuestRun {
        console,
        stderr,
        success: out.status.success(),
        kernel_release: String::new(),
    };
    const RELEASE: &str = "vm-run: guest kernel ";
    let release = run
        .tagged(RELEASE)
        .find_map(|l| l[RELEASE.len()..].split_whitespace().next())
        .unwrap_or("?")
        .to_string();
    run.kernel_release = release;
    Ok(Some(run))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(text: &str) -> GuestRun {
        GuestRun {
            console: text.into(),
            stderr: String::new(),
            success: false,
            kernel_release: String::new(),
        }
    }

    #[test]
    fn only_a_cpu_trapping_on_a_breakpoint_no_longer_in_memory_is_the_emulator_fault() {
        // 6.1: both CPUs looped at a patched fentry call (from a guest run).
        let lockup = console(
            "[   84.417434] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [raftmap-fexit-c:480]\n\
             [   84.417686] Modules linked in:\n\
             [   84.417686] RIP: 0010:htab_map_update_elem+0x0/0x2c0\n\
             [   84.417686] Code: 0f 1f 84 00 00 00 00 00 <e8> ab 3d 9b 1a 41 57 41 56\n\
             [   84.417686] RSP: 0018:ffffcbd8c041bae0 EFLAGS: 00000202\n",
        );
        let fault = lockup.emulator_fault().expect("the 6.1 lockup");
        assert!(fault.contains("htab_map_update_elem+0x0/0x2c0"), "{fault}");
        // 6.12: an int3 oops where memory holds a complete call (from a guest run).
        let oops = console(
            "[  183.197038] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
             [  183.198190] RIP: 0010:syscall_exit_to_user_mode_prepare+0x10e/0x170\n\
             [  183.198395] Code: 8b 78 08 48 89 ee e8 <8e> f8 ff ff 65 ff 0d bf b5\n",
        );
        assert!(oops.emulator_fault().is_some());
        // A CPU spinning on a lock, and an int3 that is in memory: real faults, not retried.
        let spin = console(
            "[   84.4] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [raftmap:480]\n\
             [   84.4] RIP: 0010:native_queued_spin_lock_slowpath+0x6e/0x2e0\n\
             [   84.4] Code: 00 00 f0 0f ba 2f 08 0f 92 c0 <f3> 90 8b 07 84 c0 75 f8\n",
        );
        assert_eq!(spin.emulator_fault(), None);
        let breakpoint = console(
            "[   1.0] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
             [   1.0] RIP: 0010:some_function+0x5/0x70\n\
             [   1.0] Code: 48 89 ee cc <8e> f8 ff ff\n",
        );
        assert_eq!(breakpoint.emulator_fault(), None);
        assert_eq!(
            console("guest-scenario: a ok (3 s)\n").emulator_fault(),
            None
        );
    }

    #[test]
    fn tagged_lines_are_found_after_a_kernel_message_and_transcripts_hide_result_lines() {
        let run = GuestRun {
            console: "[    3.1] random: crng init donevm-run: guest kernel 6.12.1-cloud\n\
                      guest-scenario: a ok (3 s)\n\
                      test result: ok. 1 passed\n"
                .into(),
            stderr: "vm-run: qemu exited\n".into(),
            success: true,
            kernel_release: String::new(),
        };
        assert_eq!(
            run.tagged("vm-run: guest kernel ").collect::<Vec<_>>(),
            ["vm-run: guest kernel 6.12.1-cloud"]
        );
        assert_eq!(run.tagged("guest-scenario:").count(), 1);
        let t = run.transcript();
        assert_eq!(t.lines().count(), 4);
        assert!(t.lines().all(|l| l.starts_with("  | ")), "{t}");
    }
}
