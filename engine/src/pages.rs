//! CRIU's page images received as files of their own, so a restore never untars them.
//!
//! Nearly all of a checkpoint archive is its `checkpoint/pages-N.img` entries, the container's
//! memory. `podman container restore --import` untars the whole archive before CRIU reads it:
//! one more full copy of the memory, into freshly allocated pages, on the critical path of the
//! downtime. Instead, the source tells the destination where each page image lies in the
//! archive ([`locate`]); the destination's receiver writes those ranges straight into a
//! folder of CRIU images ([`pieces`], see [`transport::sink`]) and leaves holes in the archive
//! there. [`assemble`] then validates the archive as usual, unpacks the few other images beside
//! the pages, and writes a small import archive: the archive's other files (`config.dump`,
//! `spec.dump`, the rootfs diff...) and a `checkpoint` symlink to that folder, which Podman
//! untars in an instant and CRIU follows.

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use transport::quic::Piece;

use crate::archive::{self, ArchiveError, EntryKind, Limits};

/// The folder of CRIU images inside a checkpoint archive.
const IMAGES: &str = "checkpoint";

/// Most page images one archive may name (one per process; real containers have a handful).
pub const MAX_PAGE_IMAGES: usize = 4096;

/// Where one page image lies in a checkpoint archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageImage {
    /// Its file name in the archive's `checkpoint/` folder: `pages-N.img`.
    pub name: String,
    /// Where its data starts in the archive, in bytes.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// Whether `name` is a page image's file name, `pages-N.img`: nothing else is ever written
