//! Image sources: IDX files (MNIST, Fashion-MNIST), folders of PNG/JPEG images (the class is
//! the subfolder; images directly in the folder are unlabelled), and CSV files of pixels (one
//! image per row, as Kaggle ships MNIST). Every source becomes an [`ImageSet`]: u8 pixels in
//! height x width x channels order, all images the same size, optional class labels. A folder
//! with `stream = true` keeps only its file list: each image is decoded (and resized) when a
//! batch reads it, so memory does not grow with the number of images.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Images of one size in memory, u8 HWC, with optional labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// `len() * height * width * channels` bytes (empty for a streamed folder).
    pub pixels: Vec<u8>,
    /// Where a streamed set's images are (decoded at (height, width) when read): a folder's
    /// files, or packed shards.
    pub stored: Option<Arc<Stored>>,
    /// One class index per image, when the source has labels.
    pub labels: Option<Vec<u32>>,
    /// Class names by index (folder names; "0".."9" for IDX and CSV).
    pub classes: Vec<String>,
}

impl ImageSet {
    /// Images in memory, u8 HWC.
    pub fn in_memory(
        (height, width, channels): (usize, usize, usize),
        pixels: Vec<u8>,
        labels: Option<Vec<u32>>,
        classes: Vec<String>,
    ) -> Self {
        ImageSet {
            height,
            width,
            channels,
            pixels,
            stored: None,
            labels,
            classes,
        }
    }

    pub fn len(&self) -> usize {
        match &self.stored {
            Some(s) => s.len(),
            None => self.pixels.len() / self.image_len().max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// The pixels of image `i`: a slice of memory, or a streamed file decoded now (an error
    /// names the file).
    pub fn image(&self, i: usize) -> Result<Cow<'_, [u8]>> {
        let size = (self.height, self.width);
        match self.stored.as_deref() {
            Some(Stored::Files(files)) => {
                let path = &files[i];
                let (_, _, px) = decode_image(path, Some(size), self.channels).map_err(|msg| {
                    DataError::Table {
                        path: path.clone(),
                        msg: format!("cannot decode the image ({msg})"),
                    }
                })?;
                return Ok(Cow::Owned(px));
            }
            Some(Stored::Shards(store)) => {
                let px = crate::image_shards::decode(store, i, size, self.channels)?;
                return Ok(Cow::Owned(px));
            }
            None => {}
        }
        let n = self.image_len();
        Ok(Cow::Borrowed(&self.pixels[i * n..(i + 1) * n]))
    }

    /// The first `n` images (all of them if there are fewer).
    pub fn truncate(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        match self.stored.as_mut().map(Arc::make_mut) {
            Some(Stored::Files(f)) => f.truncate(n),
            Some(Stored::Shards(s)) => s.truncate(n),
            None => {}
        }
        self.pixels.truncate(n * self.image_len());
        if let Some(l) = &mut self.labels {
            l.truncate(n);
        }
        self
    }
}

/// The encoded images of a streamed [`ImageSet`].
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// One file per image (a folder with `stream = true`).
    Files(Vec<PathBuf>),
    /// Packed shards ([`crate::image_shards`]).
    Shards(crate::image_shards::ShardStore),
}

impl Stored {
    fn len(&self) -> usize {
        match self {
            Stored::Files(f) => f.len(),
            Stored::Shards(s) => s.len(),
        }
    }
}

/// What to do with an image file that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCorrupt {
    /// Stop with an error naming the file.
    #[default]
    Fail,
    /// Warn with the file's path and go on without it.
    Skip,
}

