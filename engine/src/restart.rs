//! Sleeps that survive a checkpoint. When CRIU dumps a task blocked in a system call that the
//! kernel restarts through its restart block (`nanosleep`, `clock_nanosleep`, `poll` and
//! `futex` with a timeout: they return `-ERESTART_RESTARTBLOCK` when interrupted), it cannot
//! keep that restart: compel saves the task's registers with the call returning `EINTR`
//! (`Will restore PID with interrupted system call` in dump.log). Both the task CRIU leaves
//! running (`--leave-running`, our pre-copy rounds) and every copy restored from the
//! checkpoint see the call fail with `EINTR`. A program that does not retry ends there:
//! busybox `sleep` (glibc's `sleep(3)` returns early) exits 0, so a container whose PID 1 is
//! `sleep` stops during a pre-copy checkpoint and stops again right after every restore.
//!
//! [`rewind_archive`] repairs a checkpoint archive in place. For each thread whose saved
//! registers show such a call failing with `EINTR`, it sets them back to the system call
//! instruction with the call's number, as the kernel itself restarts an interrupted call (and
//! as CRIU does for `-ERESTARTSYS`): the restored task enters the call again. `nanosleep` and
//! `clock_nanosleep` wrote the time left into their second timespec when they were
//! interrupted, and glibc's `sleep(3)` passes the same timespec twice, so it sleeps what was
//! left; the others wait their whole timeout again, which a timeout allows. The registers are
//! protobuf varints in the `checkpoint/core-TID.img` files; they are rewritten with as many
//! bytes as before (a varint may carry redundant continuation bytes), so the archive keeps
//! its size and layout and only those bytes change.
//!
//! Not repaired, but reported as [`Rewound::left`]: a thread interrupted in `restart_syscall`
//! (the kernel was already restarting a sleep stopped earlier, by a pause for instance, and the
//! original call's number is gone) and 32-bit tasks. Only x86_64 images are read; others are
//! left as they are.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Component, Path};

use tracing::warn;

/// CRIU's magic at the start of every image but the inventory (`IMG_COMMON_MAGIC`).
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// The magic of a `core-TID.img` (`CORE_MAGIC`).
const CORE_MAGIC: u32 = 0x5505_3847;
/// `core_entry.mtype` of an x86_64 image.
const MARCH_X86_64: u64 = 1;
/// `user_x86_regs_entry.mode` of a 32-bit task.
const MODE_COMPAT: u64 = 2;
/// `-EINTR` as the 64-bit register CRIU saves.
const EINTR_RETURN: u64 = -4i64 as u64;
/// Bytes of the x86_64 `syscall` instruction the saved `ip` is just past.
const SYSCALL_INSN_LEN: u64 = 2;
/// x86_64 `restart_syscall`: the kernel restarting a call whose number it no longer has.
const RESTART_SYSCALL: u64 = 219;
/// A core image larger than this is not one: left alone.
const MAX_CORE_BYTES: u64 = 16 << 20;

/// x86_64 calls that return `-ERESTART_RESTARTBLOCK` when interrupted, so CRIU turns them
/// into `EINTR`; re-entering them is what the kernel's own restart amounts to.
const RESTARTABLE: [(u64, &str); 4] = [
    (7, "poll"),
    (35, "nanosleep"),
    (202, "futex"),
    (230, "clock_nanosleep"),
];

/// One thread of a checkpoint that CRIU interrupted in a system call it cannot resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted {
    /// The thread's ID in the container's PID namespace (the `TID` of `core-TID.img`).
    pub tid: u32,
    /// The x86_64 system call number.
    pub syscall: u64,
}

impl Interrupted {
    /// The system call's name, or `syscall N` for one not listed here.
    pub fn syscall_name(&self) -> String {
        if self.syscall == RESTART_SYSCALL {
            return "restart_syscall".to_string();
        }
        RESTARTABLE
            .iter()
            .find(|(n, _)| *n == self.syscall)
            .map_or_else(
                || format!("syscall {}", self.syscall),
                |(_, name)| name.to_string(),
            )
    }
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in PID {}", self.syscall_name(), self.tid)
    }
}

/// What [`rewind_archive`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewound {
    /// Threads set to enter their call again when restored.
    pub rewound: Vec<Interrupted>,
    /// Threads CRIU interrupted that could not be set back: restored, they see `EINTR`.
    pub left: Vec<Interrupted>,
}

impl Rewound {
    /// Whether the checkpoint interrupted a call of any thread (so the task CRIU left
    /// running, if it did, saw `EINTR`).
    pub fn interrupted_any(&self) -> bool {
        !self.rewound.is_empty() || !self.left.is_empty()
    }
}

