//! The node's identity, persisted in its data dir so that a node id is bound to one data dir
//! and never reused for another.

use std::path::{Path, PathBuf};

use raftmap_storage::NodeId;
use serde::{Deserialize, Serialize};

use crate::error::{NodeError, Result};

const IDENTITY_FILE: &str = "identity.json";
/// The ids a data dir held before [`forget_id`]; it marks a raftmap data dir that has no
/// identity now and draws a new one, keeping its data.
const FORGOTTEN_FILE: &str = "identity.forgotten";
const FORMAT: u32 = 1;

/// What `identity.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: u32,
    pub node_id: NodeId,
}

impl Identity {
    /// Writes `identity.json`; called once the new database exists.
    pub fn persist(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| NodeError::Encode {
            what: "identity",
            source: e.into(),
        })?;
        write_atomic(&dir.join(IDENTITY_FILE), &bytes)
    }
}

/// How a new data dir gets its node id: the one given, or (`auto`) a random one.
///
/// Automatic ids are random in `1..2^63` and persisted before the node joins: never derived
/// from a host name, an address or a machine id, which are reused and cloned. Two nodes
/// drawing the same id is a chance of about n²/2^64 for n nodes over a cluster's life; the
/// leader refuses the second, which then draws again ([`forget_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeIdSetting {
    Fixed(NodeId),
    Auto,
}

impl NodeIdSetting {
    fn pick(self) -> NodeId {
        match self {
            NodeIdSetting::Fixed(id) => id,
            // Never 0 (reserved): the top bit is cleared and the lowest set.
            NodeIdSetting::Auto => (rand::random::<u64>() >> 1) | 1,
        }
    }
}

impl std::str::FromStr for NodeIdSetting {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            return Ok(NodeIdSetting::Auto);
        }
        s.parse()
            .map(NodeIdSetting::Fixed)
            .map_err(|_| format!("node id {s:?}: expected a number from 1 up, or \"auto\""))
    }
}

