//! Podman, as the test drives it: a pod's container started with exactly what its spec says,
//! stopped as the kubelet stops it, and every container of a run removed when it ends.

use std::process::Command;

use super::manifest::{expand, Container, PodSpec};
use super::pod::Pod;

/// Podman, as the test drives it: every container it starts carries a label naming this test
/// run, and all of them are removed when it is dropped (and by the next run, if this one was
/// killed before it could).
#[derive(Debug)]
pub struct Podman {
    label: String,
    /// The image every pod runs (built by deploy/image/build.sh from the test's binary).
    pub image: String,
}

/// The label that marks the test's containers; its value is the owner's pid and start time.
const LABEL: &str = "raftmap-test-owner";

/// The flags every podman invocation here needs (DEPLOY.md): runc, since crun refuses this
/// host's hybrid cgroups.
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

/// Runs a command: whether it succeeded, and what it printed (stdout, then stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A process's identity that survives pid reuse (pid and start time).
pub fn owner(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?;
    Some(format!("{pid}-{start}"))
}

/// Whether the process `who` (as [`owner`] wrote it) still runs.
pub fn alive(who: &str) -> bool {
    who.split('-')
        .next()
        .and_then(|p| p.parse().ok())
        .and_then(owner)
        .is_some_and(|now| now == who.trim())
}

impl Podman {
    pub fn new(image: &str) -> Self {
        let label = owner(std::process::id()).unwrap();
        let me = Self {
            label,
            image: image.into(),
        };
        me.sweep();
        me
    }

    /// Removes the containers of earlier runs whose owner is gone.
    fn sweep(&self) {
        let (_, text) = run(podman().args([
            "ps",
            "-a",
            "--filter",
            &format!("label={LABEL}"),
            "--format",
            &format!("{{{{.Names}}}} {{{{index .Labels \"{LABEL}\"}}}}"),
        ]));
        for line in text.lines() {
            let Some((name, who)) = line.split_once(' ') else {
                continue;
            };
            if !alive(who) {
                let _ = run(podman().args(["rm", "-f", "-t", "0", name]));
            }
        }
    }