/// Lists threads as `clock_nanosleep in PID 1, poll in PID 7`.
pub fn list(threads: &[Interrupted]) -> String {
    threads
        .iter()
        .map(Interrupted::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one core image held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The call was interrupted and its registers are set back to enter it again.
    Rewound(u64),
    /// The call was interrupted and cannot be set back.
    Left(u64),
}

/// Makes every thread of the checkpoint archive at `path` (an uncompressed tar holding
/// `checkpoint/core-TID.img`, as podman and the kubelet write it) that CRIU interrupted in a
/// restartable call enter it again when restored, rewriting those bytes in place. A core
/// image that does not parse is left as it is (and logged): the restore will judge it.
pub fn rewind_archive(path: &Path) -> io::Result<Rewound> {
    let mut cores = Vec::new();
    {
        let mut archive = tar::Archive::new(BufReader::new(File::open(path)?));
        for entry in archive.entries_with_seek()? {
            let entry = entry?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            if let Some(tid) = core_tid(&entry.path()?) {
                cores.push((tid, entry.raw_file_position(), entry.size()));
            }
        }
    }
    let mut report = Rewound::default();
    if cores.is_empty() {
        return Ok(report);
    }
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    for (tid, offset, size) in cores {
        if size > MAX_CORE_BYTES {
            warn!(tid, size, "a core image too large to be one; left as it is");
            continue;
        }
        let mut image = vec![0; size as usize];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut image)?;
        if rewind_one(tid, &mut image, &mut report) {
            file.seek(SeekFrom::Start(offset))?;
            file.write_all(&image)?;
        }
    }
    file.flush()?;
    Ok(report)
}

/// [`rewind_archive`] for a CRIU images folder (as a runtime keeps it, see
/// [`crate::runtime::Runtime::checkpoint_kept`]): rewrites its `core-TID.img` files in place.
pub fn rewind_dir(dir: &Path) -> io::Result<Rewound> {
    let mut report = Rewound::default();
    let mut cores = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name();
        if let Some(tid) = core_tid(&Path::new("checkpoint").join(&name)) {
            cores.push((tid, entry.path()));
        }
    }
    cores.sort();
    for (tid, path) in cores {
        let size = std::fs::metadata(&path)?.len();
        if size > MAX_CORE_BYTES {
            warn!(tid, size, "a core image too large to be one; left as it is");
            continue;
        }
        let mut image = std::fs::read(&path)?;
        if rewind_one(tid, &mut image, &mut report) {
            let mut file = OpenOptions::new().write(true).open(&path)?;
            file.write_all(&image)?;
            file.flush()?;
        }
    }
    Ok(report)
}

/// Rewinds one core image into `report`; whether its bytes changed.
fn rewind_one(tid: u32, image: &mut [u8], report: &mut Rewound) -> bool {
    match rewind_core(image) {
        Ok(Some(Outcome::Rewound(syscall))) => {
            report.rewound.push(Interrupted { tid, syscall });
            true
        }
        Ok(Some(Outcome::Left(syscall))) => {
            report.left.push(Interrupted { tid, syscall });
            false
        }
        Ok(None) => false,
        Err(reason) => {
            warn!(tid, reason, "a core image did not parse; left as it is");
            false
        }
    }
}

/// The `TID` of an archive entry `checkpoint/core-TID.img`.
fn core_tid(path: &Path) -> Option<u32> {
    let parts: Vec<_> = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    let [Component::Normal(dir), Component::Normal(file)] = parts[..] else {
        return None;
    };
    if dir != "checkpoint" {
        return None;
    }
    let tid = file.to_str()?.strip_prefix("core-")?.strip_suffix(".img")?;
    if tid.is_empty() || !tid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    tid.parse().ok()
}

