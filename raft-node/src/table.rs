//! `raftmap status` as a table people read: one row per node, then its watched maps.

use raftmap_node::proto as pb;

/// The `raftmap status` table.
pub fn status_table(rows: &[(String, std::result::Result<pb::StatusResponse, String>)]) -> String {
    let mut s = format!(
        "{:<22} {:<5} {:<9} {:<7} {:>5} {:>9} {:>9} {:>9} {:>9} {:<5}\n",
        "ENDPOINT",
        "ID",
        "ROLE",
        "LEADER",
        "TERM",
        "LAST LOG",
        "COMMIT",
        "APPLIED",
        "SNAPSHOT",
        "READY"
    );
    for (ep, r) in rows {
        match r {
            Ok(st) => s.push_str(&format!(
                "{:<22} {:<5} {:<9} {:<7} {:>5} {:>9} {:>9} {:>9} {:>9} {:<5}\n",
                ep,
                st.node_id,
                st.role,
                if st.has_leader {
                    st.leader_id.to_string()
                } else {
                    "-".into()
                },
                st.term,
                st.last_log_index,
                st.committed_index,
                st.applied_index,
                st.snapshot_index,
                st.ready
            )),
            Err(e) => s.push_str(&format!("{ep:<22} error: {e}\n")),
        }
    }
    for (_, st) in rows
        .iter()
        .filter_map(|(ep, r)| Some((ep, r.as_ref().ok()?)))
    {
        if !st.not_ready_reason.is_empty() {
            s.push_str(&format!(
                "node {} not ready: {}\n",
                st.node_id, st.not_ready_reason
            ));
        }
        if !st.corrupt.is_empty() {
            s.push_str(&format!("node {} CORRUPT: {}\n", st.node_id, st.corrupt));
        }
    }
    let answered: Vec<&pb::StatusResponse> =
        rows.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    if !answered.is_empty() {
        s.push_str(&format!(
            "\n{:<5} {:<40} {:<22} {}\n",
            "NODE", "TLS IDENTITY", "CERT EXPIRES", "CA EXPIRES"
        ));
        for st in answered {
            match &st.tls {
                Some(t) => s.push_str(&format!(
                    "{:<5} {:<40} {:<22} {}\n",
                    st.node_id,
                    t.identity,
                    expiry(t.expires_unix),
                    expiry(t.ca_expires_unix)
                )),
                None => s.push_str(&format!(
                    "{:<5} none: plaintext, unauthenticated (--insecure or loopback)\n",
                    st.node_id
                )),
            }
        }
    }
    let watched: Vec<(u64, &pb::WatchedMap)> = rows
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flat_map(|st| st.watched.iter().map(move |w| (st.node_id, w)))
        .collect();
    if !watched.is_empty() {
        s.push_str(&format!(
            "\n{:<5} {:<16} {:<8} {:>9}  {:<40} STATE\n",
            "NODE", "MAP", "BACKEND", "ENTRIES", "LOCATION"
        ));
        for (node, w) in watched {
            s.push_str(&format!(
                "{node:<5} {:<16} {:<8} {:>9}  {:<40} {}\n",
                w.map, w.backend, w.entries, w.location, w.state
            ));
            if w.refused_changes > 0 {
                s.push_str(&format!(
                    "      {} local changes refused by the cluster and undone; the last: {}\n",
                    w.refused_changes, w.last_refusal
                ));
            }
        }
    }
    s.trim_end().to_string()
}

/// An expiry time as a date and the days left.
fn expiry(unix: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let date = time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| unix.to_string());
    let days = (unix - now) / 86_400;
    if unix < now {
        format!("{date} (EXPIRED)")
    } else {
        format!("{date} ({days}d)")
    }
}
