//! Running rendered Kubernetes manifests without a cluster: the pod templates of `kubectl
//! kustomize` output (`manifest.rs`) become `podman run` command lines (`podman.rs`) with
//! exactly their args, env (field references given values), user, capabilities, seccomp,
//! read-only root filesystem, mounts and grace period; each pod (`pod.rs`) has its network
//! namespace of the test network (hostNetwork pods share their node's); Service names resolve
//! through `--add-host`; probes are the manifests' httpGet probes, run from the test against
//! the pod's address. `host.rs` stands in for the nodes: a bpffs each, the kubelet's
//! directories.

// Shared by two test crates, each of which uses a part.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

mod host;
mod manifest;
mod pod;
mod podman;

use std::time::{Duration, Instant};

pub use host::{chown, sh, sweep_stale_dirs, Bpffs, STATE_PREFIX};
pub use manifest::*;
pub use pod::Pod;
pub use podman::{alive, owner, run, Podman};

/// Polls `cond` every 50 ms until it holds or `timeout` passes (then panics with `what` and
/// the last value it saw).
pub fn wait_until<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> (bool, T),
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, seen) = cond();
        if ok {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; last: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
