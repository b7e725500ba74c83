//! What a migration shows while it runs, built from the engine's [`Event`]s: one line per
//! phase (a spinner with the elapsed time, finished into `✓ checkpoint  1.2 s`), a transfer
//! bar with bytes done, rate and time left while a round's bytes move, a line per round with
//! what dedup saved, then a summary on stdout, or what failed and what to check. On a
//! terminal the live line is an indicatif bar that redraws; elsewhere (a pipe, a log file, or
//! with `-v`, whose log lines would tear a redrawn bar) the same facts come as plain lines,
//! with a progress line at most every 2 s or 10 %. `--json` prints every event as one JSON
//! line on stdout instead, and a failure also in words on stderr; `-q` keeps only errors.
//!
//! [`View`] writes into the writers and takes the clock it is given ([`View::with`]), so tests
//! feed it a recorded event stream and compare what it wrote; [`View::new`] gives it the
//! process's stdout, stderr and clock.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::control::{Event, Phase, Summary, BASE_IMAGE_ROUND};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use crate::output::{bytes, Output};

/// Where time comes from: the system's, or a test's.
pub(crate) trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Instant;
}

/// The system's monotonic clock.
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Where a [`View`] writes.
pub(crate) struct Sinks {
    /// The summary and the JSON lines (stdout).
    pub(crate) out: Box<dyn Write + Send>,
    /// Phases, rounds and errors (stderr).
    pub(crate) err: Box<dyn Write + Send>,
    /// `Some` when `err` is a terminal: makes the draw target of the live line, on that
    /// terminal. `None`: plain lines only.
    pub(crate) terminal: Option<Box<dyn Fn() -> ProgressDrawTarget + Send>>,
}

impl Sinks {
    /// This process's stdout and stderr, with live lines when stderr is a terminal and logs
    /// stay at warnings (log lines would tear a redrawn line).
    pub(crate) fn standard() -> Self {
        let verbose = tracing::level_filters::LevelFilter::current()
            >= tracing::level_filters::LevelFilter::INFO;
        let terminal = std::io::stderr().is_terminal() && !verbose;
        Sinks {
            out: Box::new(std::io::stdout()),
            err: Box::new(std::io::stderr()),
            terminal: terminal.then(|| {
                Box::new(ProgressDrawTarget::stderr) as Box<dyn Fn() -> ProgressDrawTarget + Send>
            }),
        }
    }
}

/// The labels of finished phases are padded to this width, so their durations line up.
const LABEL_WIDTH: usize = 18;
/// Plain mode: at most one progress line this often, when it has moved 10 % further.
const PLAIN_EVERY: Duration = Duration::from_secs(2);
/// Plain mode: a progress line this often even when it did not move (a stalled transfer).
const PLAIN_HEARTBEAT: Duration = Duration::from_secs(10);

/// Shows a migration's events to people or, with `--json`, to scripts.
pub(crate) struct View<'a> {
    out: &'a Output,
    json: bool,
    /// The migrations make checkpoint images for a Pod (Kubernetes): nothing stops, and the
    /// summary is the image.
    pods: bool,
    clock: Arc<dyn Clock>,
    sinks: Sinks,
    /// Animate the spinner between events (off in tests, which draw only on events).
    steady_tick: bool,
    /// The phase running now, until the next one starts or the migration ends.
    running: Option<Running>,
    /// Terminal mode: the live line of the running phase.
    live: Option<ProgressBar>,
    /// Also sees every event (a drain's board).
    tap: Option<Tap>,
}

/// What else sees a [`View`]'s events.
pub(crate) type Tap = Box<dyn Fn(&Event) + Send + Sync>;

/// The phase running now.
struct Running {
    phase: Phase,
    /// `checkpoint`, `pre-copy round 1`: what its lines are called.
    label: String,
    started: Instant,
    /// While its bytes move.
    transfer: Option<Transfer>,
}

/// A round's bytes moving.
struct Transfer {
    /// The first progress event (the sender starts then).
    started: Instant,
    done: u64,
    total: u64,
    /// Plain mode: when the last progress line (or the transfer) began, and its tenth.
    printed_at: Instant,
    printed_tenth: u64,
}

impl<'a> View<'a> {
    /// A view on this process's stdout and stderr: live lines when stderr is a terminal
    /// and logs stay at warnings, plain lines otherwise.
    pub(crate) fn new(out: &'a Output, json: bool) -> Self {
        let sinks = Sinks::standard();
        let terminal = sinks.terminal.is_some();
        let mut view = Self::with(out, json, sinks, Arc::new(SystemClock));
        view.steady_tick = terminal;
        view
    }

