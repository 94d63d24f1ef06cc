//! State machine behaviour: atomic batches, compare-and-swap, limits, persistence, snapshots.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder};
use raftmap_storage::*;

fn entry(index: u64, batches: Vec<Vec<Op>>) -> Entry {
    Entry {
        log_id: LogId::new(
            LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        ),
        payload: EntryPayload::Normal(Proposal {
            batches: batches
                .into_iter()
                .enumerate()
                .map(|(i, ops)| ClientBatch {
                    origin: 1,
                    seq: index * 100 + i as u64,
                    source: Source::Api,
                    ops,
                })
                .collect(),
            admin: vec![],
        }),
    }
}

fn schema(max_entries: u32) -> MapSchema {
    MapSchema::hash("ct", 2, 2, max_entries)
}

fn put(k: u8, v: u8) -> Op {
    Op::Put {
        map: "ct".into(),
        key: vec![0, k],
        value: vec![0, v],
    }
}

fn dump(view: &StateView) -> Vec<(Vec<u8>, Vec<u8>)> {
    view.scan("ct", None, usize::MAX).unwrap()
}

#[tokio::test]
async fn batches_are_atomic_and_outcomes_are_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm, view) = open(dir.path(), StoreOptions::default(), None).unwrap();
    let res = sm
        .apply_entries(vec![
            entry(1, vec![vec![Op::DeclareMap(schema(3)), put(1, 1)]]),
            entry(
                2,
                vec![
                    // Fails: CAS expects a value key 1 does not hold; its put must not land.
                    vec![
                        put(2, 2),
                        Op::CompareAndSwap {
                            map: "ct".into(),
                            key: vec![0, 1],
                            expected: Some(vec![0, 9]),
                            new: None,
                        },
                    ],
                    // Succeeds, and sees the state left by the batch before it.
                    vec![Op::CompareAndSwap {
                        map: "ct".into(),
                        key: vec![0, 1],
                        expected: Some(vec![0, 1]),
                        new: Some(vec![0, 5]),
                    }],
                    // Rejected: wrong value size.
                    vec![
                        put(3, 3),
                        Op::Put {
                            map: "ct".into(),
                            key: vec![0, 4],
                            value: vec![1],
                        },
                    ],
                    // Rejected: would exceed max_entries (1 present + 3 new > 3).
                    vec![put(6, 6), put(7, 7), put(8, 8)],
                    // Fits: 1 present + 2 new = 3.
                    vec![put(6, 6), put(7, 7)],
                ],
            ),
        ])
        .await
        .unwrap();
    assert_eq!(res[0].outcomes, vec![BatchOutcome::Applied]);
    let o = &res[1].outcomes;
    assert_eq!(
        o[0],
        BatchOutcome::CasFailed {
            mismatches: vec![(1, Some(vec![0, 1]))],
            omitted: 0
        }
    );
    assert_eq!(o[1], BatchOutcome::Applied);
    assert!(matches!(
        &o[2],
        BatchOutcome::Rejected(ValidationError::ValueSize { .. })
    ));
    assert_eq!(
        o[3],
        BatchOutcome::Rejected(ValidationError::MapFull {
            map: "ct".into(),
            max_entries: 3
        })
    );
    assert_eq!(o[4], BatchOutcome::Applied);
    assert_eq!(
        dump(&view),
        vec![
            (vec![0, 1], vec![0, 5]),
            (vec![0, 6], vec![0, 6]),
            (vec![0, 7], vec![0, 7])
        ]
    );
    assert_eq!(view.entry_count("ct"), 3);
    assert_eq!(view.applied_index(), 2);

    // Observers get each entry's effective changes in order, with the batches' origins.
    let events = view.events_since(0).unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].index(), 1);
    match &*events[1] {
        SmEvent::Applied {
            index,
            changes,
            origins,
        } => {
            assert_eq!(*index, 2);
            assert_eq!(changes.len(), 3, "{changes:?}");
            assert_eq!(origins, &vec![(1, 201), (1, 204)]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(view.events_since(1).unwrap().len(), 1);
}

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm, _view) = open(dir.path(), StoreOptions::default(), None).unwrap();
        sm.apply_entries(vec![entry(
            1,
            vec![vec![Op::DeclareMap(schema(10)), put(1, 1), put(2, 2)]],
        )])
        .await
        .unwrap();
        sm.apply_entries(vec![entry(
            2,
            vec![vec![Op::Delete {
                map: "ct".into(),
                key: vec![0, 1],
            }]],
        )])
        .await
        .unwrap();
    }
    let (_log, mut sm, view) = open(dir.path(), StoreOptions::default(), None).unwrap();
    assert_eq!(view.applied_index(), 2);
    assert_eq!(view.schema("ct"), Some(schema(10)));
    assert_eq!(view.entry_count("ct"), 1);
    assert_eq!(dump(&view), vec![(vec![0, 2], vec![0, 2])]);
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(2));
}

