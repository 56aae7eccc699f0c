//! Image folders larger than memory, packed: [`pack_image_folder`] copies a folder's encoded
//! images (PNG/JPEG bytes, not decoded) into a few large shard files with an index and a
//! manifest, and [`open_image_shards`] serves them by positional reads, each image decoded when
//! a batch reads it. A million small files become a handful of sequential ones (what object
//! stores and network file systems want), and memory holds the index (20 bytes an image), not
//! the pixels. The same views follow from (seed, epoch, image, view) as from the folder.
//!
//! A packed folder:
//!
//! ```text
//! manifest.json       format version, image count, class names, and each shard's file name,
//!                     bytes, image count and SHA-256
//! images-00000.bin    encoded images back to back
//! images.idx          per image, little-endian: shard u32, offset u64, length u32, label u32
//!                     (u32::MAX: unlabelled)
//! ```
//!
//! Packing writes into `<out>.tmp` and renames it into place when complete; an existing `out` is
//! never touched. Opening checks the manifest, the index and every shard's size; the SHA-256s
//! are there for `sha256sum -c`-style audits and cost a read of everything to check, so opening
//! does not.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::images::{decode_bytes, ImageSet, OnCorrupt};

/// Bumped when the layout changes: an older folder is refused with a message to repack.
const FORMAT_VERSION: u32 = 1;
const ENTRY: usize = 20;
const UNLABELLED: u32 = u32::MAX;

/// One shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFile {
    pub file: String,
    pub bytes: u64,
    pub images: u64,
    pub sha256: String,
}

/// `manifest.json` of a packed folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShardManifest {
    pub format_version: u32,
    pub images: u64,
    /// Class names by index (the source folder's subfolders); empty: unlabelled.
    pub classes: Vec<String>,
    pub shards: Vec<ShardFile>,
    /// The folder it was packed from, and the files skipped as unreadable.
    pub source: PathBuf,
    pub skipped: Vec<PathBuf>,
}

/// Where image `i` lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    shard: u32,
    offset: u64,
    len: u32,
}

/// An opened packed folder: the shards (opened once, read at offsets from any thread) and the
/// index.
#[derive(Debug, Clone)]
pub struct ShardStore {
    dir: PathBuf,
    files: Vec<Arc<File>>,
    entries: Vec<Entry>,
}

impl PartialEq for ShardStore {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir && self.entries == other.entries
    }
}

impl ShardStore {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn truncate(&mut self, n: usize) {
        self.entries.truncate(n);
    }

    /// The encoded bytes of image `i` (one positional read) and a name for errors.
    pub(crate) fn bytes(&self, i: usize) -> Result<(Vec<u8>, String)> {
        use std::os::unix::fs::FileExt;
        let e = self.entries[i];
        let mut buf = vec![0u8; e.len as usize];
        let name = format!("{} image {i}", self.dir.display());
        self.files[e.shard as usize]
            .read_exact_at(&mut buf, e.offset)
            .map_err(|err| DataError::io(&self.dir, err))?;
        Ok((buf, name))
    }
}

/// What [`pack_image_folder`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackReport {
    pub manifest: ImageShardManifest,
    pub bytes: u64,
}