/// where a source says.
pub fn is_page_image(name: &str) -> bool {
    name.strip_prefix("pages-")
        .and_then(|rest| rest.strip_suffix(".img"))
        .is_some_and(|n| !n.is_empty() && n.len() <= 9 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The page images of the checkpoint archive at `path`, in archive order: regular files
/// `checkpoint/pages-N.img` that are not empty. Only headers are read.
pub fn locate(path: &Path) -> io::Result<Vec<PageImage>> {
    let mut archive = tar::Archive::new(BufReader::new(File::open(path)?));
    let mut found = Vec::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular || entry.size() == 0 {
            continue;
        }
        let entry_path = entry.path()?;
        let name = entry_path
            .strip_prefix(IMAGES)
            .ok()
            .and_then(|p| p.to_str())
            .filter(|n| is_page_image(n));
        if let Some(name) = name {
            found.push(PageImage {
                name: name.to_string(),
                offset: entry.raw_file_position(),
                len: entry.size(),
            });
        }
        if found.len() > MAX_PAGE_IMAGES {
            return Err(io::Error::other(format!(
                "{} holds more than {MAX_PAGE_IMAGES} page images",
                path.display()
            )));
        }
    }
    Ok(found)
}

/// The receiver's pieces for `images`, written into `folder` (created 0700); the first is
/// built over `reuse` (the last pre-copy round's pages, mostly the same bytes). Refuses names
/// that are not page images, repeated names and overlapping or unordered ranges: the source
/// says where to write, the destination decides what may be written.
pub fn pieces(
    images: &[PageImage],
    folder: &Path,
    reuse: Option<PathBuf>,
) -> Result<Vec<Piece>, String> {
    if images.len() > MAX_PAGE_IMAGES {
        return Err(format!(
            "{} page images named, more than {MAX_PAGE_IMAGES}",
            images.len()
        ));
    }
    let mut end = 0;
    let mut names = std::collections::HashSet::new();
    for image in images {
        if !is_page_image(&image.name) || !names.insert(image.name.as_str()) {
            return Err(format!(
                "{:?} is not a page image's name, or is named twice",
                image.name
            ));
        }
        if image.len == 0 || image.offset < end {
            return Err(format!(
                "page image {} at {}+{} is empty or overlaps the one before",
                image.name, image.offset, image.len
            ));
        }
        end = image.offset + image.len;
    }
    private_folder(folder).map_err(|e| format!("creating {}: {e}", folder.display()))?;
    let mut reuse = reuse;
    Ok(images
        .iter()
        .map(|image| Piece {
            offset: image.offset,
            len: image.len,
            path: folder.join(&image.name),
            reuse: reuse.take(),
        })
        .collect())
}

/// Creates `folder` (and its parents) 0700 from the start, if it is missing.
fn private_folder(folder: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(folder)
}

/// Why [`assemble`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// The archive was refused (see [`archive::scan`]).
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The archive does not hold a page image where the source said it would.
    #[error(
        "the archive does not hold page image {0} where the source said (the source and the \
         archive disagree; was the archive changed after it was sent?)"
    )]
    Misplaced(String),
    /// Writing the images folder or the import archive failed.
    #[error("writing {path}: {source}")]
    Write {
        /// What was being written.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Validates the checkpoint archive at `archive_path`, whose page images `images` were received
/// into `folder`, and writes the import archive `import`: every entry outside `checkpoint/`
/// as it is, and `checkpoint` as a symlink to `folder`, where the other images are unpacked
/// beside the pages (`folder` is created 0700 if missing). The page images' ranges of
/// `archive_path` are not read for their content.
pub fn assemble(
    archive_path: &Path,
    images: &[PageImage],
    folder: &Path,
    import: &Path,
    limits: &Limits,
) -> Result<(), AssembleError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AssembleError::Write { path, source }
    };
    private_folder(folder).map_err(write_err(folder))?;
    let out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(import)
        .map_err(write_err(import))?;
    let mut builder = tar::Builder::new(io::BufWriter::new(out));
    let mut seen = vec![false; images.len()];
    let mut misplaced = None;
    let scanned = archive::scan_file(archive_path, limits, |info, data| {
        let Some(rest) = info.path.strip_prefix(IMAGES) else {
            return copy_entry(&mut builder, info, data);
        };
        let Some(name) = rest.strip_prefix('/') else {
            // The folder itself: the symlink stands for it.
            return Ok(());
        };
        match images.iter().position(|image| image.name == name) {
            Some(i) => {
                let image = &images[i];
                let placed = info.kind == EntryKind::File
                    && info.offset == image.offset
                    && info.size == image.len;
                if !placed {
                    misplaced.get_or_insert_with(|| image.name.clone());
                    return Err(io::Error::other("misplaced page image"));
                }
                seen[i] = true;
                Ok(())
            }
            None if matches!(info.kind, EntryKind::File | EntryKind::Dir) => archive::write_entry(
                folder,
                &archive::EntryInfo {
                    path: name,
                    ..*info
                },
                data,
            ),
            // CRIU writes none; moved into the folder, a relative one would point elsewhere.
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is a link: CRIU's images folder holds no links",
                    info.path
                ),
            )),
        }
    });
    if let Some(name) = misplaced {
        return Err(AssembleError::Misplaced(name));
    }
    scanned?;
    if let Some(i) = seen.iter().position(|seen| !seen) {
        return Err(AssembleError::Misplaced(images[i].name.clone()));
    }
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_mode(0o777);
    link.set_size(0);
    builder
        .append_link(&mut link, IMAGES, folder)
        .and_then(|()| builder.into_inner())
        .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
        .and_then(|f| f.sync_all())
        .map_err(write_err(import))
}

