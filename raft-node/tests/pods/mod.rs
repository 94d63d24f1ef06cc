//! Running rendered Kubernetes manifests without a cluster: the pod templates of `kubectl
//! kustomize` output become `podman run` command lines with exactly their args, env (field
//! references given values), user, capabilities, seccomp, read-only root filesystem, mounts
//! and grace period; each pod's network is a namespace of the test network (hostNetwork pods
//! share their node's); Service names resolve through `--add-host`; probes are the manifests'
//! httpGet probes, run from the test against the pod's address.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// One object of the rendered output (only what the pods need).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    pub kind: String,
    pub metadata: Meta,
    #[serde(default)]
    pub spec: yaml_serde::Value,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    #[serde(default)]
    pub replicas: Option<u32>,
    pub template: Template,
    #[serde(default)]
    pub volume_claim_templates: Vec<yaml_serde::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Template {
    pub metadata: Meta,
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub security_context: SecurityContext,
    pub containers: Vec<Container>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub termination_grace_period_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub security_context: SecurityContext,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
    pub startup_probe: Option<Probe>,
    pub liveness_probe: Option<Probe>,
    pub readiness_probe: Option<Probe>,
    #[serde(default)]
    pub resources: yaml_serde::Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<yaml_serde::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    pub name: Option<String>,
    pub container_port: u16,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub run_as_non_root: Option<bool>,
    pub fs_group: Option<u32>,
    pub read_only_root_filesystem: Option<bool>,
    pub allow_privilege_escalation: Option<bool>,
    pub privileged: Option<bool>,
    pub capabilities: Option<Capabilities>,
    pub seccomp_profile: Option<Seccomp>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub drop: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Seccomp {
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub host_path: Option<yaml_serde::Value>,
    pub config_map: Option<yaml_serde::Value>,
    pub secret: Option<SecretVolume>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretVolume {
    pub secret_name: String,
    pub default_mode: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    pub mount_propagation: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub http_get: Option<HttpGet>,
    pub period_seconds: Option<u64>,
    pub failure_threshold: Option<u64>,
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpGet {
    pub path: String,
    pub port: yaml_serde::Value,
    pub host: Option<String>,
}

/// The objects `kubectl kustomize dir` renders.
#[derive(Debug)]
pub struct Rendered {
    pub objects: Vec<Object>,
    pub text: String,
}

impl Rendered {
    pub fn render(kubectl: &Path, dir: &Path) -> Self {
        let out = Command::new(kubectl)
            .arg("kustomize")
            .arg(dir)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let objects = yaml_serde::Deserializer::from_str(&text)
            .map(|doc| Object::deserialize(doc).unwrap())
            .collect();
        Self { objects, text }
    }

    pub fn object(&self, kind: &str, name: &str) -> &Object {
        self.objects
            .iter()
            .find(|o| o.kind == kind && o.metadata.name == name)
            .unwrap_or_else(|| panic!("the manifests have no {kind} {name}"))
    }

    pub fn workload(&self, kind: &str, name: &str) -> Workload {
        yaml_serde::from_value(self.object(kind, name).spec.clone()).unwrap()
    }

    /// The ConfigMap a volume names (its generated name carries a hash).
    pub fn config_map(&self, name: &str) -> &Object {
        self.object("ConfigMap", name)
    }
}

/// What a pod is given by the cluster: its name and address, its node's, the namespace, the
/// host directories behind its volumes, and the names it resolves.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub ip: String,
    pub host_ip: String,
    pub node_name: String,
    /// The network namespace the pod runs in (its node's with hostNetwork).
    pub netns: PathBuf,
    /// Volume name -> host directory.
    pub volumes: BTreeMap<String, PathBuf>,
    pub hosts: Vec<(String, String)>,
    pub annotations: BTreeMap<String, String>,
}

impl Pod {
    /// The value of an env var's `fieldRef`.
    fn field(&self, path: &str) -> String {
        match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "status.podIP" => self.ip.clone(),
            "status.hostIP" => self.host_ip.clone(),
            "spec.nodeName" => self.node_name.clone(),
            other => panic!("the test gives no value for fieldRef {other}"),
        }
    }

    /// The container's environment, in order.
    pub fn env(&self, c: &Container) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        for e in &c.env {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => expand(v, &env),
                (None, Some(from)) => {
                    let path = from["fieldRef"]["fieldPath"]
                        .as_str()
                        .unwrap_or_else(|| panic!("env {}: only fieldRef is supported", e.name));
                    self.field(path)
                }
                (None, None) => String::new(),
            };
            env.push((e.name.clone(), value));
        }
        env
    }

    /// The address and path of one of the container's httpGet probes.
    pub fn probe_target(&self, c: &Container, probe: &Probe) -> (SocketAddr, String) {
        let get = probe.http_get.as_ref().expect("an httpGet probe");
        let port = match &get.port {
            yaml_serde::Value::Number(n) => n.as_u64().unwrap() as u16,
            yaml_serde::Value::String(name) => {
                c.ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .unwrap_or_else(|| panic!("probe port {name} is no container port"))
                    .container_port
            }
            other => panic!("probe port {other:?}"),
        };
        // The kubelet probes the pod's address unless the probe names a host; a pod on the
        // host network has its node's.
        let host = get.host.clone().unwrap_or_else(|| self.ip.clone());
        (format!("{host}:{port}").parse().unwrap(), get.path.clone())
    }
}

/// Kubernetes' `$(VAR)` expansion of args and values: defined variables are replaced, `$$`
/// is a literal `$`, anything else is left as it is.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&format!("$({name})")),
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

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
