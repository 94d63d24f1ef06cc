//! A self-contained SVG of operation latency over time, with the fault windows shaded: the
//! picture Jepsen draws to show what faults did to clients.

use std::collections::HashMap;
use std::fmt::Write;

use crate::history::{Event, EventType};
use crate::run::Fault;

const W: f64 = 1000.0;
const H: f64 = 420.0;
const LEFT: f64 = 60.0;
const BOTTOM: f64 = 40.0;
const TOP: f64 = 30.0;

/// Latency (completion minus invocation) of every operation against its completion time, green
/// for ok, red for fail, orange for unknown; fault windows as grey bands with their names.
pub fn latency_svg(history: &[Event], faults: &[(Fault, u64, u64, u64)]) -> String {
    let mut open: HashMap<u64, u64> = HashMap::new();
    let mut points: Vec<(f64, f64, &str)> = Vec::new();
    for e in history {
        match e.kind {
            EventType::Invoke => {
                open.insert(e.process, e.time);
            }
            kind => {
                if let Some(start) = open.remove(&e.process) {
                    let color = match kind {
                        EventType::Ok => "#2a9d4b",
                        EventType::Fail => "#d62828",
                        _ => "#f4a261",
                    };
                    points.push((e.time as f64 / 1e9, (e.time - start) as f64 / 1e6, color));
                }
            }
        }
    }
    let t_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let l_max = points.iter().map(|p| p.1).fold(1.0, f64::max).max(1.0);
    // Log scale: latencies span microseconds (local) to seconds (timeouts).
    let (l_lo, l_hi) = (0.1f64.log10(), l_max.log10());
    let x = |t: f64| LEFT + (W - LEFT - 20.0) * t / t_max;
    let y = |ms: f64| {
        let v = ms.max(0.1).log10();
        H - BOTTOM - (H - BOTTOM - TOP) * (v - l_lo) / (l_hi - l_lo).max(1e-9)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    for (f, node, start, end) in faults {
        let (x0, x1) = (x(*start as f64 / 1e9), x(*end as f64 / 1e9));
        let name = serde_json::to_string(f).unwrap_or_default();
        let label = match (f, node) {
            (Fault::Partition, 0) => format!("{} halves", name.trim_matches('"')),
            (Fault::Partition, n) => format!("{} leader n{n}", name.trim_matches('"')),
            (_, n) => format!("{} n{n}", name.trim_matches('"')),
        };
        let _ = write!(
            s,
            r##"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="#999" opacity="0.25"/><text x="{x0:.1}" y="{:.1}">{label}</text>"##,
            (x1 - x0).max(1.0),
            H - BOTTOM - TOP,
            TOP - 4.0,
        );
    }
    for (t, ms, color) in &points {
        let _ = write!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.5" fill="{color}"/>"#,
            x(*t),
            y(*ms)
        );
    }
    // Axes and labels.
    let _ = write!(
        s,
        r#"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="black"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{0:.1}" stroke="black"/>"#,
        H - BOTTOM,
        W - 20.0
    );
    let mut ms = 0.1;
    while ms <= l_max * 10.0 {
        let yy = y(ms);
        if yy >= TOP - 1.0 {
            let _ = write!(s, r#"<text x="4" y="{:.1}">{ms} ms</text>"#, yy + 4.0);
        }
        ms *= 10.0;
    }
    let step = (t_max / 10.0).ceil().max(1.0);
    let mut t = 0.0;
    while t <= t_max {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{t} s</text>"#,
            x(t) - 8.0,
            H - BOTTOM + 16.0
        );
        t += step;
    }
    let _ = write!(
        s,
        r#"<text x="{LEFT}" y="{:.1}">latency of each operation (green ok, red fail, orange unknown); grey: faults</text></svg>"#,
        H - 6.0
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Func;

    #[test]
    fn draws_every_completed_operation_and_every_fault() {
        let ev = |p, kind, t| Event {
            process: p,
            kind,
            f: Func::Write(1),
            key: 0,
            time: t,
        };
        let history = vec![
            ev(0, EventType::Invoke, 0),
            ev(0, EventType::Ok, 1_000_000),
            ev(1, EventType::Invoke, 0),
            ev(1, EventType::Info, 2_000_000_000),
        ];
        let svg = latency_svg(&history, &[(Fault::Kill, 2, 500_000_000, 1_500_000_000)]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("kill n2"));
    }
}
