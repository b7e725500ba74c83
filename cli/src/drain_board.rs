//! A drain as a whole while it runs: how many containers have moved, which are moving and how
//! far each one is, and about how long the rest will take. On a terminal that is a live board
//! under the drain's log lines (a bar for the whole drain, then one line per moving
//! container); on a pipe, a status line whenever a container finishes and every
//! [`STATUS_EVERY`] between; with `--json`, the same as `"event":"progress"` objects.
//!
//! The time left is an estimate ([`Estimate`]). Each container's work counts as its bytes
//! (the memory it used when the drain listed it, replaced by its checkpoint's size once that
//! is known) plus [`FIXED_BYTES`] for the work that does not grow with size (planning,
//! restoring, cleaning up). How far a container is comes from its phase (each spans the share
//! of a migration it took in the lab's benchmark) and within it, while bytes move, from the
//! bytes sent, or in a checkpoint or a restore, from the time it has run against the time its
//! size should take. The drain's pace so far, applied to the work left, gives the time left.
//! Before [`MIN_ELAPSED`], or with less than [`MIN_DONE`] of the work done, it says so
//! instead of guessing.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::control::Phase;
use engine::runtime::ListedContainer;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::output::bytes;
use crate::progress::{duration, phase_label, write_line, Clock, Sinks, SystemClock};

/// The work of a migration that does not grow with the container's size, counted as bytes
/// (measured in the lab on 2026-12-04: a 2 MiB nginx takes about 1.1 s, a 1.3 GB redis about
/// 11.5 s, so the fixed part is worth about a tenth of that redis).
const FIXED_BYTES: u64 = 128 << 20;
/// Less of the work done than this, and the time left is not estimated.
const MIN_DONE: f64 = 0.03;
/// How fast CRIU writes a checkpoint here, and Podman restores one (BENCHMARKS.md,
/// 2026-12-04: 1.3 GB in about 1.7 s and 1.3 s): how long those phases, which report no
/// bytes, should take.
const CHECKPOINT_RATE: f64 = 768.0 * 1024.0 * 1024.0;
const RESTORE_RATE: f64 = 1024.0 * 1024.0 * 1024.0;
/// The share of a pre-copy round its checkpoint takes (0.7 s of 6.6 s); sending the rest.
const PRECOPY_CHECKPOINT: f64 = 0.1;
/// What a checkpoint or a restore takes however small the container.
const PHASE_FLOOR_SECONDS: f64 = 0.3;
/// A phase timed by its expected length counts at most this much of itself done until it
/// ends: one slower than expected stalls the estimate instead of overshooting.
const TIMED_CAP: f64 = 0.9;
/// Sooner than this after the start, and the time left is not estimated.
const MIN_ELAPSED: Duration = Duration::from_secs(2);
/// On a pipe and in JSON: a status this often, besides one when a container finishes.
pub(crate) const STATUS_EVERY: Duration = Duration::from_secs(10);

/// One container (or Pod) a drain migrates, and its bytes if known (its memory in use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Work {
    pub(crate) name: String,
    pub(crate) bytes: Option<u64>,
}

impl From<&ListedContainer> for Work {
    fn from(c: &ListedContainer) -> Self {
        Work {
            name: c.name.clone(),
            bytes: c.memory_bytes,
        }
    }
}

/// Where one container's migration is.
#[derive(Debug, Clone, PartialEq)]
enum Stage {
    /// Waiting for a slot under the concurrency limit.
    Waiting,
    Moving {
        phase: Phase,
        round: Option<u32>,
        /// When the phase began.
        since: Instant,
        /// The running round's bytes chunked and offered, and its archive's size.
        done: u64,
        total: u64,
        /// While it rolls back: how far it was when the rollback began.
        kept: Option<f64>,
    },
    Finished {
        moved: bool,
    },
}

#[derive(Debug, Clone)]
struct Item {
    name: String,
    /// Its bytes as best known: the checkpoint's size, else its memory.
    bytes: Option<u64>,
    /// Whether its migration had a pre-copy round (else what follows the plan spans it all).
    precopy: bool,
    /// The furthest it had come when its latest phase began: it never goes back from there
    /// (the next container of a Pod begins with its own plan).
    reached: f64,
    stage: Stage,
}