/// Appends one validated entry of the archive to the import archive, as it was.
fn copy_entry<W: io::Write>(
    builder: &mut tar::Builder<W>,
    info: &archive::EntryInfo<'_>,
    data: &mut dyn io::Read,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mode(info.mode);
    header.set_mtime(info.mtime);
    header.set_size(0);
    match info.kind {
        EntryKind::File => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(info.size);
            builder.append_data(&mut header, info.path, data)
        }
        EntryKind::Dir => {
            header.set_entry_type(tar::EntryType::Directory);
            builder.append_data(&mut header, info.path, io::empty())
        }
        EntryKind::Symlink | EntryKind::HardLink => {
            let kind = match info.kind {
                EntryKind::Symlink => tar::EntryType::Symlink,
                _ => tar::EntryType::Link,
            };
            header.set_entry_type(kind);
            builder.append_link(&mut header, info.path, info.link_target.unwrap_or_default())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A checkpoint archive as Podman writes one, with two page images.
    fn archive(path: &Path) {
        let files: [(&str, &[u8]); 7] = [
            ("config.dump", b"{}"),
            ("spec.dump", b"{}"),
            ("checkpoint/inventory.img", b"inventory"),
            ("checkpoint/pages-1.img", &[0xaa; 5000]),
            ("checkpoint/core-1.img", b"core"),
            ("checkpoint/pages-2.img", &[0xbb; 700]),
            ("rootfs-diff.tar", b"diff"),
        ];
        let mut builder = tar::Builder::new(File::create(path).unwrap());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o700);
        dir.set_size(0);
        builder
            .append_data(&mut dir, "checkpoint", io::empty())
            .unwrap();
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            builder.append_data(&mut header, name, data).unwrap();
        }
        builder.into_inner().unwrap();
    }

    /// What the receiver does with pieces: each page image's range copied to its own file
    /// and left as a hole (zeros) in the archive.
    fn receive_pieces(archive: &Path, pieces: &[Piece]) {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(archive)
            .unwrap();
        for piece in pieces {
            let mut data = vec![0; piece.len as usize];
            file.read_exact_at(&mut data, piece.offset).unwrap();
            fs::write(&piece.path, &data).unwrap();
            file.write_all_at(&vec![0; data.len()], piece.offset)
                .unwrap();
        }
    }

    #[test]
    fn page_images_are_located_and_the_import_archive_links_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.tar");
        archive(&path);
        let images = locate(&path).unwrap();
        let names: Vec<_> = images.iter().map(|i| (i.name.as_str(), i.len)).collect();
        assert_eq!(names, [("pages-1.img", 5000), ("pages-2.img", 700)]);

        let folder = dir.path().join("images");
        let pieces = pieces(&images, &folder, None).unwrap();
        receive_pieces(&path, &pieces);
        let import = dir.path().join("import.tar");
        assemble(&path, &images, &folder, &import, &Limits::default()).unwrap();

        assert_eq!(fs::read(folder.join("pages-1.img")).unwrap(), [0xaa; 5000]);
        assert_eq!(
            fs::read(folder.join("inventory.img")).unwrap(),
            b"inventory"
        );
        assert_eq!(fs::read(folder.join("core-1.img")).unwrap(), b"core");
        let mut entries = Vec::new();
        let mut tar = tar::Archive::new(File::open(&import).unwrap());
        for entry in tar.entries().unwrap() {
            let entry = entry.unwrap();
            let link = entry.link_name().unwrap().map(|l| l.into_owned());
            entries.push((entry.path().unwrap().display().to_string(), link));
        }
        let expected = [
            ("config.dump".to_string(), None),
            ("spec.dump".to_string(), None),
            ("rootfs-diff.tar".to_string(), None),
            ("checkpoint".to_string(), Some(folder.clone())),
        ];
        assert_eq!(entries, expected);
    }

    #[test]
    fn an_archive_that_disagrees_with_the_source_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.tar");
        archive(&path);
        let mut images = locate(&path).unwrap();
        images[1].offset += 512;
        let folder = dir.path().join("images");
        let import = dir.path().join("import.tar");
        let err = assemble(&path, &images, &folder, &import, &Limits::default()).unwrap_err();
        assert!(
            matches!(&err, AssembleError::Misplaced(n) if n == "pages-2.img"),
            "{err}"
        );
    }

    #[test]
    fn only_page_image_names_in_order_become_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let image = |name: &str, offset| PageImage {
            name: name.into(),
            offset,
            len: 10,
        };
        for bad in [
            vec![image("../../etc/passwd", 0)],
            vec![image("pages-1.img/x", 0)],
            vec![image("pages-.img", 0)],
            vec![image("pages-1.img", 0), image("pages-1.img", 20)],
            vec![image("pages-1.img", 20), image("pages-2.img", 25)],
        ] {
            assert!(pieces(&bad, dir.path(), None).is_err(), "{bad:?} accepted");
        }
        let reuse = Some(dir.path().join("precopy-1.bin"));
        let good = [image("pages-1.img", 512), image("pages-12.img", 2048)];
        let made = pieces(&good, &dir.path().join("f"), reuse.clone()).unwrap();
        assert_eq!(made[0].reuse, reuse);
        assert_eq!(made[1].reuse, None);
        assert_eq!(made[1].path, dir.path().join("f/pages-12.img"));
    }
}
