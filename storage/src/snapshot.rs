//! Snapshots as bytes: the encoded state, its checksum, its validation, and `snapshot.bin`.
//!
//! A snapshot's data (what `snapshot.bin` holds after the metadata, and what travels to a
//! follower) is `MAGIC`, the CRC-32 of the payload, then the payload (postcard). The checksum is
//! verified before a snapshot is used or sent; a snapshot received from a peer is also decoded
//! and checked against its own schemas before anything of it is installed. Data written before
//! checksums (no `MAGIC`; a postcard payload never starts with it) is read unverified.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::db::{decode, encode, split_data_key};
use crate::error::{Result, StorageError};
use crate::model::{ClusterInfo, MapSchema, MapType, SnapshotMeta, MAX_MAPS};

/// Marks checksummed snapshot data (format 1).
const MAGIC: &[u8; 8] = b"RMSNAP\x01\x00";

/// The snapshot as it travels: the whole replicated state.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotPayload {
    pub(crate) cluster: ClusterInfo,
    pub(crate) schemas: Vec<MapSchema>,
    /// `(data key, value)`, sorted.
    #[serde(with = "byte_pairs")]
    pub(crate) entries: Vec<(Vec<u8>, Vec<u8>)>,
}

/// `(key, value)` pairs with both as byte strings (the same postcard bytes as tuples of
/// `Vec<u8>`, copied whole).
mod byte_pairs {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub(super) fn serialize<S: Serializer>(
        v: &[(Vec<u8>, Vec<u8>)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(k, v)| (Bytes::new(k), Bytes::new(v))))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<crate::MapEntries, D::Error> {
        let pairs: Vec<(ByteBuf, ByteBuf)> = Deserialize::deserialize(d)?;
        Ok(pairs
            .into_iter()
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .collect())
    }
}

/// The snapshot as stored on disk.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub(crate) meta: SnapshotMeta,
    pub(crate) data: Vec<u8>,
}

/// A snapshot's name in logs and errors: the log id it ends at.
pub(crate) fn snapshot_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        Some(l) => format!("{}-{}", l.leader_id.term, l.index),
        None => "empty".into(),
    }
}

fn bad(what: &str, reason: impl Into<String>) -> StorageError {
    StorageError::BadSnapshot {
        what: what.to_string(),
        reason: reason.into(),
    }
}

/// Encodes a payload as snapshot data, with its checksum.
pub(crate) fn encode_data(payload: &SnapshotPayload) -> Result<Vec<u8>> {
    let mut body = encode(payload, "snapshot payload")?;
    // Node names follow the payload (see `ClusterInfo::encode`): a reader without them
    // ignores the trailing bytes.
    if !payload.cluster.names.is_empty() {
        body.extend(encode(&payload.cluster.names, "node names")?);
    }
    let mut data = Vec::with_capacity(MAGIC.len() + 4 + body.len());
    data.extend_from_slice(MAGIC);
    data.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    data.extend_from_slice(&body);
    Ok(data)
}

/// The payload bytes of snapshot data, once its checksum holds.
fn body<'a>(data: &'a [u8], what: &str) -> Result<&'a [u8]> {
    let Some(rest) = data.strip_prefix(MAGIC.as_slice()) else {
        return Ok(data); // written before checksums
    };
    let (sum, body) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| bad(what, "cut short before its checksum"))?;
    let (expected, actual) = (u32::from_le_bytes(*sum), crc32fast::hash(body));
    if expected != actual {
        return Err(bad(
            what,
            format!("checksum mismatch (stored {expected:08x}, computed {actual:08x})"),
        ));
    }
    Ok(body)
}

/// Verifies the checksum of snapshot data without decoding it.
pub(crate) fn verify_checksum(data: &[u8], what: &str) -> Result<()> {
    body(data, what).map(drop)
}

/// Decodes snapshot data whose checksum holds and whose contents are consistent: valid
/// schemas, at most `MAX_MAPS` of them, every entry in a declared map with the schema's key
/// and value sizes, keys sorted and unique, no map over its entry limit.
pub(crate) fn decode_data(data: &[u8], what: &str) -> Result<SnapshotPayload> {
    let (mut payload, rest): (SnapshotPayload, &[u8]) =
        postcard::take_from_bytes(body(data, what)?).map_err(|source| StorageError::Decode {
            what: what.to_string(),
            source,
        })?;
    if !rest.is_empty() {
        payload.cluster.names = decode(rest, || format!("{what}: node names"))?;
    }
    if let Some((id, n)) = payload
        .cluster
        .names
        .iter()
        .find(|(_, n)| n.len() > crate::model::MAX_NODE_NAME)
    {
        return Err(bad(
            what,
            format!("node {id}'s name is {} bytes long", n.len()),
        ));
    }
    if payload.schemas.len() > MAX_MAPS {
        return Err(bad(
            what,
            format!("{} maps, the most is {MAX_MAPS}", payload.schemas.len()),
        ));
    }
    let mut schemas = std::collections::BTreeMap::new();
    for s in &payload.schemas {
        s.validate().map_err(|e| bad(what, e.to_string()))?;
        if schemas.insert(s.name.as_str(), (s, 0u64)).is_some() {
            return Err(bad(what, format!("map {} is declared twice", s.name)));
        }
    }
    let mut last: Option<&[u8]> = None;
    for (k, v) in &payload.entries {
        if last.is_some_and(|l| l >= k.as_slice()) {
            return Err(bad(what, "entries are not sorted by key"));
        }
        last = Some(k);
        let (map, key) = split_data_key(k).ok_or_else(|| bad(what, "an entry key names no map"))?;
        let (schema, count) = schemas.get_mut(map).ok_or_else(|| {
            bad(
                what,
                format!("an entry of map {map:?}, which is not declared"),
            )
        })?;
        if key.len() != schema.key_size as usize || v.len() != schema.value_size as usize {
            return Err(bad(
                what,
                format!(
                    "an entry of map {map} has a {} B key and a {} B value, the schema says {schema}",
                    key.len(),
                    v.len()
                ),
            ));
        }
        *count += 1;
        if schema.map_type != MapType::Array && *count > u64::from(schema.max_entries) {
            return Err(bad(
                what,
                format!("map {map} holds more than {} entries", schema.max_entries),
            ));
        }
    }
    Ok(payload)
}