impl Item {
    /// How far its migration is at `now`, from 0 to 1; `mean` is the size it counts as when
    /// its own is unknown. Phases that send bytes go by the bytes sent; a checkpoint or a
    /// restore by the time it has run against the time its size should take.
    fn fraction(&self, now: Instant, mean: u64) -> f64 {
        let Stage::Moving {
            phase,
            since,
            done,
            total,
            kept,
            ..
        } = self.stage
        else {
            return match self.stage {
                Stage::Finished { .. } => 1.0,
                _ => 0.0,
            };
        };
        if let Some(kept) = kept {
            return kept;
        }
        let (start, span) = phase_span(phase);
        let bytes = self.bytes.unwrap_or(mean);
        let elapsed = now.saturating_duration_since(since);
        let sent = if total == 0 {
            0.0
        } else {
            (done as f64 / total as f64).min(1.0)
        };
        let part = match phase {
            // A pre-copy round checkpoints, then sends.
            Phase::Precopy if total > 0 => PRECOPY_CHECKPOINT + (1.0 - PRECOPY_CHECKPOINT) * sent,
            Phase::Precopy => PRECOPY_CHECKPOINT * timed(elapsed, bytes, CHECKPOINT_RATE),
            Phase::Checkpoint => timed(elapsed, bytes, CHECKPOINT_RATE),
            Phase::Restore => timed(elapsed, bytes, RESTORE_RATE),
            _ => sent,
        };
        let fraction = start + span * part;
        let (after_plan, _) = phase_span(Phase::Precopy);
        let (final_round, _) = phase_span(Phase::Checkpoint);
        let fraction = if self.precopy || fraction < final_round {
            fraction
        } else {
            // No pre-copy: from the final checkpoint on is all that is left after the plan.
            after_plan + (fraction - final_round) * (1.0 - after_plan) / (1.0 - final_round)
        };
        fraction.max(self.reached)
    }
}

/// Where a phase begins in a container's migration, and how much of it the phase spans,
/// as fractions: the lab's figures for a 1.3 GB redis (BENCHMARKS.md, 2026-12-04: plan 0.2 s,
/// pre-copy 6.6, checkpoint 1.7, transfer 1.2, restore 1.3, verify and cleanup 0.1, of 11 s).
fn phase_span(phase: Phase) -> (f64, f64) {
    match phase {
        Phase::Plan => (0.0, 0.02),
        Phase::StageImage => (0.02, 0.0),
        Phase::Precopy => (0.02, 0.60),
        Phase::Checkpoint => (0.62, 0.15),
        Phase::Transfer => (0.77, 0.11),
        Phase::Assemble => (0.88, 0.01),
        Phase::Restore => (0.89, 0.10),
        Phase::Verify => (0.99, 0.004),
        Phase::Cleanup | Phase::Rollback => (0.994, 0.006),
    }
}

/// How much of a phase that reports no bytes is done after `elapsed`, when `bytes` take
/// `bytes / rate` (at most [`TIMED_CAP`]).
fn timed(elapsed: Duration, bytes: u64, rate: f64) -> f64 {
    let expected = PHASE_FLOOR_SECONDS + bytes as f64 / rate;
    (elapsed.as_secs_f64() / expected).min(TIMED_CAP)
}

/// The drain's progress as numbers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Status {
    /// Always `"progress"`.
    pub(crate) event: &'static str,
    /// Containers the drain migrates (those that may move).
    pub(crate) containers: usize,
    pub(crate) moved: usize,
    pub(crate) failed: usize,
    pub(crate) moving: usize,
    pub(crate) waiting: usize,
    /// Of the estimated work, from 0 to 1.
    pub(crate) done_fraction: f64,
    pub(crate) seconds: f64,
    /// The estimated time left; `null` while too little is done to say.
    pub(crate) seconds_left: Option<f64>,
}

/// The drain's progress and the time it has left, from its containers' events.
#[derive(Debug, Clone)]
pub(crate) struct Estimate {
    started: Instant,
    items: Vec<Item>,
}

impl Estimate {
    /// The drain of `work` (what it migrates), started at `started`.
    pub(crate) fn new(started: Instant, work: &[Work]) -> Self {
        let items = work
            .iter()
            .map(|w| Item {
                name: w.name.clone(),
                bytes: w.bytes,
                precopy: false,
                reached: 0.0,
                stage: Stage::Waiting,
            })
            .collect();
        Self { started, items }
    }

    fn item(&mut self, name: &str) -> Option<&mut Item> {
        self.items.iter_mut().find(|i| i.name == name)
    }

