//! The scan's and the reconciliation's comparisons of a kernel map with the shadow.

use foldhash::{HashMap, HashSet};
use raftmap_ebpf_hooks::KernelChange;

use super::MapState;

/// How a map seen for the first time by this run of the daemon relates to the committed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::kernel) enum Sighting {
    /// Never seen on this node: adopt it.
    New,
    /// The map this node last ran with: three-way merge.
    Outlived,
    /// Recreated since (or the changes held for it overflowed): fill it from the log.
    Recreated,
}

/// What reconciling a map decided: local changes to propose and writes to make.
#[derive(Debug, Default)]
pub(in crate::kernel) struct Merge {
    pub propose: Vec<KernelChange>,
    pub write: Vec<KernelChange>,
}

impl MapState {
    // ---- scan ----

    /// A scan starts reading the kernel map; returns the keys to propose again whatever the
    /// kernel holds.
    pub(in crate::kernel) fn begin_scan(&mut self) -> HashSet<Vec<u8>> {
        self.scanning = true;
        self.touched.clear();
        self.retry.clone()
    }

    /// The scan could not read the map.
    pub(in crate::kernel) fn abort_scan(&mut self) {
        self.scanning = false;
    }

    /// Compares walked kernel entries with the shadow: differing ones (and ones to propose
    /// again) go to `differ`; returns how many of them the shadow knows.
    pub(in crate::kernel) fn compare<'k>(
        &self,
        entries: impl Iterator<Item = (&'k [u8], &'k [u8])>,
        retry: &mut HashSet<Vec<u8>>,
        differ: &mut Vec<KernelChange>,
    ) -> usize {
        let mut found = 0;
        for (k, v) in entries {
            let known = self.shadow.get(k);
            found += usize::from(known.is_some());
            // A proposal to try again: whatever the kernel holds now.
            let again = !retry.is_empty() && retry.remove(k);
            if known.map(Vec::as_slice) != Some(v) || again {
                differ.push(KernelChange {
                    key: k.to_vec(),
                    value: Some(v.to_vec()),
                });
            }
        }
        found
    }

    /// Whether this scan must look for entries gone from the kernel. Every key the shadow gained
    /// while the walk ran is in `touched`, so a shadow larger than the keys found plus the
    /// touched ones certainly lost some to the kernel; otherwise every tenth scan looks
    /// regardless (a busy map always has touched keys that could hide a deletion).
    pub(in crate::kernel) fn must_look_for_deletes(&self, found: usize) -> bool {
        self.shadow.len() > found + self.touched.len() || (self.scans + 1) % 10 == 0
    }

    /// Ends a scan: adds the deletions (keys of the shadow not in `kernel_keys`, when looked
    /// for) and the retries of keys now absent, drops keys touched meanwhile, and orders
    /// deletes first (a full map that lost one key and gained another between two scans must
    /// not see the new key before the room for it). The result is what to capture.
    pub(in crate::kernel) fn end_scan(
        &mut self,
        mut differ: Vec<KernelChange>,
        kernel_keys: Option<&HashSet<&[u8]>>,
        retry: HashSet<Vec<u8>>,
    ) -> Vec<KernelChange> {
        self.scanning = false;
        let touched = std::mem::take(&mut self.touched);
        self.scans += 1;
        if let Some(kernel_keys) = kernel_keys {
            differ.extend(
                self.shadow
                    .keys()
                    .filter(|k| !kernel_keys.contains(k.as_slice()))
                    .map(|k| KernelChange {
                        key: k.to_vec(),
                        value: None,
                    }),
            );
        }
        // Proposals to try again for keys now absent from the kernel: a delete (unless the
        // deletion pass above found it already).
        if !retry.is_empty() {
            let listed: HashSet<&[u8]> = differ.iter().map(|c| c.key.as_slice()).collect();
            let absent: Vec<Vec<u8>> = retry
                .into_iter()
                .filter(|k| !listed.contains(k.as_slice()))
                .collect();
            differ.extend(
                absent
                    .into_iter()
                    .map(|key| KernelChange { key, value: None }),
            );
        }
        differ.retain(|c| !touched.contains(&c.key));
        differ.sort_by(|a, b| (a.value.is_some(), &a.key).cmp(&(b.value.is_some(), &b.key)));
        differ
    }

    // ---- reconcile ----

    /// Starts over from the committed contents: no marks, no retries, the shadow is `committed`.
    pub(in crate::kernel) fn reset(&mut self, committed: HashMap<Vec<u8>, Vec<u8>>) {
        self.pending.clear();
        self.committed_while_pending.clear();
        self.commits.clear();
        self.retry.clear();
        self.alone.clear();
        self.touched.clear();
        self.scanning = false;
        self.shadow = raftmap_ebpf_hooks::shadow_from(committed);
    }

    /// Reconciles a kernel map with the committed contents (the shadow, after [`Self::reset`]):
    /// what to propose and what to write.
    ///
    /// - **New**: adopt. Entries only the kernel has (or holds with another value) are
    ///   proposed; committed entries it lacks are written. Nothing is deleted on either side.
    /// - **Outlived** (the map this node last ran with): a three-way merge. Base: the committed
    ///   contents when the daemon started (`base`, or the shadow without one); the kernel now;
    ///   the log since (`logged`). A key whose kernel value differs from the base and is none
    ///   the log gave it since was changed while the daemon was down: propose it. Every other
    ///   key takes the committed value.
    /// - **Recreated**: fill it from the committed state by diff, never clearing it first.
    pub(in crate::kernel) fn merge(
        &self,
        sighting: Sighting,
        base: Option<&HashMap<Vec<u8>, Vec<u8>>>,
        kernel: &HashMap<Vec<u8>, Vec<u8>>,
        logged: &HashMap<Vec<u8>, Vec<Option<Vec<u8>>>>,
    ) -> Merge {
        use raftmap_ebpf_hooks::diff;
        match sighting {
            Sighting::Outlived => {
                let since_base = match base {
                    Some(base) => diff(base, kernel),
                    None => diff(&self.shadow, kernel),
                };
                let propose: Vec<_> = since_base
                    .into_iter()
                    .filter(|c| !logged.get(&c.key).is_some_and(|v| v.contains(&c.value)))
                    .collect();
                let local: HashSet<&[u8]> = propose.iter().map(|c| c.key.as_slice()).collect();
                let write: Vec<_> = diff(kernel, &self.shadow)
                    .into_iter()
                    .filter(|c| !local.contains(c.key.as_slice()))
                    .collect();
                Merge { propose, write }
            }
            Sighting::Recreated => Merge {
                propose: Vec::new(),
                write: diff(kernel, &self.shadow),
            },
            Sighting::New => {
                let (propose, theirs): (Vec<_>, Vec<_>) = diff(&self.shadow, kernel)
                    .into_iter()
                    .partition(|c| c.value.is_some());
                let write = theirs
                    .into_iter()
                    .map(|c| KernelChange {
                        value: self.shadow.get(c.key.as_slice()).cloned(),
                        key: c.key,
                    })
                    .collect();
                Merge { propose, write }
            }
        }
    }
}
