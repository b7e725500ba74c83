//! The cuts of a migration's last pre-copy round, for the next round to take where the
//! bytes have not changed.
//!
//! The final checkpoint's page images hold mostly the same bytes as the last pre-copy
//! round's, at the same places, and the transfer cuts and hashes every byte it sends, the final
//! round's while the container is frozen. The pre-copy round's transfer records its cuts with
//! fingerprints (see `transport::chunker::earlier`); [`per_page_file`] splits them by the
//! `pages-N.img` they start in, and [`matched`] pairs those with the files of the next round
//! that have the same names. Only fingerprints are kept, never the bytes: the earlier images
//! are deleted as soon as they are sent, as before.

use std::path::{Path, PathBuf};

use transport::chunker::earlier::{self, EarlierCut, EarlierFile};

/// The cuts recorded over a stream of the page images `pages` (with lengths `lens`, back to
/// back), as each file's; `current` is the file's name alone, for [`matched`].
pub fn per_page_file(pages: &[PathBuf], lens: &[u64], cuts: &[EarlierCut]) -> Vec<EarlierFile> {
    pages
        .iter()
        .zip(earlier::per_file(cuts, lens))
        .filter_map(|(page, cuts)| {
            Some(EarlierFile {
                current: PathBuf::from(page.file_name()?),
                cuts,
            })
        })
        .collect()
}

/// The earlier files paired with the files of a stream, `paths`, that have their names.
pub fn matched<P: AsRef<Path>>(earlier: &[EarlierFile], paths: &[P]) -> Vec<EarlierFile> {
    earlier
        .iter()
        .filter_map(|file| {
            let now = paths
                .iter()
                .map(AsRef::as_ref)
                .find(|p| p.file_name() == Some(file.current.as_os_str()))?;
            Some(EarlierFile {
                current: now.to_path_buf(),
                cuts: file.cuts.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use transport::{ChunkId, ManifestEntry};

    use super::*;

    fn cut(offset: u64, len: u32) -> EarlierCut {
        EarlierCut {
            offset,
            entry: ManifestEntry {
                id: ChunkId::of(&len.to_le_bytes()),
                len,
                zero: false,
            },
            fingerprint: u128::from(offset),
        }
    }

    #[test]
    fn cuts_go_to_their_page_file_and_pair_with_the_next_rounds_by_name() {
        let kept = Path::new("/shm/c1");
        let pages = [kept.join("pages-1.img"), kept.join("pages-2.img")];
        let cuts = [cut(0, 100), cut(100, 250), cut(350, 150)];
        let files = per_page_file(&pages, &[300, 200], &cuts);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].current, PathBuf::from("pages-1.img"));
        assert_eq!(files[0].cuts, vec![cut(0, 100), cut(100, 250)]);
        let moved = EarlierCut {
            offset: 50,
            ..cut(350, 150)
        };
        assert_eq!(files[1].cuts, vec![moved]);

        let work = Path::new("/work/m1");
        let later = [work.join("glue-0"), work.join("images").join("pages-2.img")];
        let paired = matched(&files, &later);
        assert_eq!(paired.len(), 1);
        assert_eq!(paired[0].current, later[1]);
        assert_eq!(paired[0].cuts, files[1].cuts);
    }
}
