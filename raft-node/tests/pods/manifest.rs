//! The objects of `kubectl kustomize` output that pods are made from: the serde model of what
//! the test runs (unknown fields are ignored), and Kubernetes' `$(VAR)` expansion.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

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