/// Where a recipe's images come from (`train = { idx = { images = "...", labels = "..." } }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ImageSource {
    /// IDX files, gzipped or not.
    Idx {
        images: PathBuf,
        #[serde(default)]
        labels: Option<PathBuf>,
    },
    /// A folder of PNG/JPEG files, one subfolder per class (or none: unlabelled).
    Folder {
        path: PathBuf,
        /// Resize every image to (height, width); without it all images must share a size.
        #[serde(default)]
        size: Option<(usize, usize)>,
        /// "gray" (1 channel) or "rgb" (3).
        #[serde(default = "default_color")]
        color: String,
        #[serde(default)]
        on_corrupt: OnCorrupt,
        /// Decode each image when a batch reads it instead of all of them up front (folders
        /// larger than memory); needs `size`. Files are checked (readable, a known image
        /// header) before the run starts.
        #[serde(default)]
        stream: bool,
    },
    /// A folder packed by `kindling pack-images` ([`crate::image_shards`]): encoded images in a
    /// few shard files, decoded at `size` when a batch reads them.
    Shards {
        dir: PathBuf,
        size: (usize, usize),
        /// "gray" (1 channel) or "rgb" (3).
        #[serde(default = "default_color")]
        color: String,
    },
    /// A CSV file (gzipped when its name ends in `.gz`), one image per row: pixel columns in
    /// HWC order and an optional label column, named (with a header row) or by its 0-based
    /// index; integer pixel values in `0..=max_value`, scaled to 0..255.
    Csv {
        path: PathBuf,
        height: usize,
        width: usize,
        #[serde(default = "one")]
        channels: usize,
        #[serde(default)]
        label_column: Option<Column>,
        /// Whether the first row names the columns (Kaggle's MNIST CSVs do; sklearn's and
        /// many exports do not).
        #[serde(default = "yes")]
        header: bool,
        /// The largest pixel value (255 for 8-bit images, 16 for sklearn's digits, 65535 for
        /// 16-bit ones); values are scaled by 255 / max_value and rounded.
        #[serde(default = "max_u8")]
        max_value: u32,
    },
}

/// A CSV column: by its header name, or by its 0-based index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Column {
    Index(usize),
    Name(String),
}

/// Channels of a `color` setting ("gray" 1, "rgb" 3); `key` names it in the error.
fn channels_of(color: &str, key: &'static str) -> Result<usize> {
    match color {
        "gray" => Ok(1),
        "rgb" => Ok(3),
        other => Err(DataError::Config {
            key,
            msg: format!("expected \"gray\" or \"rgb\", got {other:?}"),
        }),
    }
}

fn yes() -> bool {
    true
}

fn max_u8() -> u32 {
    255
}

fn default_color() -> String {
    "rgb".into()
}

fn one() -> usize {
    1
}

impl ImageSource {
    pub fn load(&self) -> Result<ImageSet> {
        match self {
            ImageSource::Idx { images, labels } => read_idx(images, labels.as_deref()),
            ImageSource::Folder {
                path,
                size,
                color,
                on_corrupt,
                stream,
            } => {
                let channels = channels_of(color, "data.*.folder.color")?;
                if *stream {
                    let Some(size) = size else {
                        return Err(DataError::Config {
                            key: "data.*.folder.size",
                            msg: "stream = true decodes each image when it is read, at one \
                                  size: give size = [height, width]"
                                .into(),
                        });
                    };
                    return stream_image_folder(path, *size, channels, *on_corrupt);
                }
                read_image_folder(path, *size, channels, *on_corrupt)
            }
            ImageSource::Shards { dir, size, color } => {
                let channels = channels_of(color, "data.*.shards.color")?;
                if size.0 == 0 || size.1 == 0 {
                    return Err(DataError::Config {
                        key: "data.*.shards.size",
                        msg: format!("must be at least 1x1, got {}x{}", size.0, size.1),
                    });
                }
                crate::image_shards::open_image_shards(dir, *size, channels)
            }
            ImageSource::Csv {
                path,
                height,
                width,
                channels,
                label_column,
                header,
                max_value,
            } => read_pixel_csv(
                path,
                (*height, *width, *channels),
                &CsvLayout {
                    label: label_column.clone(),
                    header: *header,
                    max_value: *max_value,
                },
            ),
        }
    }
}