/// Checks snapshot data received from a peer before it is handed to Raft: the checksum and
/// every consistency check [`decode_data`] makes.
pub fn check_snapshot_data(data: &[u8]) -> Result<()> {
    decode_data(data, "received snapshot").map(drop)
}

/// Writes `snapshot.bin` by write, fsync, rename and directory fsync.
pub(crate) fn write_file(path: &Path, snap: &StoredSnapshot) -> Result<()> {
    let io = |source| StorageError::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = encode(snap, "snapshot")?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Reads `snapshot.bin` (`None` when there is none) and verifies its checksum.
pub(crate) fn read_file(path: &Path) -> Result<Option<StoredSnapshot>> {
    let what = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => {
            let stored: StoredSnapshot = decode(&bytes, || what.clone())?;
            verify_checksum(&stored.data, &what)?;
            Ok(Some(stored))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::Io { path: what, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::data_key;

    fn payload() -> SnapshotPayload {
        SnapshotPayload {
            cluster: ClusterInfo::default(),
            schemas: vec![MapSchema::hash("m", 2, 2, 2)],
            entries: vec![
                (data_key("m", &[0, 1]), vec![1, 1]),
                (data_key("m", &[0, 2]), vec![2, 2]),
            ],
        }
    }

    #[test]
    fn node_names_travel_after_the_payload_and_older_readers_skip_them() {
        let mut p = payload();
        p.cluster.cluster_id = Some("c".into());
        p.cluster.names.insert(7, "worker-7.example".into());
        let data = encode_data(&p).unwrap();
        let back = decode_data(&data, "s").unwrap();
        assert_eq!(back.cluster, p.cluster);
        assert_eq!(back.entries, p.entries);
        // What a reader from before names decodes: everything but them.
        let old: SnapshotPayload = decode(body(&data, "s").unwrap(), || "old".into()).unwrap();
        assert_eq!(old.cluster.cluster_id.as_deref(), Some("c"));
        assert!(old.cluster.names.is_empty());
        assert_eq!(old.entries, p.entries);
        // And data from before names reads with none.
        let mut unnamed = payload();
        unnamed.cluster.cluster_id = Some("c".into());
        let legacy = encode_data(&unnamed).unwrap();
        assert!(decode_data(&legacy, "s").unwrap().cluster.names.is_empty());
        // A name longer than a DNS name is refused.
        p.cluster
            .names
            .insert(8, "x".repeat(crate::model::MAX_NODE_NAME + 1));
        let e = decode_data(&encode_data(&p).unwrap(), "s")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node 8's name"), "{e}");
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let mut data = encode_data(&payload()).unwrap();
        decode_data(&data, "s").unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        let e = decode_data(&data, "s").unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn inconsistent_contents_are_refused() {
        let mut p = payload();
        p.entries.push((data_key("other", &[0, 3]), vec![3, 3]));
        let e = decode_data(&encode_data(&p).unwrap(), "s")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not declared"), "{e}");
        let mut p = payload();
        p.entries[1].1 = vec![2; 3];
        let e = decode_data(&encode_data(&p).unwrap(), "s")
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 B value"), "{e}");
        let mut p = payload();
        p.entries.push((data_key("m", &[0, 3]), vec![3, 3]));
        let e = decode_data(&encode_data(&p).unwrap(), "s")
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 2 entries"), "{e}");
        let mut p = payload();
        p.entries.swap(0, 1);
        let e = decode_data(&encode_data(&p).unwrap(), "s")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not sorted"), "{e}");
    }

    #[test]
    fn entries_encode_as_they_did_before_byte_strings() {
        #[derive(Serialize)]
        struct Old {
            cluster: ClusterInfo,
            schemas: Vec<MapSchema>,
            entries: Vec<(Vec<u8>, Vec<u8>)>,
        }
        let p = payload();
        let old = encode(
            &Old {
                cluster: p.cluster.clone(),
                schemas: p.schemas.clone(),
                entries: p.entries.clone(),
            },
            "old",
        )
        .unwrap();
        assert_eq!(encode(&p, "new").unwrap(), old);
    }

    #[test]
    fn data_written_before_checksums_is_still_read() {
        let legacy = encode(&payload(), "p").unwrap();
        assert_eq!(decode_data(&legacy, "s").unwrap().entries.len(), 2);
    }
}
