//! Progress of the long-running tools (`send`, `score`, `export-dataset`).
//!
//! On a terminal, an `indicatif` bar with the count, the rate and the time left. When
//! standard error is not a terminal (a log file, a CI job, a Kubernetes Job), a bar
//! would be a stream of control characters, so the same figures come as plain lines,
//! at most one every [`LINE_EVERY`] and a last one at the end.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a plain progress line is written when not on a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// A progress display over `total` items of a kind (`"instances"`, `"series"`).
pub struct Progress {
    what: &'static str,
    total: u64,
    started: Instant,
    display: Display,
}

enum Display {
    Bar(indicatif::ProgressBar),
    Lines(Mutex<Lines>),
}

struct Lines {
    done: u64,
    bytes: u64,
    last: Instant,
}

impl Progress {
    /// A bar on a terminal, plain lines elsewhere.
    pub fn new(total: u64, what: &'static str) -> Self {
        Self::with_terminal(total, what, std::io::stderr().is_terminal())
    }

    fn with_terminal(total: u64, what: &'static str, terminal: bool) -> Self {
        let display = if terminal {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{bar:40}} {{pos}}/{{len}} {what}  {{per_sec}}  ETA {{eta}}  {{msg}}"
                ))
                .expect("a valid progress template"),
            );
            Display::Bar(bar)
        } else {
            Display::Lines(Mutex::new(Lines {
                done: 0,
                bytes: 0,
                last: Instant::now(),
            }))
        };
        Self {
            what,
            total,
            started: Instant::now(),
            display,
        }
    }

    /// One more item done, of `bytes` bytes (0 when sizes do not matter).
    pub fn inc(&self, bytes: u64) {
        match &self.display {
            Display::Bar(bar) => bar.inc(1),
            Display::Lines(lines) => {
                let mut l = lines.lock().expect("progress lock");
                l.done += 1;
                l.bytes += bytes;
                if l.last.elapsed() >= LINE_EVERY && l.done < self.total {
                    l.last = Instant::now();
                    eprintln!("{}", self.line(l.done, l.bytes));
                }
            }
        }
    }

    /// A message printed above the bar (or as a line of its own).
    pub fn println(&self, msg: impl AsRef<str>) {
        match &self.display {
            Display::Bar(bar) => bar.println(msg.as_ref()),
            Display::Lines(_) => eprintln!("{}", msg.as_ref()),
        }
    }

    /// The end: the bar stays with a closing message, or a last line is written.
    pub fn finish(&self) {
        let elapsed = self.started.elapsed();
        match &self.display {
            Display::Bar(bar) => bar.finish_with_message(format!("in {elapsed:.0?}")),
            Display::Lines(lines) => {
                let l = lines.lock().expect("progress lock");
                eprintln!("{}", self.line(l.done, l.bytes));
            }
        }
    }

    /// `120/300 instances (40 %), 45.2/s, 22.6 MB/s, 4 s left`
    fn line(&self, done: u64, bytes: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let mut line = format!("{done}/{} {}", self.total, self.what);
        if self.total > 0 {
            line.push_str(&format!(
                " ({:.0} %)",
                100.0 * done as f64 / self.total as f64
            ));
        }
        line.push_str(&format!(", {rate:.1}/s"));
        if bytes > 0 {
            line.push_str(&format!(", {:.1} MB/s", bytes as f64 / 1e6 / secs));
        }
        if done < self.total && rate > 0.0 {
            let left = (self.total - done) as f64 / rate;
            line.push_str(&format!(", {left:.0} s left"));
        } else if done >= self.total {
            line.push_str(&format!(", done in {secs:.1} s"));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_has_count_share_rate_and_what_is_left() {
        let p = Progress::with_terminal(300, "instances", false);
        let half = p.line(150, 75_000_000);
        assert!(half.starts_with("150/300 instances (50 %), "), "{half}");
        assert!(half.contains("/s") && half.contains("MB/s") && half.ends_with(" s left"));
        let all = p.line(300, 0);
        assert!(all.contains("done in") && !all.contains("MB/s"), "{all}");
    }

    #[test]
    fn counts_reach_the_total() {
        let p = Progress::with_terminal(3, "series", false);
        for _ in 0..3 {
            p.inc(10);
        }
        let Display::Lines(l) = &p.display else {
            panic!("not on a terminal, lines expected")
        };
        let l = l.lock().unwrap();
        assert_eq!((l.done, l.bytes), (3, 30));
    }
}