impl<'de> Deserialize<'de> for NodeIdSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Id(NodeId),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Id(id) => Ok(NodeIdSetting::Fixed(id)),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Opens the data dir at `dir`, or prepares a new one for node `requested` (required for a new
/// dir). Returns the identity and whether the dir is new; a new identity is written with
/// [`Identity::persist`] once the database has been created, so that an identity file always
/// comes with a database.
///
/// Refuses a dir that holds something other than a raftmap data dir, an identity file that
/// cannot be read, an identity without its database, and a node id that differs from the one
/// the dir was created for.
pub fn load_or_create(dir: &Path, requested: Option<NodeIdSetting>) -> Result<(Identity, bool)> {
    let path = dir.join(IDENTITY_FILE);
    let err = |problem: String| NodeError::DataDir {
        dir: dir.to_path_buf(),
        problem,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let fixed = match requested {
                Some(NodeIdSetting::Fixed(id)) => Some(id),
                _ => None,
            };
            let id = parse(&bytes, dir, fixed)?;
            if !dir.join("db").join("CURRENT").exists() {
                return Err(err(format!(
                    "{} has an identity but no database (db/CURRENT is missing): the data dir is damaged",
                    dir.display()
                )));
            }
            Ok((id, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let node_id = requested
                .ok_or_else(|| {
                    err(format!(
                        "{} is a new data dir: pass --node-id (a number, or auto) to give this node its identity",
                        dir.display()
                    ))
                })?
                .pick();
            if node_id == 0 {
                return Err(err("node id 0 is reserved; use 1 or more".into()));
            }
            // A `db` alone, or with the identity's temporary file, is what an interrupted first
            // start leaves; it has never served.
            let leftover = dir.join(IDENTITY_FILE).with_extension("tmp");
            let foreign = dir.exists()
                && !dir.join(FORGOTTEN_FILE).exists()
                && std::fs::read_dir(dir)
                    .map_err(|e| io(dir, e))?
                    .filter_map(|e| e.ok())
                    .any(|e| {
                        e.file_name() != "db"
                            && e.file_name() != crate::provision::TLS_SUBDIR
                            && e.path() != leftover
                    });
            if foreign {
                return Err(err(format!(
                    "{} is not empty and is not a raftmap data dir (no {IDENTITY_FILE}); refusing to use it",
                    dir.display()
                )));
            }
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            Ok((
                Identity {
                    format: FORMAT,
                    node_id,
                },
                true,
            ))
        }
        Err(e) => Err(io(&path, e)),
    }
}

/// The identity in `bytes` (the contents of `dir/identity.json`), checked: readable, of this
/// format, and of node `requested` if one is asked for.
pub(crate) fn parse(bytes: &[u8], dir: &Path, requested: Option<NodeId>) -> Result<Identity> {
    let err = |problem: String| NodeError::DataDir {
        dir: dir.to_path_buf(),
        problem,
    };
    let path = dir.join(IDENTITY_FILE);
    let id: Identity = serde_json::from_slice(bytes).map_err(|e| {
        err(format!(
            "{} is corrupt ({e}); refusing to start rather than guess this node's identity",
            path.display()
        ))
    })?;
    if id.format != FORMAT {
        return Err(err(format!(
            "{} has format {}, this raftmap reads format {FORMAT}",
            path.display(),
            id.format
        )));
    }
    if id.node_id == 0 {
        return Err(err(format!(
            "{} names node 0, which is reserved",
            path.display()
        )));
    }
    if let Some(r) = requested {
        if r != id.node_id {
            return Err(err(format!(
                "{} belongs to node {}, not node {r}: node ids are bound to their data dir",
                dir.display(),
                id.node_id
            )));
        }
    }
    Ok(id)
}

/// Removes the identity of a node with an automatic id that the cluster refused (another
/// node holds or held it), or that was removed while it was away, so that its next start
/// draws a new one. The database stays: for a node that never joined it holds nothing yet, and
/// for a removed one it is the cluster's state as last applied here, the base against which
/// its kernel maps are merged when it joins again (what changed in them since is proposed;
/// the rest follows the cluster). Openraft treats the log it holds as any follower's.
pub(crate) fn forget_id(dir: &Path) -> Result<()> {
    let path = dir.join(IDENTITY_FILE);
    // The ids the dir had, one per line: the record that it is a raftmap data dir whose
    // identity was given up, written before the identity goes.
    let forgotten = dir.join(FORGOTTEN_FILE);
    let id = parse(&std::fs::read(&path).map_err(|e| io(&path, e))?, dir, None)?.node_id;
    let mut record = std::fs::read_to_string(&forgotten).unwrap_or_default();
    record.push_str(&format!("{id}\n"));
    write_atomic(&forgotten, record.as_bytes())?;
    std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
    // A certificate obtained for the refused id names it: it goes too.
    let tls = dir.join(crate::provision::TLS_SUBDIR);
    if tls.exists() {
        std::fs::remove_dir_all(&tls).map_err(|e| io(&tls, e))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

fn io(path: &Path, e: std::io::Error) -> NodeError {
    NodeError::DataDir {
        dir: path.parent().unwrap_or(path).to_path_buf(),
        problem: format!("{}: {e}", path.display()),
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old file or the new one, never a
/// part: write a temporary file (a leftover one from an earlier crash is overwritten), fsync
/// it, rename it over `path`, fsync the directory (the rename itself must be durable).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp: PathBuf = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_dir_needs_node_id_and_binds_it() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("n1");
        let e = load_or_create(&dir, None).unwrap_err().to_string();
        assert!(e.contains("pass --node-id"), "{e}");
        let (id, fresh) = load_or_create(&dir, Some(NodeIdSetting::Fixed(7))).unwrap();
        assert!(fresh);
        assert_eq!(id.node_id, 7);
        id.persist(&dir).unwrap();
        let e = load_or_create(&dir, None).unwrap_err().to_string();
        assert!(e.contains("no database"), "{e}");
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::write(dir.join("db/CURRENT"), "x").unwrap();
        assert_eq!(load_or_create(&dir, None).unwrap(), (id.clone(), false));
        let e = load_or_create(&dir, Some(NodeIdSetting::Fixed(8)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("belongs to node 7, not node 8"), "{e}");
        // auto keeps whatever the dir was created with.
        let again = load_or_create(&dir, Some(NodeIdSetting::Auto)).unwrap();
        assert_eq!(again, (id, false));
    }

    #[test]
    fn auto_ids_are_drawn_once_kept_and_drawn_again_after_a_refused_join() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("n");
        let (id, fresh) = load_or_create(&dir, Some(NodeIdSetting::Auto)).unwrap();
        assert!(fresh);
        assert!(id.node_id > 0 && id.node_id < 1 << 63, "{}", id.node_id);
        id.persist(&dir).unwrap();
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::write(dir.join("db/CURRENT"), "x").unwrap();
        assert_eq!(
            load_or_create(&dir, Some(NodeIdSetting::Auto)).unwrap(),
            (id.clone(), false)
        );
        // A member's dir holds more than its database; all of it stays.
        std::fs::write(dir.join("kernel-maps.json"), "{}").unwrap();
        forget_id(&dir).unwrap();
        let (next, fresh) = load_or_create(&dir, Some(NodeIdSetting::Auto)).unwrap();
        assert!(fresh);
        assert_ne!(next.node_id, id.node_id);
        assert!(dir.join("kernel-maps.json").exists());
        assert_eq!(
            std::fs::read_to_string(dir.join(FORGOTTEN_FILE)).unwrap(),
            format!("{}\n", id.node_id)
        );
        assert_eq!("auto".parse(), Ok(NodeIdSetting::Auto));
        assert_eq!("12".parse(), Ok(NodeIdSetting::Fixed(12)));
        let e = "twelve".parse::<NodeIdSetting>().unwrap_err();
        assert!(e.contains("\"twelve\"") && e.contains("auto"), "{e}");
        #[derive(Deserialize)]
        struct C {
            node_id: NodeIdSetting,
        }
        let c: C = toml::from_str("node_id = \"auto\"").unwrap();
        assert_eq!(c.node_id, NodeIdSetting::Auto);
        let c: C = toml::from_str("node_id = 4").unwrap();
        assert_eq!(c.node_id, NodeIdSetting::Fixed(4));
    }

    #[test]
    fn a_first_start_interrupted_before_its_identity_was_renamed_can_start_again() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("n1");
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::write(dir.join("identity.tmp"), "{\"format\":1,\"no").unwrap();
        let (id, fresh) = load_or_create(&dir, Some(NodeIdSetting::Fixed(3))).unwrap();
        assert!(fresh);
        id.persist(&dir).unwrap();
        assert!(!dir.join("identity.tmp").exists());
        std::fs::write(dir.join("db/CURRENT"), "x").unwrap();
        assert_eq!(load_or_create(&dir, None).unwrap().0.node_id, 3);
    }

    #[test]
    fn an_identity_of_node_zero_or_another_format_is_refused() {
        let e = parse(br#"{"format":1,"node_id":0}"#, Path::new("/d"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("node 0"), "{e}");
        let e = parse(br#"{"format":2,"node_id":4}"#, Path::new("/d"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("format 2"), "{e}");
        assert_eq!(
            parse(br#"{"format":1,"node_id":4}"#, Path::new("/d"), Some(4))
                .unwrap()
                .node_id,
            4
        );
    }

    #[test]
    fn foreign_and_corrupt_dirs_are_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("somefile"), "hello").unwrap();
        let e = load_or_create(t.path(), Some(NodeIdSetting::Fixed(1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a raftmap data dir"), "{e}");
        std::fs::write(t.path().join(IDENTITY_FILE), "{not json").unwrap();
        let e = load_or_create(t.path(), Some(NodeIdSetting::Fixed(1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("corrupt"), "{e}");
    }
}
