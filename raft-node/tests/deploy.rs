//! The Kubernetes manifests of `deploy/`: every overlay renders with `kubectl kustomize`,
//! validates strictly against the oldest Kubernetes raftmap supports (1.30), and passes
//! checkov with no failed check (the skips are annotations on the resources, each with its
//! reason), as does the image's Containerfile. `kubernetes.rs` runs them. The checkers come from `scripts/install-deps.sh` (`RAFTMAP_TOOLS`); without one,
//! the test fails under `RAFTMAP_REQUIRE_BPF=1` (CI) and says it skipped otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pods;

use pods::run;

use std::path::{Path, PathBuf};
use std::process::Command;

const OLDEST_KUBERNETES: &str = "1.30.0";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A checker: in the tools virtualenv, or on PATH.
fn tool(name: &str) -> Option<PathBuf> {
    let venv = std::env::var("RAFTMAP_TOOLS").unwrap_or_else(|_| "/var/cache/raftmap-tools".into());
    let in_venv = Path::new(&venv).join("bin").join(name);
    if in_venv.exists() {
        return Some(in_venv);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Every tool, or why the test cannot run (a failure in CI).
fn tools() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let found = (
        tool("kubectl"),
        tool("kubernetes-validate"),
        tool("checkov"),
    );
    if let (Some(k), Some(v), Some(c)) = found.clone() {
        return Some((k, v, c));
    }
    let why = format!(
        "missing: {}(scripts/install-deps.sh installs the checkers)",
        [
            ("kubectl ", &found.0),
            ("kubernetes-validate ", &found.1),
            ("checkov ", &found.2)
        ]
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect::<String>()
    );
    if std::env::var("RAFTMAP_REQUIRE_BPF").as_deref() == Ok("1") {
        panic!("the manifest checks are required (RAFTMAP_REQUIRE_BPF=1): {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// checkov's verdict on `file` for `framework`: passed with no failed check, and its report.
fn checkov(checkov: &Path, framework: &str, file: &Path) -> (bool, String) {
    let (ok, text) = run(Command::new(checkov)
        .args(["--framework", framework])
        .args(["--compact", "--quiet", "--skip-download", "-f"])
        .arg(file));
    (
        ok && text.contains("Failed checks: 0") && text.contains("Passed checks"),
        text,
    )
}

fn overlays() -> Vec<PathBuf> {
    let mut dirs = vec![deploy_dir().join("base")];
    let mut more: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    more.sort();
    dirs.extend(more);
    dirs
}

fn render(kubectl: &Path, dir: &Path, out: &Path) -> String {
    let (ok, text) = run(Command::new(kubectl).arg("kustomize").arg(dir));
    assert!(ok, "kubectl kustomize {}: {text}", dir.display());
    std::fs::write(out, &text).unwrap();
    text
}

fn validate(validator: &Path, file: &Path) -> (bool, String) {
    let (ok, text) = run(Command::new(validator)
        .args(["--strict", "-k", OLDEST_KUBERNETES])
        .arg(file));
    (ok && !text.contains("ERROR"), text)
}

#[test]
fn every_overlay_renders_validates_against_kubernetes_1_30_and_passes_checkov() {
    let Some((kubectl, validator, checkov_bin)) = tools() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dirs = overlays();
    assert!(dirs.len() >= 4, "{dirs:?}");
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let file = tmp.path().join(format!("{name}.yaml"));
        let rendered = render(&kubectl, &dir, &file);
        for kind in [
            "kind: StatefulSet",
            "kind: DaemonSet",
            "kind: NetworkPolicy",
            "kind: PodDisruptionBudget",
        ] {
            assert!(rendered.contains(kind), "{name} renders no {kind}");
        }
        let (ok, text) = validate(&validator, &file);
        assert!(
            ok,
            "{name} does not validate against Kubernetes {OLDEST_KUBERNETES}:\n{text}"
        );
        let (ok, text) = checkov(&checkov_bin, "kubernetes", &file);
        assert!(ok, "checkov on {name}:\n{text}");
    }
}

#[test]
fn the_containerfile_passes_checkov() {
    let Some((_, _, checkov_bin)) = tools() else {
        return;
    };
    // checkov knows the file by Docker's name.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("Dockerfile");
    std::fs::copy(deploy_dir().join("image/Containerfile"), &file).unwrap();
    let (ok, text) = checkov(&checkov_bin, "dockerfile", &file);
    assert!(ok, "checkov on deploy/image/Containerfile:\n{text}");
}

#[test]
fn the_validator_refuses_a_field_kubernetes_does_not_know() {
    // The check above means something only if a wrong manifest fails it.
    let Some((kubectl, validator, _)) = tools() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.yaml");
    let rendered = render(&kubectl, &deploy_dir().join("base"), &file);
    let bad = rendered.replacen(
        "hostNetwork: true",
        "hostNetwork: true\n      hostNetwrk: true",
        1,
    );
    assert_ne!(bad, rendered);
    std::fs::write(&file, bad).unwrap();
    let (ok, text) = validate(&validator, &file);
    assert!(!ok && text.contains("hostNetwrk"), "{text}");
}

#[test]
fn the_five_voter_overlay_founds_with_five() {
    // --bootstrap-expect must equal the replicas: with fewer the voters never found the cluster.
    let Some((kubectl, _, _)) = tools() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for (dir, n) in [("base", 3), ("overlays/five-voters", 5)] {
        let text = render(
            &kubectl,
            &deploy_dir().join(dir),
            &tmp.path().join("r.yaml"),
        );
        assert!(text.contains(&format!("replicas: {n}\n")), "{dir}");
        assert!(
            text.contains(&format!("- name: RAFTMAP_VOTERS\n          value: \"{n}\"")),
            "{dir}: RAFTMAP_VOTERS is not {n}"
        );
    }
}