    /// A view writing into `sinks`, timed by `clock`.
    pub(crate) fn with(out: &'a Output, json: bool, sinks: Sinks, clock: Arc<dyn Clock>) -> Self {
        Self {
            out,
            json,
            pods: false,
            clock,
            sinks,
            steady_tick: false,
            running: None,
            live: None,
            tap: None,
        }
    }

    /// The view, with `tap` seeing every event too.
    pub(crate) fn tapped(mut self, tap: Tap) -> Self {
        self.tap = Some(tap);
        self
    }

    /// A view of the checkpoint-image migrations of a Pod's containers.
    pub(crate) fn for_pods(mut self) -> Self {
        self.pods = true;
        self
    }

    /// Whether people see progress: not with `-q`, not with `--json`.
    fn human(&self) -> bool {
        !self.out.quiet && !self.json
    }

    /// Shows one event.
    pub(crate) fn show(&mut self, event: &Event) {
        if let Some(tap) = &self.tap {
            tap(event);
        }
        if self.json {
            let line = serde_json::to_string(event).expect("events serialize");
            let _ = writeln!(self.sinks.out, "{line}");
            let _ = self.sinks.out.flush();
        }
        let now = self.clock.now();
        match event {
            Event::Phase {
                migration_id,
                phase,
                round,
            } => {
                if self.human() {
                    self.start_phase(now, migration_id, *phase, *round);
                }
            }
            Event::Progress { done, total, .. } => {
                if self.human() {
                    self.progress(now, *done, *total);
                }
            }
            Event::Round {
                round,
                archive_bytes,
                wire_bytes,
                ..
            } => {
                if self.human() {
                    let text = round_line(*round, *archive_bytes, *wire_bytes);
                    self.err_line(&text);
                    self.back_to_spinner();
                }
            }
            Event::Done(summary) => {
                if self.human() {
                    self.finish_phase(now, true);
                    self.end_live();
                    if self.pods {
                        let text = pod_summary(summary);
                        self.err_line(&text);
                    } else {
                        for line in summary_lines(summary) {
                            let _ = writeln!(self.sinks.out, "{line}");
                        }
                        let _ = self.sinks.out.flush();
                    }
                }
            }
            Event::Failed {
                phase,
                message,
                rolled_back,
                destination_clean,
                ..
            } => {
                if self.human() {
                    // Rollback is the phase running when the failure is reported: it
                    // succeeded when the source runs again.
                    let ok = self
                        .running
                        .as_ref()
                        .is_some_and(|r| r.phase == Phase::Rollback)
                        && *rolled_back;
                    self.finish_phase(now, ok);
                }
                self.end_live();
                for line in failure_lines(*phase, message, *rolled_back, *destination_clean) {
                    self.err_line(&line);
                }
            }
        }
    }

    /// A phase begins: the one before ends (failed when this one is the rollback).
    fn start_phase(&mut self, now: Instant, migration_id: &str, phase: Phase, round: Option<u32>) {
        self.finish_phase(now, phase != Phase::Rollback);
        let label = phase_label(phase, round);
        let what = self.phase_text(migration_id, phase, round);
        self.running = Some(Running {
            phase,
            label: label.clone(),
            started: now,
            transfer: None,
        });
        if self.sinks.terminal.is_some() {
            let bar = self.live_bar(spinner_style(self.clock.clone(), now));
            bar.set_prefix(label);
            bar.set_message(what);
        } else {
            self.err_line(&format!("→ {label}: {what}"));
        }
    }

    /// The running phase ends: `✓ label  1.2 s`, or `✗` when it failed.
    fn finish_phase(&mut self, now: Instant, ok: bool) {
        let Some(running) = self.running.take() else {
            return;
        };
        let mark = if ok { '✓' } else { '✗' };
        let secs = now.saturating_duration_since(running.started).as_secs_f64();
        let text = format!("{mark} {:<LABEL_WIDTH$}{}", running.label, seconds(secs));
        self.err_line(&text);
    }

