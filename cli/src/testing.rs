//! Test doubles shared by the CLI's unit tests: a clock the test sets, a writer the test
//! reads back, and a fake terminal that keeps what indicatif draws as a grid of characters,
//! so a test sees the screen a person would.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressDrawTarget, TermLike};

use crate::progress::{Clock, Sinks};

/// A clock the test sets.
pub(crate) struct FakeClock {
    base: Instant,
    at: Mutex<Duration>,
}

impl FakeClock {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            at: Mutex::new(Duration::ZERO),
        })
    }

    pub(crate) fn set(&self, secs: f64) {
        *self.at.lock().unwrap() = Duration::from_secs_f64(secs);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.base + *self.at.lock().unwrap()
    }
}

/// A writer whose bytes the test reads afterwards.
#[derive(Clone, Default)]
pub(crate) struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A terminal as a grid of characters with a cursor, as far as indicatif and plain
/// writes move it: what a person would see at each moment.
#[derive(Debug, Default)]
struct Grid {
    rows: Vec<Vec<char>>,
    row: usize,
    col: usize,
}

const WIDTH: usize = 120;

impl Grid {
    fn put(&mut self, s: &str) {
        for c in s.chars() {
            match c {
                '\n' => {
                    self.row += 1;
                    self.col = 0;
                }
                '\r' => self.col = 0,
                c => {
                    if self.col >= WIDTH {
                        self.row += 1;
                        self.col = 0;
                    }
                    self.cell(c);
                    self.col += 1;
                }
            }
        }
    }

    fn cell(&mut self, c: char) {
        while self.rows.len() <= self.row {
            self.rows.push(Vec::new());
        }
        let line = &mut self.rows[self.row];
        while line.len() <= self.col {
            line.push(' ');
        }
        line[self.col] = c;
    }

    /// The screen's lines, trailing blanks cut, empty lines at the end dropped.
    fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .rows
            .iter()
            .map(|r| r.iter().collect::<String>().trim_end().to_string())
            .collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }
}

/// Writes (both stdout and stderr) and indicatif's drawing, on one [`Grid`].
#[derive(Debug, Clone, Default)]
pub(crate) struct FakeTerm(Arc<Mutex<Grid>>);

impl FakeTerm {
    pub(crate) fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().lines()
    }

    /// Stdout, stderr and live lines all on this terminal.
    pub(crate) fn sinks(&self) -> Sinks {
        let target = self.clone();
        Sinks {
            out: Box::new(self.clone()),
            err: Box::new(self.clone()),
            terminal: Some(Box::new(move || {
                ProgressDrawTarget::term_like(Box::new(target.clone()))
            })),
        }
    }
}

impl TermLike for FakeTerm {
    fn width(&self) -> u16 {
        WIDTH as u16
    }

    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        let mut g = self.0.lock().unwrap();
        g.row = g.row.saturating_sub(n);
        Ok(())
    }

    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.0.lock().unwrap().row += n;
        Ok(())
    }

    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        self.0.lock().unwrap().col += n;
        Ok(())
    }

    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        let mut g = self.0.lock().unwrap();
        g.col = g.col.saturating_sub(n);
        Ok(())
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.0.lock().unwrap().put(&format!("{s}\n"));
        Ok(())
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.0.lock().unwrap().put(s);
        Ok(())
    }

    fn clear_line(&self) -> std::io::Result<()> {
        let mut g = self.0.lock().unwrap();
        let row = g.row;
        if let Some(line) = g.rows.get_mut(row) {
            line.clear();
        }
        g.col = 0;
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Write for FakeTerm {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap()
            .put(std::str::from_utf8(buf).unwrap());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