/// A store at `dir` holding map ct with two entries (one log entry), and its snapshot.
async fn with_two_entries_and_a_snapshot(
    dir: &std::path::Path,
) -> (LogStore, StateMachine, StateView, Snapshot) {
    let (log, mut sm, view) = open(dir, StoreOptions::default(), None).unwrap();
    sm.apply_entries(vec![entry(
        1,
        vec![vec![Op::DeclareMap(schema(10)), put(1, 1), put(2, 2)]],
    )])
    .await
    .unwrap();
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    (log, sm, view, snap)
}

#[tokio::test]
async fn snapshot_replaces_the_state_of_another_node() {
    let a_dir = tempfile::tempdir().unwrap();
    let (_la, _a, _va, snap) = with_two_entries_and_a_snapshot(a_dir.path()).await;
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(1));

    // B holds a stale, different state.
    let b_dir = tempfile::tempdir().unwrap();
    let (_lb, mut b, vb) = open(b_dir.path(), StoreOptions::default(), None).unwrap();
    b.apply_entries(vec![entry(
        1,
        vec![vec![Op::DeclareMap(schema(10)), put(9, 9)]],
    )])
    .await
    .unwrap();
    assert_eq!(vb.last_snapshot_installed(), 0);
    b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(
        dump(&vb),
        vec![(vec![0, 1], vec![0, 1]), (vec![0, 2], vec![0, 2])]
    );
    assert_eq!(vb.entry_count("ct"), 2);
    // Watchers behind the snapshot learn that it replaced the state.
    assert_eq!(vb.last_snapshot_installed(), 1);
    assert!(vb.events_since(0).is_none());
    // The installed snapshot is B's current one, and survives a restart.
    let current = b.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);
    drop((b, vb, _lb));
    let (_lb, _b, vb) = open(b_dir.path(), StoreOptions::default(), None).unwrap();
    assert_eq!(vb.applied_index(), 1);
    assert_eq!(vb.entry_count("ct"), 2);
}

/// The write-ahead log files of a store, largest first.
fn wal_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> = std::fs::read_dir(dir.join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).unwrap().len()));
    logs
}

#[tokio::test]
async fn a_corrupt_record_in_the_middle_of_the_wal_refuses_the_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm, _view) = open(dir.path(), StoreOptions::default(), None).unwrap();
        sm.apply_entries(vec![entry(1, vec![vec![Op::DeclareMap(schema(1000))]])])
            .await
            .unwrap();
        for i in 0..200u64 {
            sm.apply_entries(vec![entry(i + 2, vec![vec![put(i as u8, i as u8)]])])
                .await
                .unwrap();
        }
    }
    let wal = wal_files(dir.path()).remove(0);
    let mut bytes = std::fs::read(&wal).unwrap();
    assert!(
        bytes.len() > 4096,
        "the entries are in the WAL: {}",
        bytes.len()
    );
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&wal, bytes).unwrap();
    let err = open(dir.path(), StoreOptions::default(), None)
        .expect_err("a store with a corrupt WAL record opened");
    let msg = err.to_string();
    let name = wal.file_name().unwrap().to_string_lossy().to_string();
    assert!(msg.contains("Corruption"), "{msg}");
    assert!(
        msg.contains(&name),
        "the error names the WAL file {name}: {msg}"
    );
}