    /// Bytes of the running phase's round moved.
    fn progress(&mut self, now: Instant, done: u64, total: u64) {
        let terminal = self.sinks.terminal.is_some();
        let Some(running) = self.running.as_mut() else {
            return;
        };
        let first = running.transfer.is_none();
        let transfer = running.transfer.get_or_insert(Transfer {
            started: now,
            done,
            total,
            printed_at: now,
            printed_tenth: 0,
        });
        transfer.done = done;
        transfer.total = total;
        let label = running.label.clone();
        let text = transfer_text(transfer, now, terminal);
        if terminal {
            let bar = if first {
                self.live_bar(bar_style())
            } else {
                self.live.as_ref().expect("the phase's live line")
            };
            bar.set_length(total.max(1));
            bar.set_position(done);
            bar.set_message(text);
            return;
        }
        let tenth = (done * 10).checked_div(total).unwrap_or(10);
        let since = now.saturating_duration_since(transfer.printed_at);
        let moved = tenth > transfer.printed_tenth && since >= PLAIN_EVERY;
        if done > 0 && (moved || since >= PLAIN_HEARTBEAT) {
            transfer.printed_at = now;
            transfer.printed_tenth = tenth;
            self.err_line(&format!("  {label}: {text}"));
        }
    }

    /// After a round's bytes: the phase goes on (staging the image) or ends soon.
    fn back_to_spinner(&mut self) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        running.transfer = None;
        let started = running.started;
        if let Some(bar) = &self.live {
            bar.set_style(spinner_style(self.clock.clone(), started));
            bar.set_message("");
        }
    }

    /// The live line in `style`, made when the first phase starts.
    fn live_bar(&mut self, style: ProgressStyle) -> &ProgressBar {
        if let Some(bar) = &self.live {
            bar.set_style(style);
        } else {
            let target = self.sinks.terminal.as_ref().expect("terminal mode");
            let bar = ProgressBar::with_draw_target(None, target()).with_style(style);
            if self.steady_tick {
                bar.enable_steady_tick(Duration::from_millis(100));
            }
            self.live = Some(bar);
        }
        self.live.as_ref().expect("just made")
    }

    /// Clears the live line (finished lines stay above it).
    fn end_live(&mut self) {
        if let Some(bar) = self.live.take() {
            bar.finish_and_clear();
        }
    }

    /// A line on stderr, above the live line when there is one.
    fn err_line(&mut self, text: &str) {
        let err = &mut self.sinks.err;
        match &self.live {
            Some(bar) => bar.suspend(|| write_line(err, text)),
            None => write_line(err, text),
        }
    }

    /// What a phase does, in words.
    fn phase_text(&self, migration_id: &str, phase: Phase, round: Option<u32>) -> String {
        match (phase, round) {
            (Phase::Plan, _) => format!("checking both nodes (migration {migration_id})"),
            (Phase::StageImage, _) => "sending the base image (the destination lacks it)".into(),
            (Phase::Precopy, _) => "checkpoint (the container keeps running), then send".into(),
            (Phase::Checkpoint, _) if self.pods => {
                "kubelet checkpoint (the container keeps running)".into()
            }
            (Phase::Checkpoint, _) => "final checkpoint (the container stops)".into(),
            (Phase::Transfer, _) if self.pods => "sending the checkpoint".into(),
            (Phase::Transfer, _) => "sending what changed".into(),
            (Phase::Assemble, _) => "assembling and importing the image".into(),
            (Phase::Restore, _) => "restoring on the destination".into(),
            (Phase::Verify, _) => "checking that it runs".into(),
            (Phase::Cleanup, _) => "removing the source container and checkpoints".into(),
            (Phase::Rollback, _) => "rolling back: the source runs again".into(),
        }
    }
}

/// `text` as a line on `to`, flushed (errors writing to a closed terminal are ignored).
pub(crate) fn write_line(to: &mut dyn Write, text: &str) {
    let _ = writeln!(to, "{text}");
    let _ = to.flush();
}

/// What a phase's lines are called.
pub(crate) fn phase_label(phase: Phase, round: Option<u32>) -> String {
    match (phase, round) {
        (Phase::Precopy, Some(r)) => format!("pre-copy round {r}"),
        (Phase::Precopy, None) => "pre-copy".into(),
        (Phase::StageImage, _) => "stage image".into(),
        (p, _) => p.to_string(),
    }
}

/// `1.2 s`, right-aligned.
fn seconds(secs: f64) -> String {
    format!("{secs:>5.1} s")
}

