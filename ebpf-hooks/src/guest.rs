//! For tests of what this machine's kernel refuses (fexit): run a binary in a QEMU guest
//! booting one of Debian's stock kernels, through `scripts/vm-run.sh`.

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
/// CI) a missing asset is an error instead. `scripts/vm-run.sh` is found next to the calling
/// crate's directory.
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
    let out = Command::new("bash")
        .arg(script)
        .arg(bin)
        .args(args)
        .env("RAFTMAP_VM_KERNEL", kernel)
        .env("RAFTMAP_VM_TIMEOUT", timeout_secs.to_string())
        .env("RAFTMAP_VM_FILES", files.join(" "))
        .output()?;
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