    /// `name` began `phase` at `now`.
    pub(crate) fn phase(&mut self, name: &str, phase: Phase, round: Option<u32>, now: Instant) {
        let mean = self.mean_bytes();
        let Some(item) = self.item(name) else { return };
        item.reached = item.fraction(now, mean);
        item.precopy |= phase == Phase::Precopy;
        // A rollback keeps the ground it had: its work is done either way.
        let kept = (phase == Phase::Rollback).then_some(item.reached);
        item.stage = Stage::Moving {
            phase,
            round,
            since: now,
            done: 0,
            total: 0,
            kept,
        };
    }

    /// Bytes of `name`'s running round moved: `done` of `total`.
    pub(crate) fn progress(&mut self, name: &str, phase: Phase, done: u64, total: u64) {
        let Some(item) = self.item(name) else { return };
        if matches!(phase, Phase::Precopy | Phase::Transfer) && total > 0 {
            item.bytes = Some(total);
        }
        if let Stage::Moving {
            phase: running,
            done: d,
            total: t,
            ..
        } = &mut item.stage
        {
            if *running == phase {
                (*d, *t) = (done, total);
            }
        }
    }

    /// What `name`'s running phase is called (`pre-copy round 1`), while it moves.
    fn label(&self, name: &str) -> Option<String> {
        match self.items.iter().find(|i| i.name == name)?.stage {
            Stage::Moving { phase, round, .. } => Some(phase_label(phase, round)),
            _ => None,
        }
    }

    /// `name`'s migration ended: it moved, or failed.
    pub(crate) fn finished(&mut self, name: &str, moved: bool) {
        if let Some(item) = self.item(name) {
            item.stage = Stage::Finished { moved };
        }
    }

    /// The mean of the bytes known, which containers of unknown size count as.
    fn mean_bytes(&self) -> u64 {
        let known: Vec<u64> = self.items.iter().filter_map(|i| i.bytes).collect();
        known
            .iter()
            .sum::<u64>()
            .checked_div(known.len() as u64)
            .unwrap_or(0)
    }

    /// Each container's work: its bytes (the mean when unknown) and the fixed share.
    fn weights(&self) -> Vec<f64> {
        let mean = self.mean_bytes();
        self.items
            .iter()
            .map(|i| (FIXED_BYTES + i.bytes.unwrap_or(mean)) as f64)
            .collect()
    }

    /// How much of the drain's work is done at `now`, from 0 to 1.
    pub(crate) fn fraction(&self, now: Instant) -> f64 {
        let weights = self.weights();
        let all: f64 = weights.iter().sum();
        if all == 0.0 {
            return 1.0;
        }
        let mean = self.mean_bytes();
        let done: f64 = self
            .items
            .iter()
            .zip(&weights)
            .map(|(i, w)| w * i.fraction(now, mean))
            .sum();
        done / all
    }