/// The live line of a phase without bytes: spinner, label, elapsed time, what it does.
fn spinner_style(clock: Arc<dyn Clock>, started: Instant) -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:18}{phase_elapsed}  {wide_msg}")
        .expect("valid template")
        .with_key(
            "phase_elapsed",
            move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                let secs = clock.now().saturating_duration_since(started).as_secs_f64();
                let _ = w.write_str(&seconds(secs));
            },
        )
}

/// The live line while bytes move: a bar, then bytes, rate and time left (80 columns hold
/// it).
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:18}[{bar:15}] {wide_msg}")
        .expect("valid template")
        .progress_chars("=> ")
}

/// How far a round's bytes are: `105.1 MiB of 200.7 MiB (52 %), 190.2 MiB/s, about 1 s
/// left`, or beside a bar (`compact`) `105.1 MiB/200.7 MiB  190.2 MiB/s  ETA 1 s`; once all
/// is chunked (the bytes counted are the archive's, not the wire's), what it waits for.
fn transfer_text(t: &Transfer, now: Instant, compact: bool) -> String {
    let elapsed = now.saturating_duration_since(t.started).as_secs_f64();
    if t.total > 0 && t.done >= t.total {
        return if compact {
            "all chunked, waiting for the destination".into()
        } else {
            format!(
                "all {} chunked, waiting for the destination ({elapsed:.1} s)",
                bytes(t.total)
            )
        };
    }
    let rate_left = (elapsed > 0.0 && t.done > 0).then(|| {
        let rate = t.done as f64 / elapsed;
        (
            bytes(rate as u64),
            duration((t.total - t.done) as f64 / rate),
        )
    });
    if compact {
        let mut text = format!("{}/{}", bytes(t.done), bytes(t.total));
        if let Some((rate, left)) = rate_left {
            text += &format!("  {rate}/s  ETA {left}");
        }
        return text;
    }
    let percent = (t.done * 100).checked_div(t.total).unwrap_or(0);
    let mut text = format!("{} of {} ({percent} %)", bytes(t.done), bytes(t.total));
    if let Some((rate, left)) = rate_left {
        text += &format!(", {rate}/s, about {left} left");
    }
    text
}

