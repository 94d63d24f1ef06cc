//! A pod as the cluster gives it: its name and addresses, its namespace, the host directories
//! behind its volumes; what its env and probes resolve to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::manifest::{expand, Container, Probe};

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