/// Parses an IDX file's header: (element type code, dimensions), and the offset of the data.
fn idx_header(path: &Path, bytes: &[u8]) -> Result<(u8, Vec<usize>, usize)> {
    let bad = |msg: String| DataError::Table {
        path: path.to_path_buf(),
        msg,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(
            "not an IDX file (expected the magic bytes 00 00 <type> <ndims>)".into(),
        ));
    }
    let (ty, ndims) = (bytes[2], bytes[3] as usize);
    let off = 4 + 4 * ndims;
    if bytes.len() < off {
        return Err(bad(format!(
            "IDX header of {ndims} dimensions is cut short"
        )));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    if ty != 0x08 {
        return Err(bad(format!(
            "IDX element type 0x{ty:02x}; only unsigned bytes (0x08) are supported"
        )));
    }
    // Checked: dimensions a corrupt header makes huge would wrap to a small (even zero)
    // product and pass the size check.
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            bad(format!(
                "IDX dimensions {dims:?} overflow: not a valid file"
            ))
        })?;
    if n == 0 {
        return Err(bad(format!("IDX dimensions {dims:?} hold no data")));
    }
    if bytes.len() - off != n {
        return Err(bad(format!(
            "IDX dimensions {dims:?} need {n} bytes of data, the file has {}",
            bytes.len() - off
        )));
    }
    Ok((ty, dims, off))
}

/// Reads IDX images (n x h x w, or n x h x w x c) and optional IDX labels (n).
pub fn read_idx(images: &Path, labels: Option<&Path>) -> Result<ImageSet> {
    let bytes = crate::read_maybe_gz(images)?;
    let (_, dims, off) = idx_header(images, &bytes)?;
    let (n, h, w, c) = match dims[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, c] => (n, h, w, c),
        _ => {
            return Err(DataError::Table {
                path: images.to_path_buf(),
                msg: format!("expected images of 3 or 4 dimensions, got {dims:?}"),
            })
        }
    };
    let labels = match labels {
        None => None,
        Some(p) => {
            let lb = crate::read_maybe_gz(p)?;
            let (_, ldims, loff) = idx_header(p, &lb)?;
            if ldims != [n] {
                return Err(DataError::Table {
                    path: p.to_path_buf(),
                    msg: format!(
                        "expected {n} labels (one per image of {}), got dimensions {ldims:?}",
                        images.display()
                    ),
                });
            }
            Some(lb[loff..].iter().map(|&b| b as u32).collect::<Vec<u32>>())
        }
    };
    let classes = labels
        .as_ref()
        .map(|l| {
            let k = l.iter().max().map_or(0, |&m| m + 1);
            (0..k).map(|i| i.to_string()).collect()
        })
        .unwrap_or_default();
    Ok(ImageSet::in_memory(
        (h, w, c),
        bytes[off..].to_vec(),
        labels,
        classes,
    ))
}

fn is_image_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Reads a folder of images: one subfolder per class (sorted names give the class indices), or
/// image files directly inside (no labels). Decoding runs in parallel (rayon).
pub fn read_image_folder(
    dir: &Path,
    size: Option<(usize, usize)>,
    channels: usize,
    on_corrupt: OnCorrupt,
) -> Result<ImageSet> {
    use rayon::prelude::*;
    let (files, classes) = list_image_folder(dir)?;
    let labelled = !classes.is_empty();
    let decoded: Vec<(usize, std::result::Result<(usize, usize, Vec<u8>), String>)> = files
        .par_iter()
        .enumerate()
        .map(|(i, (path, _))| (i, decode_image(path, size, channels)))
        .collect();
    let mut set = ImageSet::in_memory(
        (0, 0, channels),
        Vec::new(),
        labelled.then(Vec::new),
        classes,
    );
    let mut skipped = 0usize;
    for (i, r) in decoded {
        let path = &files[i].0;
        let (h, w, px) = match r {
            Ok(v) => v,
            Err(msg) => match on_corrupt {
                OnCorrupt::Fail => {
                    return Err(DataError::Table {
                        path: path.clone(),
                        msg: format!("cannot decode the image ({msg}); set on_corrupt = \"skip\" to leave it out"),
                    })
                }
                OnCorrupt::Skip => {
                    tracing::warn!(path = %path.display(), "skipping an image that cannot be decoded: {msg}");
                    eprintln!("warning: skipped {} (cannot decode: {msg})", path.display());
                    skipped += 1;
                    continue;
                }
            },
        };
        if set.height == 0 {
            (set.height, set.width) = (h, w);
        } else if (h, w) != (set.height, set.width) {
            return Err(DataError::Table {
                path: path.clone(),
                msg: format!(
                    "image is {h}x{w}, earlier ones are {}x{}; set `size` to resize them all",
                    set.height, set.width
                ),
            });
        }
        set.pixels.extend_from_slice(&px);
        if let (Some(l), Some(k)) = (&mut set.labels, files[i].1) {
            l.push(k);
        }
    }
    if set.is_empty() {
        return Err(DataError::Table {
            path: dir.to_path_buf(),
            msg: format!("all {skipped} images were skipped as corrupt"),
        });
    }
    Ok(set)
}