/// Rewinds the interrupted call of one core image in place (its length never changes).
/// `Ok(None)`: nothing to do (no interrupted call, or not an x86_64 image).
pub fn rewind_core(image: &mut [u8]) -> Result<Option<Outcome>, &'static str> {
    let word = |at: usize| -> Result<u32, &'static str> {
        let bytes = image.get(at..at + 4).ok_or("shorter than its header")?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    };
    if word(0)? != IMG_COMMON_MAGIC || word(4)? != CORE_MAGIC {
        return Err("not a CRIU core image (magic)");
    }
    let len = word(8)? as usize;
    let entry = 12..12usize.checked_add(len).ok_or("entry size overflows")?;
    if entry.end > image.len() {
        return Err("the entry runs past the image");
    }
    let core = fields(image, entry)?;
    if varint_field(&core, 1).map(|(v, _)| v) != Some(MARCH_X86_64) {
        return Ok(None);
    }
    let Some(thread_info) = bytes_field(&core, 2) else {
        return Ok(None);
    };
    let Some(gpregs) = bytes_field(&fields(image, thread_info)?, 2) else {
        return Err("thread_info without gpregs");
    };
    let regs = fields(image, gpregs)?;
    let reg = |n| varint_field(&regs, n).ok_or("a register is missing");
    let (ax, ax_at) = reg(11)?;
    let (orig_ax, _) = reg(16)?;
    let (ip, ip_at) = reg(17)?;
    // Not stopped in a system call, or not one CRIU made return EINTR.
    if (orig_ax as i64) < 0 || ax != EINTR_RETURN {
        return Ok(None);
    }
    let compat = varint_field(&regs, 28).is_some_and(|(mode, _)| mode == MODE_COMPAT);
    if compat || orig_ax == RESTART_SYSCALL {
        return Ok(Some(Outcome::Left(orig_ax)));
    }
    if !RESTARTABLE.iter().any(|(n, _)| *n == orig_ax) {
        // A call that returned EINTR itself: what the program saw before the checkpoint.
        return Ok(None);
    }
    let back = ip
        .checked_sub(SYSCALL_INSN_LEN)
        .ok_or("ip is below its system call")?;
    if !fits(orig_ax, ax_at.len()) || !fits(back, ip_at.len()) {
        return Ok(Some(Outcome::Left(orig_ax)));
    }
    put_varint(orig_ax, &mut image[ax_at]);
    put_varint(back, &mut image[ip_at]);
    Ok(Some(Outcome::Rewound(orig_ax)))
}

/// A protobuf field: its number and where its value is.
#[derive(Debug)]
struct Field {
    number: u64,
    value: Value,
}

#[derive(Debug)]
enum Value {
    /// A varint: its value and its bytes.
    Varint(u64, Range<usize>),
    /// A length-delimited value's bytes.
    Bytes(Range<usize>),
    /// A fixed32 or fixed64.
    Fixed,
}

/// The fields of the protobuf message in `buf[range]`.
fn fields(buf: &[u8], range: Range<usize>) -> Result<Vec<Field>, &'static str> {
    let mut out = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let (key, next) = read_varint(buf, at, range.end)?;
        at = next;
        let value = match key & 7 {
            0 => {
                let (v, next) = read_varint(buf, at, range.end)?;
                let value = Value::Varint(v, at..next);
                at = next;
                value
            }
            1 | 5 => {
                at += if key & 7 == 1 { 8 } else { 4 };
                Value::Fixed
            }
            2 => {
                let (len, next) = read_varint(buf, at, range.end)?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|len| next.checked_add(len))
                    .ok_or("a length overflows")?;
                at = end;
                Value::Bytes(next..end)
            }
            _ => return Err("an unknown wire type"),
        };
        if at > range.end {
            return Err("a field runs past its message");
        }
        out.push(Field {
            number: key >> 3,
            value,
        });
    }
    Ok(out)
}

fn varint_field(fields: &[Field], number: u64) -> Option<(u64, Range<usize>)> {
    fields.iter().rev().find_map(|f| match &f.value {
        Value::Varint(v, at) if f.number == number => Some((*v, at.clone())),
        _ => None,
    })
}

fn bytes_field(fields: &[Field], number: u64) -> Option<Range<usize>> {
    fields.iter().rev().find_map(|f| match &f.value {
        Value::Bytes(at) if f.number == number => Some(at.clone()),
        _ => None,
    })
}

/// A varint at `buf[at..]`, ending before `end`: its value and where the next byte is.
fn read_varint(buf: &[u8], mut at: usize, end: usize) -> Result<(u64, usize), &'static str> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        if at >= end || at >= buf.len() {
            return Err("a varint runs past its message");
        }
        let byte = buf[at];
        at += 1;
        value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
        if byte & 0x80 == 0 {
            return Ok((value, at));
        }
    }
    Err("a varint longer than 10 bytes")
}

/// Whether `value` fits a varint of `len` bytes (1 to 10).
fn fits(value: u64, len: usize) -> bool {
    (1..=10).contains(&len) && (len == 10 || value >> (7 * len) == 0)
}