/// Packs the images of `folder` (one subfolder per class, or none) into `out`, shards of about
/// `shard_bytes` each. Every file's header is read first (`images::readable_images`): an
/// unreadable one stops the packing naming it, or is left out and listed under
/// `on_corrupt = "skip"`. `out` must not exist.
pub fn pack_image_folder(
    folder: &Path,
    out: &Path,
    shard_bytes: u64,
    on_corrupt: OnCorrupt,
) -> Result<PackReport> {
    if out.exists() {
        return Err(DataError::Table {
            path: out.to_path_buf(),
            msg: "already exists; pack into a new folder (nothing there was touched)".into(),
        });
    }
    let crate::images::Readable {
        files: kept,
        classes,
        skipped,
    } = crate::images::readable_images(folder, on_corrupt)?;
    let tmp = out.with_file_name(format!(
        "{}.tmp",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "packed".into())
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    let mut shards: Vec<ShardFile> = Vec::new();
    let mut index =
        BufWriter::new(File::create(tmp.join("images.idx")).map_err(|e| DataError::io(&tmp, e))?);
    let mut current: Option<(BufWriter<File>, Sha256)> = None;
    let mut total = 0u64;
    for (path, label) in &kept {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let full = shards
            .last()
            .is_none_or(|s| s.bytes > 0 && s.bytes + bytes.len() as u64 > shard_bytes);
        if current.is_none() || full {
            if let Some((mut w, h)) = current.take() {
                w.flush().map_err(|e| DataError::io(&tmp, e))?;
                shards.last_mut().expect("open shard").sha256 = format!("{:x}", h.finalize());
            }
            let file = format!("images-{:05}.bin", shards.len());
            let f = File::create(tmp.join(&file)).map_err(|e| DataError::io(&tmp, e))?;
            current = Some((BufWriter::new(f), Sha256::new()));
            shards.push(ShardFile {
                file,
                bytes: 0,
                images: 0,
                sha256: String::new(),
            });
        }
        let (w, h) = current.as_mut().expect("a shard is open");
        let at = (shards.len() - 1) as u32;
        let shard = shards.last_mut().expect("a shard is open");
        w.write_all(&bytes).map_err(|e| DataError::io(&tmp, e))?;
        h.update(&bytes);
        let mut entry = [0u8; ENTRY];
        entry[0..4].copy_from_slice(&at.to_le_bytes());
        entry[4..12].copy_from_slice(&shard.bytes.to_le_bytes());
        entry[12..16].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        entry[16..20].copy_from_slice(&label.unwrap_or(UNLABELLED).to_le_bytes());
        index
            .write_all(&entry)
            .map_err(|e| DataError::io(&tmp, e))?;
        shard.bytes += bytes.len() as u64;
        shard.images += 1;
        total += bytes.len() as u64;
    }
    if let Some((mut w, h)) = current.take() {
        w.flush().map_err(|e| DataError::io(&tmp, e))?;
        shards.last_mut().expect("open shard").sha256 = format!("{:x}", h.finalize());
    }
    index.flush().map_err(|e| DataError::io(&tmp, e))?;
    drop(index);
    let manifest = ImageShardManifest {
        format_version: FORMAT_VERSION,
        images: kept.len() as u64,
        classes,
        shards,
        source: folder.to_path_buf(),
        skipped,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    std::fs::write(tmp.join("manifest.json"), json).map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| DataError::io(out, e))?;
    Ok(PackReport {
        manifest,
        bytes: total,
    })
}

/// Opens a packed folder as an [`ImageSet`] whose images are decoded at (height, width) in
/// `channels` channels when read. The manifest, the index and every shard's size are checked
/// first; an error names the file and what is wrong.
pub fn open_image_shards(
    dir: &Path,
    (height, width): (usize, usize),
    channels: usize,
) -> Result<ImageSet> {
    let bad = |path: PathBuf, msg: String| DataError::Table { path, msg };
    let mpath = dir.join("manifest.json");
    let text = std::fs::read(&mpath).map_err(|e| DataError::io(&mpath, e))?;
    let m: ImageShardManifest = serde_json::from_slice(&text)
        .map_err(|e| bad(mpath.clone(), format!("not a packed-images manifest: {e}")))?;
    if m.format_version != FORMAT_VERSION {
        return Err(bad(
            mpath,
            format!(
                "format version {} (this Kindling reads {FORMAT_VERSION}): pack the folder again",
                m.format_version
            ),
        ));
    }
    let mut files = Vec::with_capacity(m.shards.len());
    for s in &m.shards {
        let p = dir.join(&s.file);
        let f = File::open(&p).map_err(|e| DataError::io(&p, e))?;
        let len = f.metadata().map_err(|e| DataError::io(&p, e))?.len();
        if len != s.bytes {
            return Err(bad(
                p,
                format!("holds {len} bytes, the manifest says {}", s.bytes),
            ));
        }
        files.push(Arc::new(f));
    }
    let ipath = dir.join("images.idx");
    let raw = std::fs::read(&ipath).map_err(|e| DataError::io(&ipath, e))?;
    if raw.len() as u64 != m.images * ENTRY as u64 {
        return Err(bad(
            ipath,
            format!(
                "holds {} bytes, {} images need {}",
                raw.len(),
                m.images,
                m.images * ENTRY as u64
            ),
        ));
    }
    let mut entries = Vec::with_capacity(m.images as usize);
    let mut labels = Vec::with_capacity(m.images as usize);
    for (i, e) in raw.chunks_exact(ENTRY).enumerate() {
        let u32_at = |o: usize| u32::from_le_bytes(e[o..o + 4].try_into().expect("4 bytes"));
        let entry = Entry {
            shard: u32_at(0),
            offset: u64::from_le_bytes(e[4..12].try_into().expect("8 bytes")),
            len: u32_at(12),
        };
        let label = u32_at(16);
        let fits = m.shards.get(entry.shard as usize).is_some_and(|s| {
            entry
                .offset
                .checked_add(entry.len as u64)
                .is_some_and(|end| end <= s.bytes)
        });
        let label_ok = if m.classes.is_empty() {
            label == UNLABELLED
        } else {
            (label as usize) < m.classes.len()
        };
        if !fits || !label_ok {
            return Err(bad(
                ipath,
                format!("entry {i} points outside its shard or names no class"),
            ));
        }
        entries.push(entry);
        labels.push(label);
    }
    let labelled = !m.classes.is_empty();
    let mut set = ImageSet::in_memory(
        (height, width, channels),
        Vec::new(),
        labelled.then_some(labels),
        m.classes.clone(),
    );
    set.stored = Some(Arc::new(crate::images::Stored::Shards(ShardStore {
        dir: dir.to_path_buf(),
        files,
        entries,
    })));
    Ok(set)
}

/// Decodes image `i` of `store` at (height, width) in `channels` channels.
pub(crate) fn decode(
    store: &ShardStore,
    i: usize,
    size: (usize, usize),
    channels: usize,
) -> Result<Vec<u8>> {
    let (bytes, name) = store.bytes(i)?;
    decode_bytes(&bytes, Some(size), channels)
        .map(|(_, _, px)| px)
        .map_err(|msg| DataError::Table {
            path: PathBuf::from(name),
            msg: format!("cannot decode the image ({msg})"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::read_image_folder;

    /// A folder packed into two shards serves the same pixels and labels as the folder read
    /// into memory; the packing never touches an existing folder; a shard cut short or an index
    /// entry out of its shard is named when opened.
    #[test]
    fn packed_shards_serve_the_folders_images_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for (k, class) in ["a", "b"].iter().enumerate() {
            let sub = src.join(class);
            std::fs::create_dir_all(&sub).unwrap();
            for i in 0..3u32 {
                image::RgbImage::from_fn(5 + i, 4, |x, y| {
                    image::Rgb([(x * 40) as u8, (y * 50) as u8, (k as u32 * 100 + i) as u8])
                })
                .save(sub.join(format!("{i}.png")))
                .unwrap();
            }
        }
        let out = dir.path().join("packed");
        let r = pack_image_folder(&src, &out, 200, OnCorrupt::Fail).unwrap();
        assert_eq!(r.manifest.images, 6);
        assert!(r.manifest.shards.len() >= 2, "{:?}", r.manifest.shards);
        let again = pack_image_folder(&src, &out, 200, OnCorrupt::Fail).unwrap_err();
        assert!(again.to_string().contains("already exists"), "{again}");

        let loaded = read_image_folder(&src, Some((4, 6)), 3, OnCorrupt::Fail).unwrap();
        let packed = open_image_shards(&out, (4, 6), 3).unwrap();
        assert_eq!(packed.len(), 6);
        assert_eq!(packed.labels, loaded.labels);
        assert_eq!(packed.classes, loaded.classes);
        for i in 0..6 {
            assert_eq!(
                packed.image(i).unwrap(),
                loaded.image(i).unwrap(),
                "image {i}"
            );
        }
        assert_eq!(packed.clone().truncate(4).len(), 4);

        // A shard cut short.
        let shard = out.join(&r.manifest.shards[1].file);
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
        let e = open_image_shards(&out, (4, 6), 3).unwrap_err().to_string();
        assert!(
            e.contains("images-00001.bin") && e.contains("manifest says"),
            "{e}"
        );
        std::fs::write(&shard, &bytes).unwrap();
        // An index entry pointing past its shard.
        let idx = out.join("images.idx");
        let mut raw = std::fs::read(&idx).unwrap();
        raw[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&idx, &raw).unwrap();
        let e = open_image_shards(&out, (4, 6), 3).unwrap_err().to_string();
        assert!(e.contains("images.idx") && e.contains("entry 0"), "{e}");
    }
}
