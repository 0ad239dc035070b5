//! Progress bars on long phases (issue 5 item 3), drawn on stderr by
//! indicatif. They show only on a terminal: in CI, in a pipe or with
//! `--no-progress`, they are hidden and the run prints what it printed
//! before (the summary on stdout is never mixed with a bar).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static DISABLED: AtomicBool = AtomicBool::new(false);

/// `--no-progress`.
pub fn disable() {
    DISABLED.store(true, Ordering::Relaxed);
}

fn target() -> ProgressDrawTarget {
    if DISABLED.load(Ordering::Relaxed) {
        ProgressDrawTarget::hidden()
    } else {
        // Hidden by indicatif itself when stderr is not a terminal.
        ProgressDrawTarget::stderr_with_hz(4)
    }
}

/// A bar over `total` items (devices connected, requests answered...).
pub fn counter(label: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), target());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>14} [{bar:40}] {pos}/{len} ({per_sec}, {elapsed} elapsed, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

/// A bar over a span of time (an idle hold, a measured phase).
pub fn timed(label: &str, span: Duration) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(span.as_millis() as u64), target());
    bar.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:40}] {elapsed}/{msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar.set_message(humantime::format_duration(span).to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_count_even_when_hidden() {
        disable();
        let bar = counter("connect", 10);
        bar.inc(3);
        bar.inc(4);
        assert_eq!(bar.position(), 7);
        assert_eq!(bar.length(), Some(10));
        assert!(bar.is_hidden());
        let t = timed("hold", Duration::from_secs(2));
        t.set_position(500);
        assert_eq!(t.length(), Some(2000));
        t.finish_and_clear();
        bar.finish_and_clear();
    }
}
