//! Self-contained SVG pictures of a run, with the fault windows shaded: latency over time (what
//! faults did to clients) and an operation timeline (who was doing what, when).

use std::collections::HashMap;
use std::fmt::Write;

use crate::availability::Outage;
use crate::history::{Event, EventType, Func};
use crate::nemesis::{Fault, FaultWindow};

const W: f64 = 1000.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const BOTTOM: f64 = 40.0;
/// Height of one lane of fault windows above the plot.
const LANE: f64 = 15.0;
/// The lanes, top to bottom: one per fault kind, then the outages.
const LANES: [&str; 5] = ["kill", "pause", "partition", "membership", "no success"];
/// Room above the plot for the lanes.
const TOP: f64 = 8.0 + LANE * LANES.len() as f64;

fn color(kind: EventType) -> &'static str {
    match kind {
        EventType::Ok => "#2a9d4b",
        EventType::Fail => "#d62828",
        _ => "#f4a261",
    }
}

/// Completed operations: `(process, start, end, kind, function)`; unknown outcomes end when
/// the client gave up.
fn spans(history: &[Event]) -> Vec<(u64, u64, u64, EventType, &Func)> {
    let mut open: HashMap<u64, u64> = HashMap::new();
    let mut out = Vec::new();
    for e in history {
        match e.kind {
            EventType::Invoke => {
                open.insert(e.process, e.time);
            }
            kind => {
                if let Some(start) = open.remove(&e.process) {
                    out.push((e.process, start, e.time, kind, &e.f));
                }
            }
        }
    }
    out
}

/// The frame shared by both pictures: background, fault windows (a lane each kind above the
/// plot, labelled where the label fits, named on hover; a light band over the plot), the
/// outages in a lane of their own, the time axis, and a caption.
struct Frame {
    svg: String,
    t_max: f64,
    h: f64,
}

impl Frame {
    fn new(h: f64, t_max_s: f64, faults: &[FaultWindow], outages: &[Outage]) -> Self {
        // Windows that outlast the last operation stay in the picture.
        let t_max = faults
            .iter()
            .map(|w| w.end as f64 / 1e9)
            .chain(outages.iter().map(|o| o.start_s + o.length_s))
            .fold(t_max_s, f64::max);
        let mut f = Frame {
            svg: String::new(),
            t_max: t_max.max(1.0),
            h,
        };
        let _ = write!(
            f.svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="11"><rect width="{W}" height="{h}" fill="white"/>"#
        );
        for (i, name) in LANES.iter().enumerate() {
            let _ = write!(
                f.svg,
                r##"<text x="4" y="{:.1}" fill="#555">{name}</text>"##,
                4.0 + LANE * (i as f64 + 0.75)
            );
        }
        let lane = |fault: Fault| match fault {
            Fault::Kill => 0,
            Fault::Pause => 1,
            Fault::Partition => 2,
            Fault::Membership => 3,
        };
        let mut bands: Vec<(f64, f64, usize, &str, String, String)> = faults
            .iter()
            .map(|w| {
                let fill = if w.error.is_some() { "#c77" } else { "#999" };
                let title = match &w.error {
                    Some(e) => format!("{} (refused: {e})", w.what),
                    None => w.what.clone(),
                };
                let (start, end) = (w.start as f64 / 1e9, w.end as f64 / 1e9);
                (start, end, lane(w.fault), fill, title, w.what.clone())
            })
            .collect();
        bands.extend(outages.iter().map(|o| {
            let title = format!(
                "no operation succeeded for {:.1} s; faults: {}",
                o.length_s,
                o.faults.join(", ")
            );
            let label = format!("{:.1} s", o.length_s);
            (
                o.start_s,
                o.start_s + o.length_s,
                4,
                "#d62828",
                title,
                label,
            )
        }));
        for (start, end, lane, fill, title, label) in bands {
            let (x0, x1) = (f.x(start), f.x(end));
            let width = (x1 - x0).max(1.5);
            let y = 4.0 + LANE * lane as f64;
            let _ = write!(
                f.svg,
                r#"<rect x="{x0:.1}" y="{y:.1}" width="{width:.1}" height="{:.1}" fill="{fill}" opacity="0.5"><title>{}</title></rect>"#,
                LANE - 2.0,
                escape(&title),
            );
            // A label only where it fits inside its window (about 6 px a character).
            if width > 6.0 * label.len() as f64 {
                let _ = write!(
                    f.svg,
                    r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                    x0 + 2.0,
                    y + LANE * 0.7,
                    escape(&label)
                );
            }
            let _ = write!(
                f.svg,
                r#"<rect x="{x0:.1}" y="{TOP}" width="{width:.1}" height="{:.1}" fill="{fill}" opacity="0.12"/>"#,
                h - BOTTOM - TOP,
            );
        }
        let _ = write!(
            f.svg,
            r#"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="black"/>"#,
            h - BOTTOM,
            W - RIGHT
        );
        let step = (f.t_max / 10.0).ceil().max(1.0);
        let mut t = 0.0;
        while t <= f.t_max {
            let _ = write!(
                f.svg,
                r#"<text x="{:.1}" y="{:.1}">{t} s</text>"#,
                f.x(t) - 8.0,
                h - BOTTOM + 16.0
            );
            t += step;
        }
        f
    }

    fn x(&self, t: f64) -> f64 {
        LEFT + (W - LEFT - RIGHT) * t / self.t_max
    }

