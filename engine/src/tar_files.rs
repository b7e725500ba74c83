//! A tar archive laid out as a list of files, so a transfer reads each member where it lies.
//!
//! A transfer sends several files back to back as one stream ([`transport::source::Source`]).
//! [`lay_out`] writes what a tar holds between its members' data (each member's header, the
//! padding of the one before, and at the end the end-of-archive blocks) into small "glue"
//! files, and lists glue and member files in stream order: read back to back, they are a tar
//! byte for byte, without the members' data ever being copied. It also says where each page
//! image's data lies in that stream (see [`crate::pages`]).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::pages::{self, PageImage};
use crate::podman_archive::{Member, IMAGES};

/// A tar block.
const BLOCK: u64 = 512;

/// An archive laid out as files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// The files to send back to back, in order.
    pub files: Vec<PathBuf>,
    /// Where the page images' data lies in that stream.
    pub pages: Vec<PageImage>,
    /// Length of the stream, in bytes.
    pub len: u64,
}

/// Lays `members` out as a tar (see the module documentation), writing the glue files into
/// `glue` (which must exist; files 0600). Member files must not change until they are sent.
pub fn lay_out(members: &[Member], glue: &Path) -> io::Result<Layout> {
    let mut layout = Layout::default();
    let mut headers = tar::Builder::new(Vec::new());
    let mut pending: Vec<u8> = Vec::new();
    for member in members {
        let mut header = tar::Header::new_gnu();
        header.set_mode(member.mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime(member.path.as_deref()));
        let size = match &member.path {
            Some(path) => {
                header.set_entry_type(tar::EntryType::Regular);
                fs::metadata(path)?.len()
            }
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                0
            }
        };
        header.set_size(size);
        // The builder writes the header (with any long-name entries) and no data: the data
        // is the member's own file.
        headers.append_data(&mut header, &member.name, io::empty())?;
        pending.append(headers.get_mut());
        if size == 0 {
            continue;
        }
        let path = member.path.clone().expect("only files have a size");
        flush(&mut layout, &mut pending, glue)?;
        if let Some(name) = member
            .name
            .strip_prefix(IMAGES)
            .and_then(|n| n.strip_prefix('/'))
        {
            if pages::is_page_image(name) {
                layout.pages.push(PageImage {
                    name: name.to_string(),
                    offset: layout.len,
                    len: size,
                });
            }
        }
        layout.files.push(path);
        layout.len += size;
        pending.resize(padding(size) as usize, 0);
    }
    pending.resize(pending.len() + 2 * BLOCK as usize, 0);
    flush(&mut layout, &mut pending, glue)?;
    Ok(layout)
}

/// Zeros after `size` bytes of data up to the next block.
fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// Writes the pending glue bytes as the next glue file, if there are any.
fn flush(layout: &mut Layout, pending: &mut Vec<u8>, glue: &Path) -> io::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let path = glue.join(format!("{:05}", layout.files.len()));
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?
        .write_all(pending)?;
    layout.len += pending.len() as u64;
    layout.files.push(path);
    pending.clear();
    Ok(())
}

/// A member's modification time, seconds since the epoch (0 for a directory or if unknown).
fn mtime(path: Option<&Path>) -> u64 {
    path.and_then(|p| fs::metadata(p).ok())
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{self, Limits};

    #[test]
    fn the_files_back_to_back_are_a_tar_of_the_members() {
        let dir = tempfile::tempdir().unwrap();
        let (glue, data) = (dir.path().join("glue"), dir.path().join("data"));
        fs::create_dir_all(&glue).unwrap();
        fs::create_dir_all(&data).unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let path = data.join(name.replace('/', "_"));
            fs::write(&path, bytes).unwrap();
            Member {
                name: name.into(),
                path: Some(path),
                mode: 0o600,
            }
        };
        let long = format!("checkpoint/{}.img", "x".repeat(120));
        let members = vec![
            file("config.dump", br#"{"name":"web"}"#),
            file("spec.dump", b"{}"),
            file("ctr.log", b""),
            Member {
                name: "checkpoint".into(),
                path: None,
                mode: 0o700,
            },
            file(&long, b"long name"),
            file("checkpoint/pages-1.img", &[7u8; 4096 + 3]),
            file("checkpoint/pages-2.img", &[9u8; 1024]),
        ];
        let layout = lay_out(&members, &glue).unwrap();
        let mut stream = Vec::new();
        for f in &layout.files {
            stream.extend(fs::read(f).unwrap());
        }
        assert_eq!(stream.len() as u64, layout.len);
        assert_eq!(stream.len() % 512, 0);
        assert!(archive::validate(&stream[..], &Limits::default()).is_ok());

        let mut seen = Vec::new();
        let mut tar = tar::Archive::new(&stream[..]);
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            seen.push((name, bytes.len()));
        }
        let expected: Vec<(String, usize)> = [
            ("config.dump", 14),
            ("spec.dump", 2),
            ("ctr.log", 0),
            ("checkpoint", 0),
            (long.as_str(), 9),
            ("checkpoint/pages-1.img", 4099),
            ("checkpoint/pages-2.img", 1024),
        ]
        .into_iter()
        .map(|(n, l)| (n.to_string(), l))
        .collect();
        assert_eq!(seen, expected);
        for page in &layout.pages {
            let at = page.offset as usize;
            let first = stream[at];
            assert!(stream[at..at + page.len as usize]
                .iter()
                .all(|&b| b == first));
        }
        let names: Vec<_> = layout.pages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["pages-1.img", "pages-2.img"]);
        assert_eq!(stream[layout.pages[0].offset as usize], 7);
        assert_eq!(stream[layout.pages[1].offset as usize], 9);
    }
}