/// The image files of a folder with their class (one subfolder per class, sorted names give
/// the indices; files directly inside: no labels), and the class names.
pub(crate) fn list_image_folder(dir: &Path) -> Result<(Vec<(PathBuf, Option<u32>)>, Vec<String>)> {
    let entries = sorted_entries(dir)?;
    let subdirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    let mut files: Vec<(PathBuf, Option<u32>)> = Vec::new();
    let mut classes = Vec::new();
    if subdirs.is_empty() {
        files.extend(
            entries
                .iter()
                .filter(|p| is_image_file(p))
                .map(|p| (p.clone(), None)),
        );
    } else {
        for (k, sub) in subdirs.iter().enumerate() {
            classes.push(sub.file_name().unwrap().to_string_lossy().into_owned());
            for f in sorted_entries(sub)?
                .into_iter()
                .filter(|p| is_image_file(p))
            {
                files.push((f, Some(k as u32)));
            }
        }
    }
    if files.is_empty() {
        return Err(DataError::Table {
            path: dir.to_path_buf(),
            msg: "no .png/.jpg/.jpeg images in the folder or its subfolders".into(),
        });
    }
    Ok((files, classes))
}

/// One image file as (height, width, u8 HWC pixels), resized to `size` (bilinear) if given, in
/// `channels` channels converted as torchvision's PIL loaders do.
fn decode_image(
    path: &Path,
    size: Option<(usize, usize)>,
    channels: usize,
) -> std::result::Result<(usize, usize, Vec<u8>), String> {
    convert(
        image::open(path).map_err(|e| e.to_string())?,
        size,
        channels,
    )
}

/// [`decode_image`] of encoded bytes in memory (a packed shard's).
pub(crate) fn decode_bytes(
    bytes: &[u8],
    size: Option<(usize, usize)>,
    channels: usize,
) -> std::result::Result<(usize, usize, Vec<u8>), String> {
    convert(
        image::load_from_memory(bytes).map_err(|e| e.to_string())?,
        size,
        channels,
    )
}

