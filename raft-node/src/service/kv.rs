//! The `Kv` service: client writes (group commit), reads, dumps and watches.

use std::sync::Arc;

use raftmap_proto as pb;
use raftmap_storage::{
    validate_batch, BatchOutcome, Change, MapSchema, SmEvent, Source, StateView, ValidationError,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{BoxStream, GrpcResult, DUMP_PAGE, PAGE_BYTES};
use crate::error::NodeError;
use crate::shared::NodeShared;
use crate::wire::{op_from_pb, schema_to_pb};

/// How long a write waits, after it committed, to be applied on the node that took it.
const WRITE_VISIBLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct KvService {
    shared: Arc<NodeShared>,
}

impl KvService {
    pub(crate) fn new(shared: Arc<NodeShared>) -> Self {
        Self { shared }
    }

    async fn barrier(&self, c: i32) -> Result<u64, NodeError> {
        match pb::Consistency::try_from(c) {
            // Deliberately broken mode for the fault-injection harness's own test.
            Ok(pb::Consistency::Linearizable) if self.shared.unsafe_local_reads => {
                Ok(self.shared.view.applied_index())
            }
            Ok(pb::Consistency::Linearizable) => self.shared.read_barrier().await,
            Ok(pb::Consistency::Local) => Ok(self.shared.view.applied_index()),
            Err(_) => Err(NodeError::BadRequest(format!("unknown consistency {c}"))),
        }
    }

    fn schema(&self, map: &str) -> Result<MapSchema, NodeError> {
        self.shared.view.schema(map).ok_or_else(|| {
            NodeError::NotFound(ValidationError::UnknownMap(map.to_string()).to_string())
        })
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn write(&self, req: Request<pb::WriteRequest>) -> GrpcResult<pb::WriteResponse> {
        let ops = req
            .into_inner()
            .ops
            .into_iter()
            .map(op_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        // Refuse what is already known to be invalid before it reaches the log. The state
        // machine checks again at apply time, against the state at that index.
        let schemas = self.shared.view.schema_map();
        if let Err(e) = validate_batch(&ops, &schemas) {
            self.shared.metrics.rejected_batches.inc();
            return Err(NodeError::Invalid(e).into());
        }
        let out = self.shared.batcher.submit(ops, Source::Api).await?;
        // Read your writes on the node that took the write: a follower returns once it has
        // applied the entry itself, not only when the leader has.
        if !self
            .shared
            .view
            .wait_applied(out.index, WRITE_VISIBLE_WAIT)
            .await
        {
            return Err(NodeError::Timeout(format!(
                "entry {} committed but not applied on this node within {WRITE_VISIBLE_WAIT:?}",
                out.index
            ))
            .into());
        }
        match out.outcome {
            BatchOutcome::Applied => Ok(Response::new(pb::WriteResponse {
                index: out.index,
                succeeded: true,
                mismatches: vec![],
                mismatches_omitted: 0,
            })),
            BatchOutcome::CasFailed {
                mismatches,
                omitted,
            } => Ok(Response::new(pb::WriteResponse {
                index: out.index,
                succeeded: false,
                mismatches: mismatches
                    .into_iter()
                    .map(|(op_index, actual)| pb::CasMismatch { op_index, actual })
                    .collect(),
                mismatches_omitted: omitted,
            })),
            BatchOutcome::Rejected(e) => Err(NodeError::Invalid(e).into()),
        }
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> GrpcResult<pb::GetResponse> {
        let r = req.into_inner();
        let index = self.barrier(r.consistency).await?;
        let schema = self.schema(&r.map)?;
        if r.key.len() != schema.key_size as usize {
            return Err(NodeError::Invalid(ValidationError::KeySize {
                map: r.map,
                expected: schema.key_size,
                actual: r.key.len(),
            })
            .into());
        }
        let v = self
            .shared
            .view
            .get(&r.map, &r.key)
            .map_err(NodeError::from)?;
        Ok(Response::new(pb::GetResponse {
            found: v.is_some(),
            value: v.unwrap_or_default(),
            index: index.max(self.shared.view.applied_index()),
        }))
    }

    type DumpStream = BoxStream<pb::DumpResponse>;

    async fn dump(&self, req: Request<pb::DumpRequest>) -> GrpcResult<Self::DumpStream> {
        let r = req.into_inner();
        self.barrier(r.consistency).await?;
        let schema = self.schema(&r.map)?;
        let page = match r.page_size as usize {
            0 => DUMP_PAGE,
            n => n.min(DUMP_PAGE * 10),
        };
        let view = self.shared.view.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            // Pages are read one by one; the applied index reported is the one at the start.
            let index = view.applied_index();
            let mut after: Option<Vec<u8>> = None;
            let mut first = true;
            loop {
                let (entries, more) =
                    match view.scan_page(&schema.name, after.as_deref(), page, PAGE_BYTES) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                            return;
                        }
                    };
                let done = !more;
                after = entries.last().map(|(k, _)| k.clone());
                let msg = pb::DumpResponse {
                    schema: first.then(|| schema_to_pb(&schema)),
                    index,
                    entries: entries
                        .into_iter()
                        .map(|(key, value)| pb::Entry { key, value })
                        .collect(),
                };
                first = false;
                if tx.send(Ok(msg)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_maps(
        &self,
        _req: Request<pb::ListMapsRequest>,
    ) -> GrpcResult<pb::ListMapsResponse> {
        let view = &self.shared.view;
        Ok(Response::new(pb::ListMapsResponse {
            maps: view
                .schemas()
                .iter()
                .map(|s| pb::MapInfo {
                    schema: Some(schema_to_pb(s)),
                    entries: view.entry_count(&s.name),
                })
                .collect(),
            index: view.applied_index(),
        }))
    }

    type WatchStream = BoxStream<pb::WatchEvent>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> GrpcResult<Self::WatchStream> {
        let r = req.into_inner();
        // A map declared anywhere before the call is known here after the barrier.
        if self.shared.view.schema(&r.map).is_none() {
            self.shared.read_barrier().await?;
        }
        let schema = self.schema(&r.map)?;
        let Ok(permit) = self.shared.watchers.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "node {} already serves its most watch streams ({}); retry later or watch through another node",
                self.shared.id,
                self.shared.max_watchers
            )));
        };
        let view = self.shared.view.clone();
        if r.after_index > 0 && view.events_since(r.after_index).is_none() {
            return Err(Status::out_of_range(format!(
                "changes after index {} are no longer held; watch from 0 to start with the current contents",
                r.after_index
            )));
        }
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(async move {
            // Held for as long as the stream is served.
            let _permit = permit;
            watch_stream(view, schema.name, r.after_index, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Watch events queued for one client; with the pages and the held entries of the state
/// machine this bounds what a watcher that does not read costs.
const WATCH_QUEUE: usize = 64;

type WatchTx = mpsc::Sender<Result<pb::WatchEvent, Status>>;

/// Serves one watch stream: the map's contents (from index 0) or the changes after
/// `after_index`, then every change as it is applied, until the client goes away. Changes come
/// from the state machine's held entries, so a watcher that falls behind catches up from them
/// or, once they are gone, is told to watch again.
async fn watch_stream(view: StateView, map: String, after_index: u64, tx: WatchTx) {
    let mut sent = after_index;
    if after_index == 0 {
        // The contents page by page (bounded in bytes); changes applied meanwhile are in the
        // held entries after `sent` and follow.
        sent = view.applied_index();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (page, more) = match view.scan_page(&map, after.as_deref(), DUMP_PAGE, PAGE_BYTES) {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
            };
            after = page.last().map(|(k, _)| k.clone());
            for (key, value) in page {
                let put = pb::watch_event::Event::Put(pb::Put {
                    map: map.clone(),
                    key,
                    value,
                });
                if !send_watch(&tx, sent, put).await {
                    return;
                }
            }
            if !more {
                break;
            }
        }
    }
    loop {
        let Some(events) = view.events_since(sent) else {
            let status = if view.last_snapshot_installed() > sent {
                Status::aborted(format!(
                    "this node installed a snapshot at index {}; watch again from 0",
                    view.last_snapshot_installed()
                ))
            } else {
                Status::data_loss(format!(
                    "the watcher fell behind: changes after index {sent} are no longer held; watch again from 0"
                ))
            };
            let _ = tx.send(Err(status)).await;
            return;
        };
        for ev in events {
            if let SmEvent::Applied { index, changes, .. } = &*ev {
                for c in changes {
                    let event = match c {
                        Change::Put { map: m, key, value } if *m == map => {
                            pb::watch_event::Event::Put(pb::Put {
                                map: m.clone(),
                                key: key.clone(),
                                value: value.clone(),
                            })
                        }
                        Change::Delete { map: m, key } if *m == map => {
                            pb::watch_event::Event::Delete(pb::Delete {
                                map: m.clone(),
                                key: key.clone(),
                            })
                        }
                        Change::Drop(m) if *m == map => {
                            let _ = tx
                                .send(Err(Status::not_found(format!(
                                    "map {map} was dropped at index {index}"
                                ))))
                                .await;
                            return;
                        }
                        _ => continue,
                    };
                    if !send_watch(&tx, *index, event).await {
                        return;
                    }
                }
            }
            sent = ev.index();
        }
        tokio::select! {
            // A client that went away ends the stream even while nothing is applied.
            _ = tx.closed() => return,
            more = view.wait_past(sent) => if !more { return },
        }
    }
}

/// Sends one watch event; false once the client is gone.
async fn send_watch(tx: &WatchTx, index: u64, event: pb::watch_event::Event) -> bool {
    tx.send(Ok(pb::WatchEvent {
        index,
        event: Some(event),
    }))
    .await
    .is_ok()
}