/// Writes `value` as a varint filling `out` exactly (redundant continuation bytes if need
/// be); [`fits`] must hold.
fn put_varint(mut value: u64, out: &mut [u8]) {
    let last = out.len() - 1;
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (value & 0x7f) as u8 | if i < last { 0x80 } else { 0 };
        value >>= 7;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    fn field_varint(number: u64, v: u64) -> Vec<u8> {
        let mut out = varint(number << 3);
        out.extend(varint(v));
        out
    }

    fn field_bytes(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = varint(number << 3 | 2);
        out.extend(varint(bytes.len() as u64));
        out.extend_from_slice(bytes);
        out
    }

    /// A core image as CRIU writes it, with the given registers (and mode if any).
    fn core(mtype: u64, ax: u64, orig_ax: u64, ip: u64, mode: Option<u64>) -> Vec<u8> {
        let mut regs = Vec::new();
        for n in 1..=27 {
            let v = match n {
                11 => ax,
                12 => ip, // cx holds the return address after `syscall`
                16 => orig_ax,
                17 => ip,
                _ => n * 3,
            };
            regs.extend(field_varint(n, v));
        }
        if let Some(mode) = mode {
            regs.extend(field_varint(28, mode));
        }
        let mut fpregs = field_varint(1, 0x37f);
        fpregs.extend(field_bytes(9, &[0; 16]));
        let mut ti = field_varint(1, 0x7f00_dead_beef);
        ti.extend(field_bytes(2, &regs));
        ti.extend(field_bytes(3, &fpregs));
        let mut entry = field_varint(1, mtype);
        entry.extend(field_bytes(2, &ti));
        entry.extend(field_bytes(3, &field_varint(1, 5)));
        let mut image = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        image.extend(CORE_MAGIC.to_le_bytes());
        image.extend((entry.len() as u32).to_le_bytes());
        image.extend(entry);
        image
    }

    /// (ax, orig_ax, ip, cx) of a core image.
    fn regs(image: &[u8]) -> (u64, u64, u64, u64) {
        let core = fields(image, 12..image.len()).unwrap();
        let ti = bytes_field(&core, 2).unwrap();
        let gp = bytes_field(&fields(image, ti).unwrap(), 2).unwrap();
        let regs = fields(image, gp).unwrap();
        let r = |n| varint_field(&regs, n).unwrap().0;
        (r(11), r(16), r(17), r(12))
    }

    #[test]
    fn an_interrupted_sleep_is_set_to_enter_its_call_again() {
        for (syscall, name) in RESTARTABLE {
            let mut image = core(1, EINTR_RETURN, syscall, 0x4a_e3f7, None);
            let before = image.len();
            assert_eq!(
                rewind_core(&mut image),
                Ok(Some(Outcome::Rewound(syscall))),
                "{name}"
            );
            assert_eq!(image.len(), before);
            assert_eq!(
                regs(&image),
                (syscall, syscall, 0x4a_e3f5, 0x4a_e3f7),
                "{name}"
            );
        }
    }

    #[test]
    fn a_varint_keeps_its_length_when_its_value_shrinks() {
        // ip 0x4000 takes three bytes, 0x3ffe two: written with a redundant byte.
        let mut image = core(1, EINTR_RETURN, 35, 0x4000, None);
        let before = image.clone();
        rewind_core(&mut image).unwrap();
        assert_eq!(image.len(), before.len());
        assert_eq!(regs(&image), (35, 35, 0x3ffe, 0x4000));
        let mut out = [0u8; 3];
        put_varint(0x3ffe, &mut out);
        assert_eq!(out, [0xfe, 0xff, 0x00]);
        assert!(!fits(300, 1));
        assert!(fits(u64::MAX, 10));
    }

    #[test]
    fn what_is_not_an_interrupted_restartable_call_is_left_alone() {
        // Running user code (orig_ax -1), a call that returned something else, a call that
        // returned EINTR itself (read), and an image of another architecture.
        for (mtype, ax, orig_ax) in [
            (1, 0, u64::MAX),
            (1, 0, 230),
            (1, -516i64 as u64, 230),
            (1, EINTR_RETURN, 0),
            (3, EINTR_RETURN, 230),
        ] {
            let mut image = core(mtype, ax, orig_ax, 0x1000, None);
            let before = image.clone();
            assert_eq!(rewind_core(&mut image), Ok(None), "{ax} {orig_ax}");
            assert_eq!(image, before);
        }
    }

    #[test]
    fn restart_syscall_and_32_bit_tasks_are_reported_not_rewound() {
        let mut image = core(1, EINTR_RETURN, RESTART_SYSCALL, 0x1000, None);
        let before = image.clone();
        assert_eq!(
            rewind_core(&mut image),
            Ok(Some(Outcome::Left(RESTART_SYSCALL)))
        );
        assert_eq!(image, before);
        let mut image = core(1, EINTR_RETURN, 162, 0x1000, Some(MODE_COMPAT));
        assert_eq!(rewind_core(&mut image), Ok(Some(Outcome::Left(162))));
    }

    #[test]
    fn garbage_is_refused_not_rewritten() {
        let mut short = vec![0x19, 0x43];
        assert!(rewind_core(&mut short).is_err());
        let mut image = core(1, EINTR_RETURN, 230, 0x1000, None);
        image[4] ^= 0xff;
        assert!(rewind_core(&mut image).is_err());
        let mut image = core(1, EINTR_RETURN, 230, 0x1000, None);
        let n = image.len();
        image.truncate(n - 3);
        assert!(rewind_core(&mut image).is_err());
    }

    #[test]
    fn an_archive_is_repaired_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.tar");
        let sleeping = core(1, EINTR_RETURN, 230, 0x4a_e3f7, None);
        let paused = core(1, EINTR_RETURN, RESTART_SYSCALL, 0x4a_e3f7, None);
        let running = core(1, 0, u64::MAX, 0x40_1000, None);
        let files: [(&str, &[u8]); 6] = [
            ("config.dump", b"{}"),
            ("checkpoint/pages-1.img", &[0xaa; 3000]),
            ("checkpoint/core-1.img", &sleeping),
            ("checkpoint/core-7.img", &paused),
            ("checkpoint/core-9.img", &running),
            ("rootfs-diff/core-2.img", &sleeping),
        ];
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            builder.append_data(&mut header, name, data).unwrap();
        }
        builder.into_inner().unwrap();
        let size = std::fs::metadata(&path).unwrap().len();

        let report = rewind_archive(&path).unwrap();
        assert_eq!(
            report.rewound,
            [Interrupted {
                tid: 1,
                syscall: 230
            }]
        );
        assert_eq!(
            report.left,
            [Interrupted {
                tid: 7,
                syscall: RESTART_SYSCALL
            }]
        );
        assert!(report.interrupted_any());
        assert_eq!(
            list(&report.rewound),
            "clock_nanosleep in PID 1",
            "as the logs say it"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

        let mut archive = tar::Archive::new(File::open(&path).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            let (_, original) = files.iter().find(|(n, _)| *n == name).unwrap();
            if name == "checkpoint/core-1.img" {
                assert_eq!(regs(&data), (230, 230, 0x4a_e3f5, 0x4a_e3f7));
            } else {
                assert_eq!(&data[..], *original, "{name} changed");
            }
        }
        // Once rewound, nothing is left to do.
        let again = rewind_archive(&path).unwrap();
        assert!(again.rewound.is_empty());
    }

    #[test]
    fn an_images_folder_is_repaired_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let sleeping = core(1, EINTR_RETURN, 35, 0x4a_e3f7, None);
        let running = core(1, 0, u64::MAX, 0x40_1000, None);
        std::fs::write(dir.path().join("core-1.img"), &sleeping).unwrap();
        std::fs::write(dir.path().join("core-3.img"), &running).unwrap();
        std::fs::write(dir.path().join("pages-1.img"), [0xaa; 100]).unwrap();
        std::fs::create_dir(dir.path().join("core-5.img")).unwrap();

        let report = rewind_dir(dir.path()).unwrap();
        assert_eq!(
            report.rewound,
            [Interrupted {
                tid: 1,
                syscall: 35
            }]
        );
        assert!(report.left.is_empty());
        let repaired = std::fs::read(dir.path().join("core-1.img")).unwrap();
        assert_eq!(repaired.len(), sleeping.len());
        assert_eq!(regs(&repaired), (35, 35, 0x4a_e3f5, 0x4a_e3f7));
        assert_eq!(
            std::fs::read(dir.path().join("core-3.img")).unwrap(),
            running
        );
        assert!(rewind_dir(dir.path()).unwrap().rewound.is_empty());
    }

    #[test]
    fn core_image_names() {
        assert_eq!(core_tid(Path::new("checkpoint/core-1.img")), Some(1));
        assert_eq!(core_tid(Path::new("./checkpoint/core-42.img")), Some(42));
        for other in [
            "core-1.img",
            "checkpoint/core-.img",
            "checkpoint/core-1a.img",
            "checkpoint/mm-1.img",
            "x/checkpoint/core-1.img",
        ] {
            assert_eq!(core_tid(Path::new(other)), None, "{other}");
        }
    }
}
