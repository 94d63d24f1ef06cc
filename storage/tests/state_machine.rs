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
    let mut events = view.subscribe();
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
    assert_eq!(o[0], BatchOutcome::CasFailed(vec![(1, Some(vec![0, 1]))]));
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
    let first = events.recv().await.unwrap();
    assert_eq!(first.index(), 1);
    let second = events.recv().await.unwrap();
    match &*second {
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

#[tokio::test]
async fn snapshot_replaces_the_state_of_another_node() {
    let a_dir = tempfile::tempdir().unwrap();
    let (_la, mut a, _va) = open(a_dir.path(), StoreOptions::default(), None).unwrap();
    a.apply_entries(vec![entry(
        1,
        vec![vec![Op::DeclareMap(schema(10)), put(1, 1), put(2, 2)]],
    )])
    .await
    .unwrap();
    let snap = a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
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
    let mut events = vb.subscribe();
    b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(
        dump(&vb),
        vec![(vec![0, 1], vec![0, 1]), (vec![0, 2], vec![0, 2])]
    );
    assert_eq!(vb.entry_count("ct"), 2);
    assert_eq!(
        *events.recv().await.unwrap(),
        SmEvent::SnapshotInstalled { index: 1 }
    );
    // The installed snapshot is B's current one, and survives a restart.
    let current = b.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);
    drop((b, vb, _lb));
    let (_lb, _b, vb) = open(b_dir.path(), StoreOptions::default(), None).unwrap();
    assert_eq!(vb.applied_index(), 1);
    assert_eq!(vb.entry_count("ct"), 2);
}