    /// The time left at `now`, at the pace so far; `None` while too little is done to say.
    pub(crate) fn left(&self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.started);
        let fraction = self.fraction(now);
        if fraction >= 1.0 {
            return Some(Duration::ZERO);
        }
        if fraction < MIN_DONE || elapsed < MIN_ELAPSED {
            return None;
        }
        Some(elapsed.mul_f64((1.0 - fraction) / fraction))
    }

    /// The numbers at `now`.
    pub(crate) fn status(&self, now: Instant) -> Status {
        let count = |f: fn(&Stage) -> bool| self.items.iter().filter(|i| f(&i.stage)).count();
        Status {
            event: "progress",
            containers: self.items.len(),
            moved: count(|s| matches!(s, Stage::Finished { moved: true })),
            failed: count(|s| matches!(s, Stage::Finished { moved: false })),
            moving: count(|s| matches!(s, Stage::Moving { .. })),
            waiting: count(|s| matches!(s, Stage::Waiting)),
            done_fraction: self.fraction(now),
            seconds: now.saturating_duration_since(self.started).as_secs_f64(),
            seconds_left: self.left(now).map(|d| d.as_secs_f64()),
        }
    }

    /// `1 of 3 moved, 2 moving, 0 waiting; 45 % done, about 25 s left`.
    pub(crate) fn words(&self, now: Instant) -> String {
        let s = self.status(now);
        let mut words = format!("{} of {} moved", s.moved, s.containers);
        if s.failed > 0 {
            words += &format!(", {} failed", s.failed);
        }
        if s.moving + s.waiting > 0 {
            words += &format!(", {} moving, {} waiting", s.moving, s.waiting);
        }
        words += &format!("; {:.0} % done", s.done_fraction * 100.0);
        match s.seconds_left {
            Some(left) if left > 0.0 => words += &format!(", about {} left", duration(left)),
            Some(_) => {}
            None => words += ", too early to say how long the rest takes",
        }
        words
    }

    /// The live bar's words, most telling first, to fit 80 columns: `45 % · about 25 s left
    /// · 1/3 moved`.
    pub(crate) fn short_words(&self, now: Instant) -> String {
        let s = self.status(now);
        let mut words = format!("{:.0} %", s.done_fraction * 100.0);
        match s.seconds_left {
            Some(left) if left > 0.0 => words += &format!(" · about {} left", duration(left)),
            Some(_) => {}
            None => words += " · estimating time left",
        }
        words += &format!(" · {}/{} moved", s.moved, s.containers);
        if s.failed > 0 {
            words += &format!(", {} failed", s.failed);
        }
        words
    }

    /// Where each moving container is: `web (transfer, 45 %)`.
    fn moving_words(&self) -> Vec<String> {
        self.items
            .iter()
            .filter_map(|i| match &i.stage {
                Stage::Moving {
                    phase,
                    round,
                    done,
                    total,
                    ..
                } => {
                    let mut what = phase_label(*phase, *round);
                    if *total > 0 {
                        what += &format!(", {} %", done * 100 / total);
                    }
                    Some(format!("{} ({what})", i.name))
                }
                _ => None,
            })
            .collect()
    }
}

/// How much a [`Board`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Show {
    /// `-q`: nothing.
    Nothing,
    /// Log lines and status, for people.
    People,
    /// `--json`: status objects on stdout, no words.
    Json,
}

impl Show {
    /// What `--json` and `-q` ask for.
    pub(crate) fn of(json: bool, quiet: bool) -> Self {
        match (json, quiet) {
            (true, _) => Show::Json,
            (false, true) => Show::Nothing,
            (false, false) => Show::People,
        }
    }
}

/// What a drain shows while it runs; shared by its migrations' tasks.
pub(crate) struct Board {
    inner: Mutex<Inner>,
}

struct Inner {
    estimate: Estimate,
    clock: Arc<dyn Clock>,
    sinks: Sinks,
    show: Show,
    /// `node1 → node2`.
    title: String,
    /// When the last status line (or JSON status) was written.
    last_status: Instant,
    /// On a terminal: the live board.
    live: Option<Live>,
}

/// The live board: the drain's bar and one line per moving container.
struct Live {
    multi: MultiProgress,
    overall: ProgressBar,
    moving: HashMap<String, ProgressBar>,
    /// The longest container name: the lines' messages start in one column.
    name_width: usize,
    steady_tick: bool,
}

impl Board {
    /// The board of a drain called `title` (`node1 → node2`) of `work` (what it migrates),
    /// shown as `show` says into `sinks` (live when they hold a terminal), timed by `clock`;
    /// `steady_tick` animates the spinners between events (off in tests).
    pub(crate) fn new(
        title: &str,
        work: &[Work],
        show: Show,
        sinks: Sinks,
        clock: Arc<dyn Clock>,
        steady_tick: bool,
    ) -> Self {
        let now = clock.now();
        let live = match (&sinks.terminal, show) {
            (Some(target), Show::People) => {
                let multi = MultiProgress::with_draw_target(target());
                let overall = multi.add(
                    ProgressBar::new(1000)
                        .with_style(overall_style())
                        .with_prefix(title.to_string()),
                );
                Some(Live {
                    multi,
                    overall,
                    moving: HashMap::new(),
                    name_width: work
                        .iter()
                        .map(|w| w.name.chars().count())
                        .max()
                        .unwrap_or(0),
                    steady_tick,
                })
            }
            _ => None,
        };
        let inner = Inner {
            estimate: Estimate::new(now, work),
            clock,
            sinks,
            show,
            title: title.to_string(),
            last_status: now,
            live,
        };
        inner.redraw(now);
        Self {
            inner: Mutex::new(inner),
        }
    }