#[tokio::test]
async fn a_corrupt_snapshot_file_is_never_used_and_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm, view, built) = with_two_entries_and_a_snapshot(dir.path()).await;
    // One byte of a value flipped on disk.
    let path = dir.path().join("snapshot.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 1;
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);
    assert_eq!(
        current.snapshot.get_ref(),
        built.snapshot.get_ref(),
        "the snapshot handed out is the state, not the corrupt file"
    );
    // The rebuilt file is sound again, and installs on another node.
    assert_ne!(std::fs::read(&path).unwrap(), bytes);
    let b_dir = tempfile::tempdir().unwrap();
    let (_lb, mut b, vb) = open(b_dir.path(), StoreOptions::default(), None).unwrap();
    b.install_snapshot(&current.meta, current.snapshot)
        .await
        .unwrap();
    assert_eq!(dump(&vb), dump(&view));
    // Corrupt data received is refused before anything of it is installed.
    let mut bad = built.snapshot.into_inner();
    let at = bad.len() - 1;
    bad[at] ^= 1;
    let err = check_snapshot_data(&bad).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
}

/// Operation `i` of a mix of puts, overwrites, deletes and failing compare-and-swaps on 97 keys.
fn mixed_op(i: u64) -> Op {
    let k = (i % 97) as u8;
    match i % 5 {
        0 => Op::Delete {
            map: "ct".into(),
            key: vec![0, k],
        },
        1 => Op::CompareAndSwap {
            map: "ct".into(),
            key: vec![0, k],
            expected: Some(vec![9, 9]),
            new: None,
        },
        _ => put(k, i as u8),
    }
}

#[tokio::test]
async fn the_kept_digest_matches_the_disk_until_a_value_rots() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm, view) = open(dir.path(), StoreOptions::default(), None).unwrap();
        sm.apply_entries(vec![entry(1, vec![vec![Op::DeclareMap(schema(1000))]])])
            .await
            .unwrap();
        // Puts, overwrites, deletes and a failed CAS, one entry each, past a checkpoint.
        for i in 2..=1001u64 {
            sm.apply_entries(vec![entry(i, vec![vec![mixed_op(i)]])])
                .await
                .unwrap();
        }
        let v = view.verify_disk().unwrap();
        assert!(v.matches(), "{v:?}");
        assert_eq!(v.applied, 1001);
        assert_eq!(view.checkpoints(), vec![(1000, view.checkpoints()[0].1)]);
        // A replica that applied the same entries in one call agrees at the checkpoint.
        let other = tempfile::tempdir().unwrap();
        let (_l2, mut sm2, view2) = open(other.path(), StoreOptions::default(), None).unwrap();
        let mut all = vec![entry(1, vec![vec![Op::DeclareMap(schema(1000))]])];
        for i in 2..=1001u64 {
            all.push(entry(i, vec![vec![mixed_op(i)]]));
        }
        sm2.apply_entries(all).await.unwrap();
        assert_eq!(view2.checkpoints(), view.checkpoints());
    }
    // One value changed on disk behind the state machine's back.
    {
        let names = ["default", "log", "meta", "sm_meta", "sm_data"];
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path().join("db"), names)
            .unwrap();
        let cf = db.cf_handle("sm_data").unwrap();
        let (k, mut v) = db
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .next()
            .unwrap()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .unwrap();
        v[0] ^= 1;
        db.put_cf(cf, k, v).unwrap();
    }
    let (_log, _sm, view) = open(dir.path(), StoreOptions::default(), None).unwrap();
    let v = view.verify_disk().unwrap();
    assert!(!v.matches(), "a rotten value went unnoticed: {v:?}");
}

