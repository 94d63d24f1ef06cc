//! What the test host provides in place of Kubernetes nodes and the kubelet: a bpffs of its
//! own per node, directories with the owners and modes the kubelet would give them, commands
//! that must succeed, and the removal of what a killed run left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn chown(path: &Path, uid: u32, gid: u32, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Where each run keeps its volumes, node directories and certificates (`/var/tmp`, not a
/// tmpfs: the data dirs are RocksDB databases).
pub const STATE_PREFIX: &str = "raftmap-k8s-";

/// Removes what runs that were killed left behind: their bpffs mounts and directories.
pub fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir("/var/tmp") else {
        return;
    };
    for dir in entries.filter_map(|e| Some(e.ok()?.path())) {
        let ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(STATE_PREFIX));
        let owner = std::fs::read_to_string(dir.join("owner")).unwrap_or_default();
        // No owner yet: a run that is starting.
        if !ours || owner.is_empty() || super::alive(&owner) {
            continue;
        }
        for node in std::fs::read_dir(dir.join("nodes"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(node.path().join("bpffs"))
                .status();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A bpffs of its own for one Kubernetes node, unmounted when dropped.
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    pub fn mount(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        sh(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir));
        Self(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