    /// The board of a drain on this process's stdout and stderr ([`Sinks::standard`]).
    pub(crate) fn on_stderr(title: &str, work: &[Work], show: Show) -> Self {
        let sinks = Sinks::standard();
        let live = sinks.terminal.is_some();
        Self::new(title, work, show, sinks, Arc::new(SystemClock), live)
    }

    /// The board, its drain having started at `started` (before the board was made): the
    /// stamps and the pace count from there.
    pub(crate) fn started_at(self, started: Instant) -> Self {
        self.lock().estimate.started = started;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A log line, stamped with the seconds since the drain started (above the live board).
    pub(crate) fn say(&self, text: &str) {
        let mut inner = self.lock();
        if inner.show == Show::People {
            let now = inner.clock.now();
            let secs = now
                .saturating_duration_since(inner.estimate.started)
                .as_secs_f64();
            inner.line(&format!("[{secs:6.1}s] {text}"));
        }
    }

    /// An error in words on stderr, whatever the board shows (`-q` and `--json` included).
    pub(crate) fn error(&self, text: &str) {
        self.lock().line(text);
    }

    /// `name` began `phase`; `what` says what it does.
    pub(crate) fn phase(&self, name: &str, phase: Phase, round: Option<u32>, what: &str) {
        let mut inner = self.lock();
        let now = inner.clock.now();
        inner.estimate.phase(name, phase, round, now);
        if let Some(live) = &mut inner.live {
            let bar = live.moving.entry(name.to_string()).or_insert_with(|| {
                let bar = live.multi.add(
                    ProgressBar::new_spinner()
                        .with_style(container_style(live.name_width))
                        .with_prefix(name.to_string()),
                );
                if live.steady_tick {
                    bar.enable_steady_tick(Duration::from_millis(100));
                }
                bar
            });
            bar.set_message(what.to_string());
        }
        inner.redraw(now);
    }

    /// Bytes of `name`'s running round moved.
    pub(crate) fn progress(&self, name: &str, phase: Phase, done: u64, total: u64) {
        let mut inner = self.lock();
        inner.estimate.progress(name, phase, done, total);
        let now = inner.clock.now();
        let label = inner.estimate.label(name);
        if let (Some(bar), Some(label)) =
            (inner.live.as_ref().and_then(|l| l.moving.get(name)), label)
        {
            let percent = (done * 100).checked_div(total).unwrap_or(0);
            bar.set_message(format!(
                "{label} · {}/{} ({percent} %)",
                bytes(done),
                bytes(total)
            ));
        }
        inner.redraw(now);
    }

    /// `name`'s migration ended; on a pipe and in JSON, the drain's status follows.
    pub(crate) fn finished(&self, name: &str, moved: bool) {
        let mut inner = self.lock();
        inner.estimate.finished(name, moved);
        let now = inner.clock.now();
        if let Some(bar) = inner.live.as_mut().and_then(|l| l.moving.remove(name)) {
            bar.finish_and_clear();
        }
        inner.redraw(now);
        inner.status(now);
    }

    /// Time passed: the live board's time left moves; on a pipe and in JSON, a status when
    /// the last is [`STATUS_EVERY`] old.
    pub(crate) fn tick(&self) {
        let mut inner = self.lock();
        let now = inner.clock.now();
        inner.redraw(now);
        if now.saturating_duration_since(inner.last_status) >= STATUS_EVERY {
            inner.status(now);
        }
    }

    /// The drain is over: the live board goes (the log lines stay).
    pub(crate) fn close(&self) {
        let mut inner = self.lock();
        if let Some(live) = inner.live.take() {
            for bar in live.moving.values() {
                bar.finish_and_clear();
            }
            live.overall.finish_and_clear();
            let _ = live.multi.clear();
        }
    }
}

impl Inner {
    /// A line on stderr, above the live board when there is one.
    fn line(&mut self, text: &str) {
        let err = &mut self.sinks.err;
        match &self.live {
            Some(live) => live.multi.suspend(|| write_line(err, text)),
            None => write_line(err, text),
        }
    }

    /// The live board's drain bar, as of `now`.
    fn redraw(&self, now: Instant) {
        if let Some(live) = &self.live {
            let fraction = self.estimate.fraction(now);
            live.overall
                .set_position((fraction * 1000.0).round() as u64);
            live.overall.set_message(self.estimate.short_words(now));
        }
    }