#[tokio::test]
async fn a_dropped_map_is_gone_whole_and_can_be_declared_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm, view) = open(dir.path(), StoreOptions::default(), None).unwrap();
    let other = MapSchema::hash("other", 2, 2, 10);
    sm.apply_entries(vec![entry(
        1,
        vec![vec![
            Op::DeclareMap(schema(10)),
            Op::DeclareMap(other.clone()),
            put(1, 1),
            put(2, 2),
            Op::Put {
                map: "other".into(),
                key: vec![0, 1],
                value: vec![5, 5],
            },
        ]],
    )])
    .await
    .unwrap();
    let drop_ct = || Op::DropMap { map: "ct".into() };
    // Not alone in its batch: refused, nothing changes.
    let res = sm
        .apply_entries(vec![entry(2, vec![vec![drop_ct(), put(3, 3)]])])
        .await
        .unwrap();
    assert!(matches!(
        res[0].outcomes[0],
        BatchOutcome::Rejected(ValidationError::DropNotAlone(_))
    ));
    assert_eq!(dump(&view).len(), 2);
    // In one apply call: a put, the drop, the map declared again with another schema, a put.
    let again = MapSchema::hash("ct", 2, 4, 10);
    let res = sm
        .apply_entries(vec![
            entry(3, vec![vec![put(4, 4)]]),
            entry(4, vec![vec![drop_ct()]]),
            entry(
                5,
                vec![vec![
                    Op::DeclareMap(again.clone()),
                    Op::Put {
                        map: "ct".into(),
                        key: vec![0, 9],
                        value: vec![9; 4],
                    },
                ]],
            ),
        ])
        .await
        .unwrap();
    assert!(res
        .iter()
        .all(|r| r.outcomes == vec![BatchOutcome::Applied]));
    assert_eq!(dump(&view), vec![(vec![0, 9], vec![9; 4])]);
    assert_eq!(view.schema("ct"), Some(again));
    assert_eq!(view.entry_count("ct"), 1);
    assert_eq!(view.entry_count("other"), 1);
    assert!(view.verify_disk().unwrap().matches());
    // Dropped for good, across a restart.
    sm.apply_entries(vec![entry(6, vec![vec![drop_ct()]])])
        .await
        .unwrap();
    drop((sm, view, _log));
    let (_log, _sm, view) = open(dir.path(), StoreOptions::default(), None).unwrap();
    assert_eq!(view.schema("ct"), None);
    assert!(dump(&view).is_empty());
    assert_eq!(view.schema("other"), Some(other));
    assert!(view.verify_disk().unwrap().matches());
}

#[tokio::test]
async fn a_cluster_holds_at_most_max_maps() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm, view) = open(dir.path(), StoreOptions::default(), None).unwrap();
    let declare = |i: usize| Op::DeclareMap(MapSchema::hash(&format!("m{i}"), 2, 2, 10));
    let res = sm
        .apply_entries(vec![entry(1, vec![(0..MAX_MAPS).map(declare).collect()])])
        .await
        .unwrap();
    assert_eq!(res[0].outcomes, vec![BatchOutcome::Applied]);
    let res = sm
        .apply_entries(vec![entry(2, vec![vec![declare(MAX_MAPS)]])])
        .await
        .unwrap();
    assert!(matches!(
        &res[0].outcomes[0],
        BatchOutcome::Rejected(ValidationError::TooManyMaps { limit, .. }) if *limit == MAX_MAPS
    ));
    assert_eq!(view.schemas().len(), MAX_MAPS);
}

#[tokio::test]
async fn a_write_that_would_eat_the_disk_reserve_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm, _view) = open(dir.path(), StoreOptions::default(), None).unwrap();
        sm.apply_entries(vec![entry(
            1,
            vec![vec![Op::DeclareMap(schema(10)), put(1, 1)]],
        )])
        .await
        .unwrap();
    }
    // A reserve no filesystem has: every write finds the disk "full".
    let opts = StoreOptions {
        min_free_bytes: u64::MAX,
        ..StoreOptions::default()
    };
    let (log, mut sm, view) = open(dir.path(), opts, None).unwrap();
    let err = sm
        .apply_entries(vec![entry(2, vec![vec![put(2, 2)]])])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bytes free, under the"), "{err}");
    assert_eq!(view.applied_index(), 1);
    drop((log, sm, view));
    let (_log, _sm, view) = open(dir.path(), StoreOptions::default(), None).unwrap();
    assert_eq!(view.applied_index(), 1);
    assert_eq!(dump(&view), vec![(vec![0, 1], vec![0, 1])]);
}
