//! The nemesis's schedule: faults begin and end on time, at most two at once.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use rand::rngs::StdRng;

use super::shapes::grudges;
use super::{Active, Fault, FaultWindow, Members, Nemesis, NodeId, NodeSetup, Shape, MAX_OVERLAP};
use crate::cluster::LocalCluster;
use crate::error::RunError;

impl<'a> Nemesis<'a> {
    pub fn new(
        cluster: &'a mut LocalCluster,
        members: &'a Members,
        setup: &'a dyn NodeSetup,
        faults: &[Fault],
        seed: u64,
        start: Instant,
    ) -> Self {
        let ids = cluster.ids();
        Self {
            next_id: ids.iter().max().copied().unwrap_or(0) + 1,
            cluster,
            members,
            setup,
            faults: faults.to_vec(),
            rng: StdRng::seed_from_u64(seed),
            start,
            active: Vec::new(),
            log: Vec::new(),
            unsure: Vec::new(),
        }
    }

    pub(super) fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Injects faults until `deadline`, then ends every fault still in effect; returns what
    /// happened.
    pub async fn run(mut self, deadline: Instant) -> Result<Vec<FaultWindow>, RunError> {
        // No new fault this close to the end: the cluster heals before the final reads.
        let last_start = deadline.checked_sub(Duration::from_millis(1500));
        let mut next_start = Instant::now() + self.quiet();
        while !self.faults.is_empty() {
            let now = Instant::now();
            self.end_due()?;
            if last_start.is_none_or(|l| now >= l) {
                break;
            }
            if now >= next_start && self.active.len() < MAX_OVERLAP {
                self.begin().await?;
                next_start = Instant::now() + self.quiet();
            }
            let wake = self
                .active
                .iter()
                .map(|a| a.until)
                .chain([next_start, deadline])
                .min()
                .unwrap_or(deadline);
            tokio::time::sleep_until(wake.max(Instant::now() + Duration::from_millis(5)).into())
                .await;
        }
        for a in std::mem::take(&mut self.active) {
            self.end(a)?;
        }
        tokio::time::sleep_until(deadline.into()).await;
        // Removals left in doubt: the healed cluster says whether they happened.
        let mut unsure = std::mem::take(&mut self.unsure);
        unsure.sort_unstable();
        unsure.dedup();
        // (A later request may have removed it for certain.)
        unsure.retain(|v| self.members.ids().contains(v));
        for victim in unsure {
            let start = self.now();
            if self.is_member(victim, Duration::from_secs(10)).await == Some(false) {
                self.forget(victim)?;
                self.log.push(FaultWindow {
                    fault: Fault::Membership,
                    what: format!(
                        "membership remove n{victim} (unanswered earlier; found removed)"
                    ),
                    start,
                    end: self.now(),
                    error: None,
                });
            }
        }
        Ok(self.log)
    }

    /// Ends the faults whose time is up.
    pub(super) fn end_due(&mut self) -> Result<(), RunError> {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].until <= now)
            .collect();
        for i in due.into_iter().rev() {
            let a = self.active.remove(i);
            self.end(a)?;
        }
        Ok(())
    }

    /// Awaits `work` (which must not hold the cluster) while ending the other faults on time:
    /// a membership change takes seconds, and a kill meant to last a second must not last them.
    pub(super) async fn meanwhile<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, RunError> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => return Ok(r),
                _ = tokio::time::sleep(Duration::from_millis(50)) => self.end_due()?,
            }
        }
    }

    /// A node out of the cluster: stop it, and send no more work its way.
    pub(super) fn forget(&mut self, id: NodeId) -> Result<(), RunError> {
        self.members.remove(id);
        self.setup.removed(id);
        self.cluster.kill(id)?;
        Ok(())
    }

    pub(super) fn quiet(&mut self) -> Duration {
        Duration::from_millis(self.rng.gen_range(200..1000))
    }

    /// The nodes a kill or pause may take: current members not under a kill or pause already.
    pub(super) fn free_nodes(&self) -> Vec<NodeId> {
        let busy: Vec<NodeId> = self
            .active
            .iter()
            .filter(|a| matches!(a.fault, Fault::Kill | Fault::Pause))
            .flat_map(|a| a.nodes.iter().copied())
            .collect();
        self.members
            .ids()
            .into_iter()
            .filter(|i| !busy.contains(i))
            .collect()
    }

    /// Starts one fault of a kind not already in effect.
    pub(super) async fn begin(&mut self) -> Result<(), RunError> {
        let kinds: Vec<Fault> = self
            .faults
            .iter()
            .copied()
            .filter(|f| self.active.iter().all(|a| a.fault != *f))
            .collect();
        // The kind used least so far (ties drawn at random): every kind asked for comes up
        // even in a short run.
        let used = |f: Fault| {
            self.log.iter().filter(|w| w.fault == f).count()
                + self.active.iter().filter(|a| a.fault == f).count()
        };
        let Some(least) = kinds.iter().map(|f| used(*f)).min() else {
            return Ok(());
        };
        let kinds: Vec<Fault> = kinds.into_iter().filter(|f| used(*f) == least).collect();
        let fault = kinds[self.rng.gen_range(0..kinds.len())];
        let hold = Duration::from_millis(self.rng.gen_range(300..1200));
        let start = self.now();
        let (what, nodes) = match fault {
            Fault::Kill | Fault::Pause => {
                let free = self.free_nodes();
                if free.is_empty() {
                    return Ok(());
                }
                let node = free[self.rng.gen_range(0..free.len())];
                if fault == Fault::Kill {
                    self.cluster.kill(node)?;
                    (format!("kill n{node}"), vec![node])
                } else {
                    self.cluster.pause(node)?;
                    (format!("pause n{node}"), vec![node])
                }
            }
            Fault::Partition => {
                let ids = self.members.ids();
                let shapes: &[Shape] = if ids.len() >= 4 {
                    &[
                        Shape::Halves,
                        Shape::LeaderAlone,
                        Shape::LeaderInMinority,
                        Shape::Bridge,
                        Shape::Ring,
                    ]
                } else {
                    // With three nodes a ring is no cut at all and a minority is one node.
                    &[Shape::Halves, Shape::LeaderAlone, Shape::Bridge]
                };
                let shape = shapes[self.rng.gen_range(0..shapes.len())];
                let leader = match shape {
                    Shape::LeaderAlone | Shape::LeaderInMinority => self.cluster.leader(&ids).await,
                    _ => None,
                };
                let (g, what) = grudges(shape, &ids, leader, &mut self.rng);
                self.cluster.cut(&g)?;
                (what, Vec::new())
            }
            Fault::Membership => {
                let (what, error) = self.change_membership().await?;
                let end = self.now();
                self.log.push(FaultWindow {
                    fault,
                    what,
                    start,
                    end,
                    error,
                });
                return Ok(());
            }
        };
        self.active.push(Active {
            fault,
            what,
            nodes,
            start,
            until: Instant::now() + hold,
        });
        Ok(())
    }

    /// Ends a fault: restart, resume or heal.
    pub(super) fn end(&mut self, a: Active) -> Result<(), RunError> {
        match a.fault {
            Fault::Kill => {
                for &n in &a.nodes {
                    self.cluster.restart(n)?;
                }
            }
            Fault::Pause => {
                for &n in &a.nodes {
                    self.cluster.resume(n)?;
                }
            }
            Fault::Partition => self.cluster.heal()?,
            Fault::Membership => {}
        }
        let end = self.now();
        self.log.push(FaultWindow {
            fault: a.fault,
            what: a.what,
            start: a.start,
            end,
            error: None,
        });
        Ok(())
    }
}