/// Whether `path` opens and has a known image header (its size readable), without decoding.
pub(crate) fn check_header(path: &Path) -> std::result::Result<(), String> {
    image::io::Reader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn convert(
    img: image::DynamicImage,
    size: Option<(usize, usize)>,
    channels: usize,
) -> std::result::Result<(usize, usize, Vec<u8>), String> {
    let img = match size {
        Some((h, w)) => img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle),
        None => img,
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let px = if channels == 1 {
        grey_as_pil(img)
    } else {
        // RGBA and palette images drop alpha / expand as PIL's `convert("RGB")`.
        img.into_rgb8().into_raw()
    };
    Ok((h, w, px))
}

/// A folder's image files whose headers read (a known format, a size), with their classes.
pub(crate) struct Readable {
    pub(crate) files: Vec<(PathBuf, Option<u32>)>,
    pub(crate) classes: Vec<String>,
    /// Left out under `OnCorrupt::Skip`.
    pub(crate) skipped: Vec<PathBuf>,
}

/// Lists `dir` ([`list_image_folder`]) and reads every file's header in parallel, without
/// decoding: an unreadable file stops with its path (`Fail`), or is left out with a warning
/// (`Skip`); none left is an error.
pub(crate) fn readable_images(dir: &Path, on_corrupt: OnCorrupt) -> Result<Readable> {
    use rayon::prelude::*;
    let (files, classes) = list_image_folder(dir)?;
    let checked: Vec<std::result::Result<(), String>> = files
        .par_iter()
        .map(|(path, _)| check_header(path))
        .collect();
    let mut kept = Vec::with_capacity(files.len());
    let mut skipped = Vec::new();
    for ((path, label), ok) in files.into_iter().zip(checked) {
        match (ok, on_corrupt) {
            (Ok(()), _) => kept.push((path, label)),
            (Err(msg), OnCorrupt::Fail) => {
                return Err(DataError::Table {
                    path,
                    msg: format!(
                        "cannot read the image ({msg}); set on_corrupt = \"skip\" (pack-images: \
                         --skip-corrupt) to leave it out"
                    ),
                })
            }
            (Err(msg), OnCorrupt::Skip) => {
                eprintln!("warning: skipped {} (cannot read: {msg})", path.display());
                skipped.push(path);
            }
        }
    }
    if kept.is_empty() {
        return Err(DataError::Table {
            path: dir.to_path_buf(),
            msg: "every image was skipped as unreadable".into(),
        });
    }
    Ok(Readable {
        files: kept,
        classes,
        skipped,
    })
}

/// A folder streamed from disk (`stream = true`): the file list and labels only, each file's
/// header read now (in parallel) so that an unreadable or non-image file stops the run before
/// it starts (or is skipped, `on_corrupt = "skip"`); the pixels are decoded per batch.
pub fn stream_image_folder(
    dir: &Path,
    (height, width): (usize, usize),
    channels: usize,
    on_corrupt: OnCorrupt,
) -> Result<ImageSet> {
    if height == 0 || width == 0 {
        return Err(DataError::Config {
            key: "data.*.folder.size",
            msg: format!("must be at least 1x1, got {height}x{width}"),
        });
    }
    let readable = readable_images(dir, on_corrupt)?;
    let labelled = !readable.classes.is_empty();
    let (paths, labels): (Vec<PathBuf>, Vec<Option<u32>>) = readable.files.into_iter().unzip();
    let labels = labelled.then(|| labels.into_iter().flatten().collect());
    let classes = readable.classes;
    let mut set = ImageSet::in_memory((height, width, channels), Vec::new(), labels, classes);
    set.stored = Some(Arc::new(Stored::Files(paths)));
    Ok(set)
}

/// An image in one grey channel as torchvision's loaders make it (PIL's `convert("L")`): colour
/// pixels weighted by ITU-R 601-2, `L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`, alpha
/// dropped; grey images as they are. (The image crate's own `into_luma8` weights by Rec. 709,
/// so the same colour photo would give other grey values than PyTorch's pipeline.)
pub fn grey_as_pil(img: image::DynamicImage) -> Vec<u8> {
    use image::ColorType::*;
    if matches!(img.color(), L8 | La8 | L16 | La16) {
        return img.into_luma8().into_raw();
    }
    img.into_rgb8()
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            ((19595 * r + 38470 * g + 7471 * b + (1 << 15)) >> 16) as u8
        })
        .collect()
}

/// How a pixel CSV is laid out (see [`ImageSource::Csv`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CsvLayout {
    pub label: Option<Column>,
    pub header: bool,
    pub max_value: u32,
}

impl Default for CsvLayout {
    fn default() -> Self {
        CsvLayout {
            label: None,
            header: true,
            max_value: 255,
        }
    }
}