    /// `podman run` of `pod`'s container `c` with what its spec says; returns the container's
    /// name. `adjust` may change the spec first (a misconfiguration under test).
    pub fn start(&self, pod: &Pod, spec: &PodSpec, c: &Container) -> String {
        let name = format!("raftmap-test-{}-{}", std::process::id(), pod.name);
        let _ = run(podman().args(["rm", "-f", "-t", "0", &name]));
        let env = pod.env(c);
        let psc = &spec.security_context;
        let sc = &c.security_context;
        let mut cmd = podman();
        cmd.args(["run", "-d", "--name", &name])
            .args(["--label", &format!("{LABEL}={}", self.label)])
            // The sandbox cannot raise podman's default limits (DEPLOY.md).
            .args([
                "--ulimit",
                "nofile=4096:4096",
                "--ulimit",
                "nproc=4096:4096",
            ])
            .args(["--network", &format!("ns:{}", pod.netns.display())])
            .args(["--hostname", &pod.name])
            // restartPolicy: Always, as for every StatefulSet and DaemonSet pod.
            .args(["--restart", "always"])
            .args([
                "--stop-timeout",
                &spec
                    .termination_grace_period_seconds
                    .unwrap_or(30)
                    .to_string(),
            ]);
        for (host, ip) in &pod.hosts {
            cmd.args(["--add-host", &format!("{host}:{ip}")]);
        }
        for (k, v) in &env {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        let user = sc.run_as_user.or(psc.run_as_user).unwrap_or(0);
        let group = sc.run_as_group.or(psc.run_as_group).unwrap_or(user);
        if sc.run_as_non_root.or(psc.run_as_non_root) == Some(true) {
            assert_ne!(
                user, 0,
                "runAsNonRoot with user 0: the kubelet would refuse it"
            );
        }
        cmd.args(["--user", &format!("{user}:{group}")]);
        if let Some(g) = psc.fs_group {
            cmd.args(["--group-add", &g.to_string()]);
        }
        if sc.read_only_root_filesystem == Some(true) {
            // Kubernetes mounts no tmpfs of its own on a read-only root.
            cmd.args(["--read-only", "--read-only-tmpfs=false"]);
        }
        if sc.allow_privilege_escalation == Some(false) {
            cmd.args(["--security-opt", "no-new-privileges"]);
        }
        assert_ne!(sc.privileged, Some(true), "no pod of raftmap is privileged");
        if let Some(caps) = &sc.capabilities {
            for d in &caps.drop {
                cmd.args(["--cap-drop", d]);
            }
            for a in &caps.add {
                cmd.args(["--cap-add", &format!("CAP_{a}")]);
            }
        }
        match sc
            .seccomp_profile
            .as_ref()
            .or(psc.seccomp_profile.as_ref())
            .map(|s| s.kind.as_str())
        {
            Some("Unconfined") => {
                cmd.args(["--security-opt", "seccomp=unconfined"]);
            }
            Some("RuntimeDefault") | None => {}
            Some(other) => panic!("seccomp profile {other} is not run here"),
        }
        for m in &c.volume_mounts {
            let src = pod
                .volumes
                .get(&m.name)
                .unwrap_or_else(|| panic!("the test gives no directory for volume {}", m.name));
            let mut opts = vec![if m.read_only { "ro" } else { "rw" }];
            match m.mount_propagation.as_deref() {
                Some("HostToContainer") => opts.push("rslave"),
                Some("None") | None => {}
                Some(other) => panic!("mountPropagation {other}"),
            }
            cmd.args([
                "--volume",
                &format!("{}:{}:{}", src.display(), m.mount_path, opts.join(",")),
            ]);
        }
        if let Some(mem) = c.resources["limits"]["memory"].as_str() {
            cmd.args(["--memory", &mem.replace("Gi", "g").replace("Mi", "m")]);
        }
        cmd.arg(&self.image);
        assert!(c.command.is_empty(), "the image's entrypoint is the binary");
        cmd.args(c.args.iter().map(|a| expand(a, &env)));
        let (ok, text) = run(&mut cmd);
        assert!(ok, "{cmd:?}: {text}");
        name
    }

    /// SIGTERM, then SIGKILL after the container's grace period (as the kubelet deletes a pod);
    /// returns the exit code.
    pub fn stop(&self, name: &str) -> i64 {
        let (ok, text) = run(podman().args(["stop", name]));
        assert!(ok, "podman stop {name}: {text}");
        let (_, code) = run(podman().args(["inspect", "--format", "{{.State.ExitCode}}", name]));
        code.trim().parse().unwrap_or(-1)
    }

    pub fn remove(&self, name: &str) {
        let _ = run(podman().args(["rm", "-f", "-t", "0", name]));
    }

    pub fn logs(&self, name: &str) -> String {
        run(podman().args(["logs", name])).1
    }

    /// How many times the runtime restarted the container after it exited.
    pub fn restarts(&self, name: &str) -> u64 {
        let (_, n) = run(podman().args(["inspect", "--format", "{{.RestartCount}}", name]));
        n.trim().parse().unwrap_or(0)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let (_, names) = run(podman().args([
            "ps",
            "-a",
            "--filter",
            &format!("label={LABEL}={}", self.label),
            "--format",
            "{{.Names}}",
        ]));
        for name in names.lines().filter(|n| !n.is_empty()) {
            if std::thread::panicking() {
                let logs = self.logs(name);
                let tail: Vec<&str> = logs.lines().rev().take(25).collect();
                eprintln!("---- container {name} (last 25 lines)");
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
            let _ = run(podman().args(["rm", "-f", "-t", "0", name]));
        }
    }
}