/// `4 s`, `2 min 5 s`.
pub(crate) fn duration(secs: f64) -> String {
    let s = secs.ceil() as u64;
    if s < 60 {
        format!("{s} s")
    } else {
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// What dedup (and compression) saved: `archive − wire` and its share of the archive.
fn saved(archive: u64, wire: u64) -> String {
    let saved = archive.saturating_sub(wire);
    let percent = if archive == 0 {
        0.0
    } else {
        saved as f64 * 100.0 / archive as f64
    };
    format!("{} ({percent:.1} %)", bytes(saved))
}

/// `archive / wire`: how many times less went over the wire than the archive holds.
fn ratio(archive: u64, wire: u64) -> String {
    if wire == 0 {
        return "∞".into();
    }
    format!("{:.1}×", archive as f64 / wire as f64)
}

/// The line at a round's end, under its phase's line (whose time it took): what went over
/// the wire of the archive, and what dedup (and compression) spared.
fn round_line(round: u32, archive: u64, wire: u64) -> String {
    let what = if round == BASE_IMAGE_ROUND {
        "base image"
    } else {
        "checkpoint"
    };
    format!(
        "  {} {what}, {} sent, {} saved by dedup",
        bytes(archive),
        bytes(wire),
        saved(archive, wire)
    )
}

/// The summary of a container migration, on stdout; 80 columns hold it.
fn summary_lines(s: &Summary) -> Vec<String> {
    let precopy = match s.precopy_rounds {
        0 => "none".to_string(),
        1 => "1 round".to_string(),
        n => format!("{n} rounds"),
    };
    vec![
        format!(
            "migrated {} from {} to {} in {:.1} s (downtime {:.1} s)",
            s.container, s.from, s.to, s.total_seconds, s.downtime_seconds
        ),
        format!("  checkpoint      {}", bytes(s.archive_bytes)),
        format!(
            "  over the wire   {} in the final round, {} in all",
            bytes(s.wire_bytes),
            bytes(s.wire_bytes_total)
        ),
        format!("  pre-copy        {precopy}"),
        format!(
            "  dedup ratio     {} (final round), {} saved",
            ratio(s.archive_bytes, s.wire_bytes),
            saved(s.archive_bytes, s.wire_bytes)
        ),
    ]
}

/// The line of one container's checkpoint image (a Pod migration goes on after it).
fn pod_summary(s: &Summary) -> String {
    format!(
        "  {}: checkpoint image {} on {} in {:.1} s; checkpoint {}, {} over the wire ({} in \
         all, dedup ratio {})",
        s.container,
        s.image.as_deref().unwrap_or("?"),
        s.to,
        s.total_seconds,
        bytes(s.archive_bytes),
        bytes(s.wire_bytes),
        bytes(s.wire_bytes_total),
        ratio(s.archive_bytes, s.wire_bytes)
    )
}

/// What failed, whether it was undone, and what to check.
fn failure_lines(
    phase: Phase,
    message: &str,
    rolled_back: bool,
    destination_clean: bool,
) -> Vec<Cow<'static, str>> {
    let mut lines = vec![Cow::Owned(format!(
        "error: the migration failed in phase {phase}: {message}"
    ))];
    if !destination_clean {
        lines.push(Cow::Borrowed(
            "the destination did not confirm its cleanup: its daemon removes what the \
             migration left when it restarts, or after 5 minutes",
        ));
    }
    lines.push(Cow::Borrowed(if rolled_back {
        "rolled back: the container runs on the source node as before"
    } else {
        "ROLLBACK INCOMPLETE: check `podman ps -a` on both nodes and the source daemon's log; \
         a stopped container's checkpoint is kept in the daemon's work folder"
    }));
    lines
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::testing::{Buffer, FakeClock, FakeTerm};

    /// A recorded `migrate kv --from node1 --to node2 --precopy 1 --json` in the lab (redis
    /// holding 150 000 random values, the link slowed to 200 Mbit/s), each line the event
    /// with `at`: seconds since the first, as it reached the client.
    const SUCCESS: &str = include_str!("../tests/fixtures/migration-events.jsonl");
    /// The same container migrated back with `--precopy 0` while the destination's work
    /// folder had room for a fifth of the checkpoint: the transfer fails and rolls back.
    const FAILURE: &str = include_str!("../tests/fixtures/migration-failed-events.jsonl");

    /// The events of a fixture with the second each arrived.
    fn recorded(fixture: &str) -> Vec<(f64, Event)> {
        fixture
            .lines()
            .map(|line| {
                let at = serde_json::from_str::<Value>(line).unwrap()["at"]
                    .as_f64()
                    .expect("every line has `at`");
                let event: Event = serde_json::from_str(line).unwrap();
                (at, event)
            })
            .collect()
    }

    /// Feeds `events` to `view`, moving `clock` to each one's time.
    fn feed(view: &mut View<'_>, clock: &FakeClock, events: &[(f64, Event)]) {
        for (at, event) in events {
            clock.set(*at);
            view.show(event);
        }
    }

    /// Renders `fixture` for a pipe: (stdout, stderr).
    fn plain(fixture: &str, out: &Output, json: bool) -> (String, String) {
        render_plain(&recorded(fixture), |sinks, clock| {
            View::with(out, json, sinks, clock)
        })
    }

    /// Renders `events` for a pipe in the view `make` builds: (stdout, stderr).
    fn render_plain<'a>(
        events: &[(f64, Event)],
        make: impl FnOnce(Sinks, Arc<FakeClock>) -> View<'a>,
    ) -> (String, String) {
        let (stdout, stderr) = (Buffer::default(), Buffer::default());
        let clock = FakeClock::new();
        let sinks = Sinks {
            out: Box::new(stdout.clone()),
            err: Box::new(stderr.clone()),
            terminal: None,
        };
        let mut view = make(sinks, clock.clone());
        feed(&mut view, &clock, events);
        (stdout.text(), stderr.text())
    }

    /// A view drawing on `term`, as on a terminal.
    fn on_terminal<'a>(out: &'a Output, term: &FakeTerm, clock: Arc<FakeClock>) -> View<'a> {
        View::with(out, false, term.sinks(), clock)
    }

    const PEOPLE: Output = Output { quiet: false };
    const QUIET: Output = Output { quiet: true };

    #[test]
    fn a_pipe_gets_one_line_per_phase_start_and_end_the_rounds_and_the_summary() {
        let (stdout, stderr) = plain(SUCCESS, &PEOPLE, false);
        let expected_err = [
            "→ plan: checking both nodes (migration kv-6e198fa7)",
            "✓ plan                0.2 s",
            "→ pre-copy round 1: checkpoint (the container keeps running), then send",
            "  pre-copy round 1: all 200.7 MiB chunked, waiting for the destination (2.0 s)",
            "  200.7 MiB checkpoint, 59.6 MiB sent, 141.1 MiB (70.3 %) saved by dedup",
            "✓ pre-copy round 1    3.3 s",
            "→ checkpoint: final checkpoint (the container stops)",
            "✓ checkpoint          1.2 s",
            "→ transfer: sending what changed",
            "  200.7 MiB checkpoint, 421.0 KiB sent, 200.3 MiB (99.8 %) saved by dedup",
            "✓ transfer            0.4 s",
            "→ restore: restoring on the destination",
            "✓ restore             1.0 s",
            "→ verify: checking that it runs",
            "✓ verify              0.1 s",
            "→ cleanup: removing the source container and checkpoints",
            "✓ cleanup             0.2 s",
        ];
        assert_eq!(stderr.lines().collect::<Vec<_>>(), expected_err, "{stderr}");
        let expected_out = [
            "migrated kv from node1 to node2 in 6.4 s (downtime 2.7 s)",
            "  checkpoint      200.7 MiB",
            "  over the wire   421.0 KiB in the final round, 60.0 MiB in all",
            "  pre-copy        1 round",
            "  dedup ratio     488.3× (final round), 200.3 MiB (99.8 %) saved",
        ];
        assert_eq!(stdout.lines().collect::<Vec<_>>(), expected_out, "{stdout}");
    }

    /// The lines of a finished migration on a terminal, and at its end in a pipe: every
    /// phase finished with its time, the rounds, the summary.
    const FINISHED: [&str; 14] = [
        "✓ plan                0.2 s",
        "  200.7 MiB checkpoint, 59.6 MiB sent, 141.1 MiB (70.3 %) saved by dedup",
        "✓ pre-copy round 1    3.3 s",
        "✓ checkpoint          1.2 s",
        "  200.7 MiB checkpoint, 421.0 KiB sent, 200.3 MiB (99.8 %) saved by dedup",
        "✓ transfer            0.4 s",
        "✓ restore             1.0 s",
        "✓ verify              0.1 s",
        "✓ cleanup             0.2 s",
        "migrated kv from node1 to node2 in 6.4 s (downtime 2.7 s)",
        "  checkpoint      200.7 MiB",
        "  over the wire   421.0 KiB in the final round, 60.0 MiB in all",
        "  pre-copy        1 round",
        "  dedup ratio     488.3× (final round), 200.3 MiB (99.8 %) saved",
    ];

    #[test]
    fn a_terminal_gets_live_lines_that_end_in_the_summary() {
        let term = FakeTerm::default();
        let clock = FakeClock::new();
        let mut view = on_terminal(&PEOPLE, &term, clock.clone());
        let events = recorded(SUCCESS);
        let live = |term: &FakeTerm| term.lines().last().cloned().unwrap_or_default();

        // Half the pre-copy archive chunked: the bar, bytes, rate and time left.
        let half = events
            .iter()
            .position(|(_, e)| matches!(e, Event::Progress { done, .. } if *done == 110255056))
            .unwrap();
        feed(&mut view, &clock, &events[..=half]);
        let bar = live(&term);
        assert!(
            bar.ends_with(
                " pre-copy round 1  [=======>       ] 105.1 MiB/200.7 MiB  417.3 MiB/s  ETA 1 s"
            ),
            "{bar}"
        );
        assert!(bar.chars().count() <= 80, "{bar}");
        assert_eq!(
            term.lines(),
            ["✓ plan                0.2 s", bar.as_str()],
            "the plan is finished above the bar"
        );

        // Into the final checkpoint, half a second later: a spinner with its elapsed time.
        let checkpoint = events
            .iter()
            .position(|(_, e)| {
                matches!(
                    e,
                    Event::Phase {
                        phase: Phase::Checkpoint,
                        ..
                    }
                )
            })
            .unwrap();
        feed(&mut view, &clock, &events[half + 1..=checkpoint]);
        clock.set(events[checkpoint].0 + 0.5);
        view.live.as_ref().expect("a live line").tick();
        let spinner = live(&term);
        assert!(
            spinner.ends_with(" checkpoint          0.5 s  final checkpoint (the container stops)"),
            "{spinner}"
        );
        assert_eq!(term.lines()[..3], FINISHED[..3], "{:#?}", term.lines());

        // The end: finished lines and the summary, no live line left.
        feed(&mut view, &clock, &events[checkpoint + 1..]);
        assert_eq!(term.lines(), FINISHED, "{:#?}", term.lines());
        assert!(view.live.is_none());
    }

    #[test]
    fn json_prints_every_event_as_one_line_that_parses_back() {
        for out in [PEOPLE, QUIET] {
            let (stdout, stderr) = plain(SUCCESS, &out, true);
            assert_eq!(stderr, "", "nothing but JSON");
            let events: Vec<Event> = recorded(SUCCESS).into_iter().map(|(_, e)| e).collect();
            let lines: Vec<&str> = stdout.lines().collect();
            assert_eq!(lines.len(), events.len(), "{stdout}");
            for (line, event) in lines.iter().zip(&events) {
                let value: Value = serde_json::from_str(line).unwrap();
                assert!(value["event"].is_string(), "{line}");
                assert!(value.get("at").is_none(), "{line}");
                assert_eq!(&serde_json::from_str::<Event>(line).unwrap(), event);
            }
            let done: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
            assert_eq!(done["event"], "done");
            assert_eq!(done["archive_bytes"], 210494464);
            assert_eq!(done["wire_bytes"], 431074);
            assert_eq!(done["wire_bytes_total"], 62935579);
            assert_eq!(done["precopy_rounds"], 1);
            assert!(done["total_seconds"].as_f64().unwrap() > 6.0);
            assert!(done["downtime_seconds"].as_f64().unwrap() > 2.0);
            assert_eq!(done["phases"][2][0], "checkpoint");
            assert!(done["phases"][2][1].as_f64().unwrap() > 1.0);
        }
    }

    #[test]
    fn a_failure_says_the_phase_and_that_it_rolled_back() {
        let (stdout, stderr) = plain(FAILURE, &PEOPLE, false);
        assert_eq!(stdout, "");
        let lines: Vec<&str> = stderr.lines().collect();
        // All is chunked at once, then the transfer stalls: a line says what it waits for.
        assert_eq!(
            lines,
            [
                "→ plan: checking both nodes (migration kv-7ee062c2)",
                "✓ plan                0.1 s",
                "→ checkpoint: final checkpoint (the container stops)",
                "✓ checkpoint          0.9 s",
                "→ transfer: sending what changed",
                "  transfer: all 199.8 MiB chunked, waiting for the destination (2.2 s)",
                "✗ transfer           11.4 s",
                "→ rollback: rolling back: the source runs again",
                "✓ rollback            1.0 s",
                "error: the migration failed in phase transfer: sending the checkpoint to \
                 node2: connection to node2 lost and not resumed within 10s: the connection \
                 attempt did not complete (is the peer still running?)",
                "rolled back: the container runs on the source node as before",
            ],
            "{stderr}"
        );
    }

    /// The failure fixture, its rollback left incomplete and the destination unreachable.
    fn incomplete() -> String {
        FAILURE
            .replace(r#""rolled_back":true"#, r#""rolled_back":false"#)
            .replace(
                r#""destination_clean":true"#,
                r#""destination_clean":false"#,
            )
    }

    #[test]
    fn an_incomplete_rollback_says_so_and_what_to_check() {
        let (_, stderr) = plain(&incomplete(), &PEOPLE, false);
        let tail: Vec<&str> = stderr.lines().rev().take(4).collect();
        assert_eq!(tail[3], "✗ rollback            1.0 s", "{stderr}");
        assert!(tail[2].starts_with("error: the migration failed in phase transfer: "));
        assert!(tail[1].starts_with("the destination did not confirm its cleanup"));
        assert!(
            tail[0].starts_with("ROLLBACK INCOMPLETE: check `podman ps -a` on both nodes"),
            "{stderr}"
        );
    }

    #[test]
    fn quiet_and_json_keep_the_failure_in_words_and_nothing_else() {
        let (stdout, stderr) = plain(SUCCESS, &QUIET, false);
        assert_eq!((stdout.as_str(), stderr.as_str()), ("", ""));
        for json in [false, true] {
            let (stdout, stderr) = plain(&incomplete(), &QUIET, json);
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(lines.len(), 3, "{stderr}");
            assert!(lines[0].starts_with("error: the migration failed in phase transfer"));
            assert!(lines[2].starts_with("ROLLBACK INCOMPLETE"));
            let last = stdout.lines().last().unwrap_or_default();
            if json {
                assert!(last.starts_with(r#"{"event":"failed""#), "{stdout}");
            } else {
                assert_eq!(stdout, "");
            }
        }
        let (stdout, stderr) = plain(&incomplete(), &PEOPLE, true);
        assert_eq!(stdout.lines().count(), FAILURE.lines().count());
        assert_eq!(stderr.lines().count(), 3, "{stderr}");
    }

    #[test]
    fn a_pipe_gets_a_progress_line_per_tenth_at_most_every_two_seconds() {
        let lines = |seconds: u64| {
            let total = 1000 << 20;
            let ticks = seconds * 4;
            let mut events = vec![(
                0.0,
                Event::Phase {
                    migration_id: "m".into(),
                    phase: Phase::Transfer,
                    round: None,
                },
            )];
            for i in 0..=ticks {
                let done = total * i / ticks;
                let event = Event::Progress {
                    phase: Phase::Transfer,
                    done,
                    total,
                };
                events.push((i as f64 / 4.0, event));
            }
            let stderr = Buffer::default();
            let clock = FakeClock::new();
            let sinks = Sinks {
                out: Box::new(Buffer::default()),
                err: Box::new(stderr.clone()),
                terminal: None,
            };
            let mut view = View::with(&PEOPLE, false, sinks, clock.clone());
            feed(&mut view, &clock, &events);
            let text = stderr.text();
            text.lines()
                .filter(|l| l.starts_with("  transfer: "))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        // 100 s: one line per tenth, the last once all is chunked.
        let slow = lines(100);
        assert_eq!(slow.len(), 10, "{slow:#?}");
        assert_eq!(
            slow[0],
            "  transfer: 100.0 MiB of 1000.0 MiB (10 %), 10.0 MiB/s, about 1 min 30 s left"
        );
        assert!(slow[9].contains("all 1000.0 MiB chunked"), "{slow:#?}");
        // 10 s: a tenth every second, but a line only every 2 s.
        assert_eq!(lines(10).len(), 5, "{:#?}", lines(10));
        // 1 s: the round's line says it all.
        assert_eq!(lines(1), Vec::<String>::new());
    }

    #[test]
    fn a_pod_view_names_the_checkpoint_image() {
        let events: Vec<(f64, Event)> = recorded(SUCCESS)
            .into_iter()
            .map(|(at, e)| match e {
                Event::Done(mut s) => {
                    s.image = Some("localhost/checkpoint-kv:1".into());
                    (at, Event::Done(s))
                }
                e => (at, e),
            })
            .collect();
        let (stdout, text) = render_plain(&events, |sinks, clock| {
            View::with(&PEOPLE, false, sinks, clock).for_pods()
        });
        assert_eq!(stdout, "", "the Pod's result is cluster.rs's to print");
        assert!(
            text.contains("→ checkpoint: kubelet checkpoint (the container keeps running)"),
            "{text}"
        );
        assert_eq!(
            text.lines().last().unwrap(),
            "  kv: checkpoint image localhost/checkpoint-kv:1 on node2 in 6.4 s; checkpoint \
             200.7 MiB, 421.0 KiB over the wire (60.0 MiB in all, dedup ratio 488.3×)"
        );
    }

    #[test]
    fn a_failure_on_a_terminal_leaves_the_phases_and_the_error() {
        let term = FakeTerm::default();
        let clock = FakeClock::new();
        let mut view = on_terminal(&PEOPLE, &term, clock.clone());
        feed(&mut view, &clock, &recorded(FAILURE));
        assert!(view.live.is_none());
        let lines = term.lines();
        assert_eq!(
            lines[..4],
            [
                "✓ plan                0.1 s",
                "✓ checkpoint          0.9 s",
                "✗ transfer           11.4 s",
                "✓ rollback            1.0 s",
            ],
            "{lines:#?}"
        );
        assert!(lines[4].starts_with("error: the migration failed in phase transfer: "));
        assert_eq!(
            lines.last().unwrap(),
            "rolled back: the container runs on the source node as before"
        );
    }

    #[test]
    fn a_base_image_round_is_not_called_a_checkpoint() {
        assert_eq!(
            round_line(BASE_IMAGE_ROUND, 3 << 20, 1 << 20),
            "  3.0 MiB base image, 1.0 MiB sent, 2.0 MiB (66.7 %) saved by dedup"
        );
        assert_eq!(
            round_line(2, 1 << 20, 2 << 20),
            "  1.0 MiB checkpoint, 2.0 MiB sent, 0 B (0.0 %) saved by dedup"
        );
    }
}