/// Reads a CSV of pixels: `height * width * channels` pixel columns (integers in
/// `0..=max_value`, in column order) and, if given, a label column (class indices 0..k); gzipped
/// when the name ends in `.gz`. Errors name the file, the line and the column.
pub fn read_pixel_csv(
    path: &Path,
    (height, width, channels): (usize, usize, usize),
    layout: &CsvLayout,
) -> Result<ImageSet> {
    let row_err = |line: u64, msg: String| DataError::Row {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let table_err = |msg: String| DataError::Table {
        path: path.to_path_buf(),
        msg,
    };
    if layout.max_value == 0 {
        return Err(table_err("max_value must be at least 1".into()));
    }
    let file = std::fs::File::open(path).map_err(|e| table_err(e.to_string()))?;
    let reader: Box<dyn std::io::Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            file,
        )))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(layout.header)
        .from_reader(reader);
    let header: Vec<String> = if layout.header {
        rdr.headers()
            .map_err(|e| row_err(1, e.to_string()))?
            .iter()
            .map(str::to_string)
            .collect()
    } else {
        Vec::new()
    };
    let column_name = |j: usize| header.get(j).cloned().unwrap_or_else(|| j.to_string());
    let label_idx = match &layout.label {
        None => None,
        Some(Column::Index(j)) => Some(*j),
        Some(Column::Name(name)) => {
            if !layout.header {
                return Err(table_err(format!(
                    "label_column {name:?} names a column, but header = false: give its \
                     0-based index"
                )));
            }
            Some(header.iter().position(|h| h == name).ok_or_else(|| {
                row_err(
                    1,
                    format!("no column named {name:?}; the header has {header:?}"),
                )
            })?)
        }
    };
    let n_pixels = height * width * channels;
    let mut set = ImageSet::in_memory(
        (height, width, channels),
        Vec::new(),
        label_idx.map(|_| Vec::new()),
        Vec::new(),
    );
    let first_line = if layout.header { 2 } else { 1 };
    let max = layout.max_value as u64;
    for (r, rec) in rdr.records().enumerate() {
        let line = r as u64 + first_line;
        let rec = rec.map_err(|e| row_err(line, e.to_string()))?;
        if let Some(j) = label_idx {
            if j >= rec.len() {
                return Err(row_err(
                    line,
                    format!("label column {j} is past the row's {} columns", rec.len()),
                ));
            }
        }
        let mut count = 0;
        for (j, field) in rec.iter().enumerate() {
            let v: u64 = field.trim().parse().map_err(|_| {
                row_err(
                    line,
                    format!(
                        "column {:?}: expected an integer, got {field:?}",
                        column_name(j)
                    ),
                )
            })?;
            if Some(j) == label_idx {
                let label = u32::try_from(v)
                    .map_err(|_| row_err(line, format!("label {v} is not a class index")))?;
                set.labels
                    .as_mut()
                    .expect("labels exist with a label column")
                    .push(label);
                continue;
            }
            if v > max {
                return Err(row_err(
                    line,
                    format!(
                        "column {:?}: pixel {v} is above max_value {max}",
                        column_name(j)
                    ),
                ));
            }
            // Rounded to the nearest of 0..255.
            set.pixels.push(((v * 255 + max / 2) / max) as u8);
            count += 1;
        }
        if count != n_pixels {
            return Err(row_err(
                line,
                format!("{count} pixel values; {height}x{width}x{channels} needs {n_pixels}"),
            ));
        }
    }
    if let Some(l) = &set.labels {
        let k = l.iter().max().map_or(0, |&m| m + 1);
        set.classes = (0..k).map(|i| i.to_string()).collect();
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_dimensions_that_overflow_or_hold_nothing_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.idx");
        // 2^32-ish dimensions whose product wraps to 0 in 64 bits: 2^16 * 2^16 * 2^16 * 2^16.
        for (dims, why) in [
            (vec![65536u32, 65536, 65536, 65536], "overflow"),
            (vec![0u32, 28, 28], "hold no data"),
        ] {
            std::fs::write(&p, idx_bytes(&dims, &[])).unwrap();
            let e = read_idx(&p, None).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn idx_images_and_labels_round_trip_gzipped_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let px: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        let img = dir.path().join("img.idx");
        std::fs::write(&img, idx_bytes(&[2, 3, 4], &px)).unwrap();
        let lab = dir.path().join("lab.idx.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &idx_bytes(&[2], &[7, 1])).unwrap();
        std::fs::write(&lab, gz.finish().unwrap()).unwrap();
        let set = read_idx(&img, Some(&lab)).unwrap();
        assert_eq!(
            (set.len(), set.height, set.width, set.channels),
            (2, 3, 4, 1)
        );
        assert_eq!(&*set.image(1).unwrap(), &px[12..]);
        assert_eq!(set.labels, Some(vec![7, 1]));
        assert_eq!(set.classes.len(), 8);
    }

    #[test]
    fn idx_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("short.idx");
        std::fs::write(&img, idx_bytes(&[2, 3, 4], &[0; 5])).unwrap();
        let e = read_idx(&img, None).unwrap_err().to_string();
        assert!(e.contains("short.idx") && e.contains("24 bytes"), "{e}");
        std::fs::write(&img, b"hello").unwrap();
        let e = read_idx(&img, None).unwrap_err().to_string();
        assert!(e.contains("not an IDX file"), "{e}");
    }

    #[test]
    fn csv_pixels_with_a_label_column_and_bad_rows_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("px.csv");
        let named = |name: &str| CsvLayout {
            label: Some(Column::Name(name.into())),
            ..CsvLayout::default()
        };
        std::fs::write(&p, "label,p0,p1,p2,p3\n3,0,10,20,255\n1,1,2,3,4\n").unwrap();
        let set = read_pixel_csv(&p, (2, 2, 1), &named("label")).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(&*set.image(0).unwrap(), &[0, 10, 20, 255]);
        assert_eq!(set.labels, Some(vec![3, 1]));
        std::fs::write(&p, "label,p0,p1,p2,p3\n3,0,10,20,255\n1,1,2,300,4\n").unwrap();
        let e = read_pixel_csv(&p, (2, 2, 1), &named("label"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("px.csv:3") && e.contains("above max_value 255"),
            "{e}"
        );
        let e = read_pixel_csv(&p, (2, 2, 1), &named("class"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no column named \"class\""), "{e}");
    }

    /// CSVs as people have them: no header row with the label by index (last here), gzipped,
    /// values up to a declared maximum (sklearn's digits: 16) scaled to 0..255; a name without a
    /// header, or a value above the maximum, is an error naming the file and line.
    #[test]
    fn csv_pixels_without_a_header_gzipped_and_of_any_integer_range() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("digits.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"0,8,16,4,7\n16,16,0,1,2\n").unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        let layout = CsvLayout {
            label: Some(Column::Index(4)),
            header: false,
            max_value: 16,
        };
        let set = read_pixel_csv(&p, (2, 2, 1), &layout).unwrap();
        assert_eq!(&*set.image(0).unwrap(), &[0, 128, 255, 64]);
        assert_eq!(&*set.image(1).unwrap(), &[255, 255, 0, 16]);
        assert_eq!(set.labels, Some(vec![7, 2]));
        assert_eq!(set.classes.len(), 8);
        let named = CsvLayout {
            label: Some(Column::Name("label".into())),
            ..layout.clone()
        };
        let e = read_pixel_csv(&p, (2, 2, 1), &named)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("digits.csv.gz") && e.contains("header = false"),
            "{e}"
        );
        let small = CsvLayout {
            max_value: 8,
            ..layout
        };
        let e = read_pixel_csv(&p, (2, 2, 1), &small)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("digits.csv.gz:1") && e.contains("above max_value 8"),
            "{e}"
        );
        // The recipe form: `label_column` a name or an index.
        let src: ImageSource = toml::from_str(
            "csv = { path = \"x.csv\", height = 2, width = 2, label_column = 4, header = false }",
        )
        .unwrap();
        assert!(matches!(
            src,
            ImageSource::Csv {
                label_column: Some(Column::Index(4)),
                ..
            }
        ));
    }

    /// Colour and RGBA images read as grey give PIL's `convert("L")` values (torchvision's
    /// loaders): for (200, 100, 50) PIL gives 124 (601-2 weights), where Rec. 709 would give about 118.
    /// Grey images keep their values; RGBA drops alpha.
    #[test]
    fn colour_images_turn_grey_as_pil_converts_them() {
        let rgb = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            2,
            1,
            image::Rgb([200, 100, 50]),
        ));
        assert_eq!(grey_as_pil(rgb), [124, 124]);
        let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            1,
            1,
            image::Rgba([255, 255, 255, 0]),
        ));
        assert_eq!(grey_as_pil(rgba), [255]);
        let grey =
            image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(1, 1, image::Luma([77])));
        assert_eq!(grey_as_pil(grey), [77]);
    }

    #[test]
    fn image_folder_classes_are_subfolders_and_corrupt_files_are_named_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for (class, shade) in [("cat", 10u8), ("dog", 200u8)] {
            let sub = dir.path().join(class);
            std::fs::create_dir(&sub).unwrap();
            for i in 0..2 {
                image::GrayImage::from_pixel(5, 4, image::Luma([shade + i]))
                    .save(sub.join(format!("{i}.png")))
                    .unwrap();
            }
        }
        let set = read_image_folder(dir.path(), None, 1, OnCorrupt::Fail).unwrap();
        assert_eq!((set.len(), set.height, set.width), (4, 4, 5));
        assert_eq!(set.classes, vec!["cat", "dog"]);
        assert_eq!(set.labels, Some(vec![0, 0, 1, 1]));
        assert_eq!(set.image(3).unwrap()[0], 201);
        let rgb = read_image_folder(dir.path(), Some((2, 3)), 3, OnCorrupt::Fail).unwrap();
        assert_eq!(
            (rgb.height, rgb.width, rgb.channels, rgb.image_len()),
            (2, 3, 3, 18)
        );

        std::fs::write(dir.path().join("dog").join("broken.png"), b"not a png").unwrap();
        let e = read_image_folder(dir.path(), None, 1, OnCorrupt::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("broken.png") && e.contains("cannot decode"),
            "{e}"
        );
        let set = read_image_folder(dir.path(), None, 1, OnCorrupt::Skip).unwrap();
        assert_eq!(set.len(), 4);
    }

    /// A streamed folder holds its file list, not its pixels; each image read decodes the same
    /// pixels the in-memory folder holds (mixed sizes and modes, resized to `size`), and an
    /// unreadable file is named before any image is read, or skipped.
    #[test]
    fn a_streamed_folder_decodes_each_image_when_read_as_the_loaded_one_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a");
        std::fs::create_dir(&sub).unwrap();
        image::GrayImage::from_fn(7, 5, |x, y| image::Luma([(x * 30 + y) as u8]))
            .save(sub.join("0.png"))
            .unwrap();
        image::RgbaImage::from_fn(4, 9, |x, y| {
            image::Rgba([x as u8 * 50, y as u8 * 20, 90, 7])
        })
        .save(sub.join("1.png"))
        .unwrap();
        image::RgbImage::from_fn(6, 6, |x, y| image::Rgb([(x * y) as u8 * 6, 30, 200]))
            .save(sub.join("2.jpg"))
            .unwrap();
        let size = Some((6, 5));
        for channels in [1, 3] {
            let loaded = read_image_folder(dir.path(), size, channels, OnCorrupt::Fail).unwrap();
            let streamed =
                stream_image_folder(dir.path(), (6, 5), channels, OnCorrupt::Fail).unwrap();
            assert!(streamed.pixels.is_empty(), "no pixels held");
            assert_eq!(streamed.len(), 3);
            assert_eq!(streamed.labels, loaded.labels);
            assert_eq!(streamed.image_len(), loaded.image_len());
            for i in 0..3 {
                assert_eq!(
                    streamed.image(i).unwrap(),
                    loaded.image(i).unwrap(),
                    "image {i}"
                );
            }
            assert_eq!(streamed.clone().truncate(2).len(), 2);
        }
        std::fs::write(sub.join("3.png"), b"not a png").unwrap();
        let e = stream_image_folder(dir.path(), (6, 5), 1, OnCorrupt::Fail)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3.png") && e.contains("cannot read"), "{e}");
        let set = stream_image_folder(dir.path(), (6, 5), 1, OnCorrupt::Skip).unwrap();
        assert_eq!(set.len(), 3);
        let src = ImageSource::Folder {
            path: dir.path().to_path_buf(),
            size: None,
            color: "gray".into(),
            on_corrupt: OnCorrupt::Skip,
            stream: true,
        };
        let e = src.load().unwrap_err().to_string();
        assert!(e.contains("size"), "{e}");
    }
}