    /// The drain's status: a line on a pipe, an object in JSON (none on a terminal, whose
    /// board shows it, nor with `-q`).
    fn status(&mut self, now: Instant) {
        self.last_status = now;
        match (self.show, self.live.is_some()) {
            (Show::Json, _) => {
                let line = serde_json::to_string(&self.estimate.status(now))
                    .expect("the status serializes");
                let _ = writeln!(self.sinks.out, "{line}");
                let _ = self.sinks.out.flush();
            }
            (Show::People, false) => {
                let secs = now
                    .saturating_duration_since(self.estimate.started)
                    .as_secs_f64();
                let mut text = format!(
                    "[{secs:6.1}s] drain {}: {}",
                    self.title,
                    self.estimate.words(now)
                );
                let moving = self.estimate.moving_words();
                if !moving.is_empty() {
                    text += &format!("; moving: {}", moving.join(", "));
                }
                self.line(&text);
            }
            _ => {}
        }
    }
}

/// The drain's bar: `node1 → node2 [=====>    ] 45 % · about 25 s left · 1/3 moved`.
fn overall_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{bar:20}] {wide_msg}")
        .expect("valid template")
        .progress_chars("=> ")
}

/// A moving container's line, its name padded to `width`: `  ⠋ web  transfer · 120.0
/// MiB/300.0 MiB (40 %)`.
fn container_style(width: usize) -> ProgressStyle {
    ProgressStyle::with_template(&format!("  {{spinner}} {{prefix:{width}}}  {{wide_msg}}"))
        .expect("valid template")
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::testing::{Buffer, FakeClock, FakeTerm};

    const MIB: u64 = 1 << 20;

    fn container(name: &str, memory: Option<u64>) -> Work {
        Work {
            name: name.into(),
            bytes: memory,
        }
    }

    fn at(base: Instant, secs: f64) -> Instant {
        base + Duration::from_secs_f64(secs)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn the_time_left_is_the_pace_so_far_applied_to_the_work_left() {
        let t0 = Instant::now();
        // Two containers of equal work (64 MiB of memory each, plus the fixed share).
        let both = [
            container("a", Some(64 * MIB)),
            container("b", Some(64 * MIB)),
        ];
        let mut e = Estimate::new(t0, &both);
        assert_eq!(e.fraction(t0), 0.0);
        assert_eq!(e.left(at(t0, 5.0)), None, "nothing done: no guess");

        e.phase("a", Phase::Plan, None, t0);
        e.phase("a", Phase::Transfer, None, at(t0, 1.0));
        e.progress("a", Phase::Transfer, 64 * MIB, 64 * MIB);
        // a has sent everything: the transfer's end, 0.88, in a migration with a pre-copy
        // round; without one, what follows the plan (0.02) spans the rest.
        let a = 0.02 + (0.88 - 0.62) * 0.98 / 0.38;
        let now = at(t0, 10.0);
        assert!(close(e.fraction(now), a / 2.0), "{}", e.fraction(now));
        assert_eq!(e.left(at(t0, 1.0)), None, "too soon to guess");
        let left = e.left(now).unwrap().as_secs_f64();
        assert!(close(left, 10.0 * (1.0 - a / 2.0) / (a / 2.0)), "{left}");

        e.finished("a", true);
        e.finished("b", false);
        assert_eq!(e.fraction(now), 1.0);
        assert_eq!(e.left(at(t0, 20.0)), Some(Duration::ZERO));
        let s = e.status(at(t0, 20.0));
        assert_eq!((s.moved, s.failed, s.moving, s.waiting), (1, 1, 0, 0));
    }

    #[test]
    fn bytes_sent_and_time_in_a_checkpoint_move_a_container_on() {
        let t0 = Instant::now();
        let mut e = Estimate::new(t0, &[container("big", Some(MIB)), container("x", None)]);
        e.phase("big", Phase::Precopy, Some(1), t0);
        // Checkpointing: at the phase's start; x counts as the mean size, so they weigh alike.
        assert!(close(e.fraction(t0), 0.01), "{}", e.fraction(t0));
        // 1 MiB should take 0.3 s to checkpoint: after 10 s it is counted 90 % done, no more
        // (the checkpoint is a tenth of a pre-copy round).
        let late = at(t0, 10.0);
        assert!(close(e.fraction(late), (0.02 + 0.60 * 0.09) / 2.0));
        // The pre-copy archive is 1 GiB, not the 1 MiB of memory listed: it now weighs that.
        e.progress("big", Phase::Precopy, 512 * MIB, 1024 * MIB);
        let w = e.weights();
        assert_eq!(w[0], (FIXED_BYTES + 1024 * MIB) as f64);
        assert_eq!(w[1], w[0], "the unknown one counts as the mean");
        // big: 0.02 + 0.60 × (0.1 + 0.9 × 0.5) of its work, half the drain's.
        let precopy = (0.02 + 0.60 * 0.55) / 2.0;
        assert!(close(e.fraction(late), precopy), "{}", e.fraction(late));
        // Bytes of another phase than the running one do not move it.
        e.progress("big", Phase::Transfer, 1024 * MIB, 1024 * MIB);
        assert!(close(e.fraction(late), precopy));
        // The final checkpoint of 1 GiB should take 0.3 + 4/3 s: after 1 s, 1 / 1.633 of it.
        e.phase("big", Phase::Checkpoint, None, late);
        let during = at(t0, 11.0);
        let checkpointing = (0.62 + 0.15 * 1.0 / (0.3 + 4.0 / 3.0)) / 2.0;
        assert!(
            close(e.fraction(during), checkpointing),
            "{}",
            e.fraction(during)
        );
        // A rollback keeps the ground gained; the end counts it whole.
        e.phase("big", Phase::Rollback, None, during);
        assert!(close(e.fraction(at(t0, 100.0)), checkpointing));
        e.finished("big", false);
        assert!(close(e.fraction(during), 0.5));
    }

    #[test]
    fn a_pod_s_second_container_does_not_take_it_back() {
        let t0 = Instant::now();
        let mut e = Estimate::new(t0, &[container("shop/web", None)]);
        for phase in [Phase::Plan, Phase::Checkpoint, Phase::Transfer] {
            e.phase("shop/web", phase, None, t0);
        }
        e.progress("shop/web", Phase::Transfer, 10, 10);
        let first = e.fraction(t0);
        assert!(first > 0.5, "{first}");
        // The sidecar's migration begins with its own plan and checkpoint.
        e.phase("shop/web", Phase::Plan, None, t0);
        e.phase("shop/web", Phase::Checkpoint, None, t0);
        assert_eq!(e.fraction(t0), first);
        // Past where the first had come, it moves on again.
        e.phase("shop/web", Phase::Restore, None, t0);
        assert!(e.fraction(at(t0, 1.0)) > first);
    }

    #[test]
    fn the_words_say_counts_and_the_time_left_or_that_it_is_too_early() {
        let t0 = Instant::now();
        let mut e = Estimate::new(
            t0,
            &[
                container("a", Some(0)),
                container("b", Some(0)),
                container("c", Some(0)),
            ],
        );
        assert_eq!(
            e.words(t0),
            "0 of 3 moved, 0 moving, 3 waiting; 0 % done, too early to say how long the rest \
             takes"
        );
        e.phase("a", Phase::Plan, None, t0);
        e.finished("a", true);
        e.phase("b", Phase::Transfer, None, t0);
        e.progress("b", Phase::Transfer, 20, 100);
        // a whole, b at 0.464 (0.792 with a pre-copy round, which it did not have): 1.464 / 3
        // of the work in 16 s, so 16.8 s left.
        assert_eq!(
            e.words(at(t0, 16.0)),
            "1 of 3 moved, 1 moving, 1 waiting; 49 % done, about 17 s left"
        );
        assert_eq!(e.moving_words(), ["b (transfer, 20 %)"]);
        e.finished("b", false);
        e.phase("c", Phase::Plan, None, t0);
        e.finished("c", true);
        assert_eq!(e.words(at(t0, 30.0)), "2 of 3 moved, 1 failed; 100 % done");
    }

    /// A board from node1 to node2 writing into `out` and `err`, as on a pipe.
    fn piped(
        work: &[Work],
        show: Show,
        out: &Buffer,
        err: &Buffer,
        clock: &Arc<FakeClock>,
    ) -> Board {
        let sinks = Sinks {
            out: Box::new(out.clone()),
            err: Box::new(err.clone()),
            terminal: None,
        };
        Board::new("node1 → node2", work, show, sinks, clock.clone(), false)
    }

    #[test]
    fn a_pipe_gets_a_status_line_when_one_finishes_and_every_ten_seconds() {
        let (out, err) = (Buffer::default(), Buffer::default());
        let clock = FakeClock::new();
        let two = [container("a", Some(0)), container("b", Some(0))];
        let board = piped(&two, Show::People, &out, &err, &clock);
        board.say("a: plan");
        board.phase("a", Phase::Plan, None, "plan");
        board.phase("b", Phase::Precopy, Some(1), "pre-copy round 1");
        clock.set(4.0);
        board.phase("a", Phase::Restore, None, "restoring");
        board.tick();
        clock.set(5.0);
        board.finished("a", true);
        clock.set(12.0);
        board.tick(); // 7 s after the last status: nothing
        clock.set(15.0);
        board.progress("b", Phase::Precopy, 50, 100);
        board.tick();
        board.close();
        assert_eq!(
            err.text().lines().collect::<Vec<_>>(),
            [
                "[   0.0s] a: plan",
                "[   5.0s] drain node1 → node2: 1 of 2 moved, 1 moving, 0 waiting; 54 % done, \
                 about 5 s left; moving: b (pre-copy round 1)",
                "[  15.0s] drain node1 → node2: 1 of 2 moved, 1 moving, 0 waiting; 67 % done, \
                 about 8 s left; moving: b (pre-copy round 1, 50 %)",
            ]
        );
        assert_eq!(out.text(), "", "stdout is for the table and the summary");
    }

    #[test]
    fn json_gets_status_objects_and_no_words() {
        let (out, err) = (Buffer::default(), Buffer::default());
        let clock = FakeClock::new();
        let board = piped(&[container("a", None)], Show::Json, &out, &err, &clock);
        board.say("a: plan");
        board.phase("a", Phase::Plan, None, "plan");
        clock.set(3.0);
        board.finished("a", true);
        assert_eq!(err.text(), "");
        let lines: Vec<Value> = out
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [serde_json::json!({
                "event": "progress", "containers": 1, "moved": 1, "failed": 0, "moving": 0,
                "waiting": 0, "done_fraction": 1.0, "seconds": 3.0, "seconds_left": 0.0
            })]
        );
    }

    #[test]
    fn quiet_shows_nothing() {
        let (out, err) = (Buffer::default(), Buffer::default());
        let clock = FakeClock::new();
        let board = piped(&[container("a", None)], Show::Nothing, &out, &err, &clock);
        board.say("a: plan");
        board.finished("a", true);
        clock.set(30.0);
        board.tick();
        assert_eq!((out.text(), err.text()), (String::new(), String::new()));
    }

    #[test]
    fn a_terminal_gets_a_live_board_under_the_log_lines() {
        let term = FakeTerm::default();
        let clock = FakeClock::new();
        let sinks = term.sinks();
        let two = [container("web", Some(0)), container("db", Some(0))];
        let board = Board::new(
            "node1 → node2",
            &two,
            Show::People,
            sinks,
            clock.clone(),
            false,
        );
        board.say("web: plan");
        board.phase("web", Phase::Plan, None, "plan: checking it and node2");
        board.phase("db", Phase::Plan, None, "plan: checking it and node2");
        clock.set(5.0);
        board.phase("web", Phase::Transfer, None, "sending what changed");
        board.progress("web", Phase::Transfer, 30 * MIB, 60 * MIB);
        board.say("db: final checkpoint (it stops)");
        board.phase("db", Phase::Checkpoint, None, "final checkpoint (it stops)");
        board.tick();
        let screen = term.lines();
        assert_eq!(screen[0], "[   0.0s] web: plan");
        assert_eq!(screen[1], "[   5.0s] db: final checkpoint (it stops)");
        // Neither had a pre-copy round, so what follows the plan is all their work: web is at
        // 0.549 of its own (and weighs its 60 MiB archive), db 0.02 (the fixed share).
        assert!(
            screen[2].starts_with("node1 → node2 [======>    ")
                && screen[2].ends_with("] 33 % · about 10 s left · 0/2 moved"),
            "{screen:#?}"
        );
        assert_eq!(screen[3], "  ⠁ web  transfer · 30.0 MiB/60.0 MiB (50 %)");
        assert_eq!(screen[4], "  ⠁ db   final checkpoint (it stops)");
        clock.set(8.0);
        board.finished("web", true);
        board.finished("db", true);
        board.close();
        let screen = term.lines();
        assert_eq!(
            screen,
            [
                "[   0.0s] web: plan",
                "[   5.0s] db: final checkpoint (it stops)"
            ],
            "the board goes at the end; the log stays"
        );
    }
}