    fn finish(mut self, caption: &str) -> String {
        let _ = write!(
            self.svg,
            r#"<text x="{LEFT}" y="{:.1}">{}</text></svg>"#,
            self.h - 6.0,
            escape(caption)
        );
        self.svg
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Latency (completion minus invocation) of every operation against its completion time, green
/// for ok, red for fail, orange for unknown; fault windows as grey bands with their names.
pub fn latency_svg(history: &[Event], faults: &[FaultWindow], outages: &[Outage]) -> String {
    const H: f64 = 440.0;
    let points: Vec<(f64, f64, &str)> = spans(history)
        .into_iter()
        .map(|(_, s, e, k, _)| (e as f64 / 1e9, (e - s) as f64 / 1e6, color(k)))
        .collect();
    let t_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let l_max = points.iter().map(|p| p.1).fold(1.0, f64::max).max(1.0);
    let mut f = Frame::new(H, t_max, faults, outages);
    // Log scale: latencies span microseconds (local) to seconds (timeouts).
    let (l_lo, l_hi) = (0.01f64.log10(), l_max.log10());
    let y = |ms: f64| {
        let v = ms.max(0.01).log10();
        H - BOTTOM - (H - BOTTOM - TOP) * (v - l_lo) / (l_hi - l_lo).max(1e-9)
    };
    for (t, ms, c) in &points {
        let _ = write!(
            f.svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.5" fill="{c}"/>"#,
            f.x(*t),
            y(*ms)
        );
    }
    let _ = write!(
        f.svg,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="black"/>"#,
        H - BOTTOM
    );
    let mut ms = 0.01;
    while ms <= l_max * 10.0 {
        let yy = y(ms);
        if yy >= TOP - 1.0 {
            let _ = write!(f.svg, r#"<text x="4" y="{:.1}">{ms} ms</text>"#, yy + 4.0);
        }
        ms *= 10.0;
    }
    f.finish("latency of each operation (green ok, red fail, orange unknown); grey: faults, red: no operation succeeded")
}

/// One row per client process, one bar per operation from invocation to completion (green ok,
/// red fail, orange unknown; hover for the operation), fault windows shaded.
pub fn timeline_svg(history: &[Event], faults: &[FaultWindow], outages: &[Outage]) -> String {
    let ops = spans(history);
    let mut procs: Vec<u64> = ops.iter().map(|o| o.0).collect();
    procs.sort_unstable();
    procs.dedup();
    const ROW: f64 = 16.0;
    let h = TOP + BOTTOM + ROW * procs.len().max(1) as f64 + 8.0;
    let t_max = ops.iter().map(|o| o.2 as f64 / 1e9).fold(1.0, f64::max);
    let mut f = Frame::new(h, t_max, faults, outages);
    let row: HashMap<u64, usize> = procs.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    for (i, p) in procs.iter().enumerate() {
        let _ = write!(
            f.svg,
            r#"<text x="4" y="{:.1}">process {p}</text>"#,
            TOP + 4.0 + ROW * i as f64 + ROW * 0.7
        );
    }
    for (p, s, e, k, func) in ops {
        let (x0, x1) = (f.x(s as f64 / 1e9), f.x(e as f64 / 1e9));
        let y = TOP + 4.0 + ROW * row[&p] as f64;
        let what = match func {
            Func::Read(v) => format!("read {v:?}"),
            Func::Write(v) => format!("write {v}"),
            Func::Cas([a, b]) => format!("cas {a}->{b}"),
            Func::Delete => "delete".into(),
        };
        let _ = write!(
            f.svg,
            r#"<rect x="{x0:.2}" y="{y:.1}" width="{:.2}" height="{:.1}" fill="{}"><title>process {p}: {what} {:?} [{:.3} s, {:.3} s]</title></rect>"#,
            (x1 - x0).max(0.6),
            ROW - 4.0,
            color(k),
            k,
            s as f64 / 1e9,
            e as f64 / 1e9,
        );
    }
    f.finish("operations by process over time (green ok, red fail, orange unknown); grey: faults, red: no operation succeeded")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Func;

    #[test]
    fn labels_of_faults_in_one_lane_never_overlap() {
        // Forty short kills in a row: too narrow to label, named on hover.
        let faults: Vec<FaultWindow> = (0..40)
            .map(|i| FaultWindow {
                fault: Fault::Kill,
                what: format!("kill n{i}"),
                start: i * 250_000_000,
                end: i * 250_000_000 + 200_000_000,
                error: None,
            })
            .collect();
        let svg = latency_svg(&[], &faults, &[]);
        assert_eq!(svg.matches("<title>kill n").count(), 40);
        assert!(
            !svg.contains(">kill n3</text>"),
            "a label was drawn where it does not fit"
        );
    }

    #[test]
    fn draws_every_completed_operation_and_every_fault() {
        let ev = |p, kind, t| Event {
            process: p,
            kind,
            f: Func::Write(1),
            key: 0,
            time: t,
            node: None,
        };
        let history = vec![
            ev(0, EventType::Invoke, 0),
            ev(0, EventType::Ok, 1_000_000),
            ev(1, EventType::Invoke, 0),
            ev(1, EventType::Info, 2_000_000_000),
        ];
        let faults = [FaultWindow {
            fault: crate::nemesis::Fault::Kill,
            what: "kill n2".into(),
            start: 500_000_000,
            end: 1_500_000_000,
            error: None,
        }];
        let outages = [Outage {
            start_s: 0.001,
            length_s: 1.999,
            faults: vec!["kill n2".into()],
        }];
        let svg = latency_svg(&history, &faults, &outages);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("kill n2"));
        assert!(svg.contains("no operation succeeded for 2.0 s; faults: kill n2"));
        let timeline = timeline_svg(&history, &faults, &outages);
        assert!(timeline.ends_with("</svg>"));
        assert!(timeline.contains("process 0") && timeline.contains("process 1"));
        // Two operation bars, two windows (a lane mark and a band each), one background.
        assert_eq!(timeline.matches("<rect").count(), 7);
        assert!(timeline.contains("write 1 Info"));
    }
}
