//! Any IDX image data set in a directory: the four standard files (MNIST, FashionMNIST,
//! KMNIST, EMNIST layouts), each plain or gzip-compressed.
//!
//! A file is found by its stem (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`), also spelled with `.idx3` instead of
//! `-idx3` and with a `.gz` suffix, and with a prefix (`emnist-digits-train-images-…`) when
//! exactly one file in the directory matches. Checks: the magic number, dims that match the
//! (decompressed) bytes exactly, at least one item, as many labels as images, train and test
//! images of one size, and test labels among the train labels' classes.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::data::{DataSet, Split, MNIST_SCALE};

/// Largest IDX payload read (bytes after decompression): 60,000 28×28 images are 47 MB;
/// a header claiming more is refused before anything is allocated.
const MAX_PAYLOAD: u64 = 1 << 31;
/// Most classes a label file may name (EMNIST byclass has 62).
const MAX_CLASSES: usize = 1000;

pub(crate) const IMAGES_MAGIC: u32 = 0x803;
const LABELS_MAGIC: u32 = 0x801;

/// An IDX data set with its image size (for the convolutional trunk).
pub struct IdxData {
    pub set: DataSet,
    pub height: usize,
    pub width: usize,
}

/// Finds the file of `stem` in `dir` (see the module docs for the spellings).
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    let dotted = stem.replace("-idx", ".idx");
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?;
    let mut matches = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read directory {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let bare = name.strip_suffix(".gz").unwrap_or(&name);
        if bare.ends_with(stem) || bare.ends_with(&dotted) {
            matches.push(entry.path());
        }
    }
    matches.sort();
    match matches.len() {
        1 => Ok(matches.remove(0)),
        0 => bail!(
            "{}: no IDX file `{stem}` (expected train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or .gz)",
            dir.display()
        ),
        _ => bail!(
            "{}: several files match `{stem}`: {}; keep one",
            dir.display(),
            matches
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The IDX files of `splits` (`"train"`, `"t10k"`) that the loader would read from `dir`:
/// the inputs an output path is checked against before any work. A file that is missing or
/// ambiguous is left out (the loader reports it when it reads).
pub fn input_files(dir: &Path, splits: &[&str]) -> Vec<PathBuf> {
    splits
        .iter()
        .flat_map(|split| {
            ["images-idx3-ubyte", "labels-idx1-ubyte"].map(|kind| format!("{split}-{kind}"))
        })
        .filter_map(|stem| find(dir, &stem).ok())
        .collect()
}

/// An IDX file opened and its header read: the dims, the item count they promise, the
/// reader positioned at the items, and the length on disk of a plain (not gzip) file.
struct Opened {
    dims: Vec<usize>,
    count: u64,
    reader: Box<dyn Read>,
    plain_len: Option<u64>,
}

/// Opens an IDX file of unsigned bytes with `rank` dims and reads its header (magic and
/// dims, checked). Gzip is recognised by its magic bytes, not by the name.
fn open_idx(path: &Path, magic: u32, rank: usize) -> Result<Opened> {
    let origin = path.display();
    let file = gauss_layer::files::open_regular(path)?;
    let file_len = file.metadata().ok().map(|m| m.len());
    let mut head = [0u8; 2];
    let mut peek = std::io::BufReader::new(file);
    let gz = {
        use std::io::BufRead;
        let buf = peek
            .fill_buf()
            .with_context(|| format!("cannot read {origin}"))?;
        if buf.len() >= 2 {
            head.copy_from_slice(&buf[..2]);
        }
        head == [0x1f, 0x8b]
    };
    let mut reader: Box<dyn Read> = if gz {
        // Every member: `cat a.gz b.gz` and parallel compressors (pigz, bgzip) write several,
        // and `GzDecoder` would stop after the first and report the items missing.
        Box::new(flate2::read::MultiGzDecoder::new(peek))
    } else {
        Box::new(peek)
    };
    let header_len = 4 + 4 * rank;
    let mut header = vec![0u8; header_len];
    reader.read_exact(&mut header).with_context(|| {
        format!("{origin}: too short for an IDX file (or a broken gzip stream)")
    })?;
    let word =
        |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if word(0) != magic {
        bail!(
            "{origin}: IDX magic number is {:#x}, expected {magic:#x}",
            word(0)
        );
    }
    let dims: Vec<usize> = (0..rank).map(|i| word(4 + 4 * i) as usize).collect();
    let count = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|c| (1..=MAX_PAYLOAD).contains(c));
    let Some(count) = count else {
        bail!("{origin}: IDX dims {dims:?} hold no item or more than {MAX_PAYLOAD} bytes");
    };
    Ok(Opened {
        dims,
        count,
        reader,
        plain_len: if gz {
            None
        } else {
            file_len.map(|len| len.saturating_sub(header_len as u64))
        },
    })
}

/// The items of `path` number exactly `count` (`found`: how many are there).
fn check_item_count(path: &Path, dims: &[usize], count: u64, found: u64) -> Result<()> {
    let origin = path.display();
    if found > count {
        bail!("{origin}: the file has more bytes than its IDX dims {dims:?} need ({count})");
    }
    if found < count {
        bail!("{origin}: IDX dims {dims:?} need {count} bytes of items, the file has {found}");
    }
    Ok(())
}

/// Reads an IDX file of unsigned bytes with `rank` dims: returns the dims and the items.
/// Gzip is recognised by its magic bytes, not by the name.
pub fn read_idx(path: &Path, magic: u32, rank: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let Opened {
        dims,
        count,
        mut reader,
        ..
    } = open_idx(path, magic, rank)?;
    // Reads at most count + 1 bytes: memory follows the data actually there, not the header.
    let mut items = Vec::new();
    reader
        .by_ref()
        .take(count + 1)
        .read_to_end(&mut items)
        .with_context(|| {
            format!(
                "{}: cannot read the items (broken gzip stream?)",
                path.display()
            )
        })?;
    check_item_count(path, &dims, count, items.len() as u64)?;
    Ok((dims, items))
}

/// The dims of an IDX file, with its item count checked against them: a plain file's by its
/// length, a gzip file's by decompressing it once and keeping nothing (a cut-short `.gz`
/// fails here, before any work, not when its items are read).
fn read_dims(path: &Path, magic: u32, rank: usize) -> Result<Vec<usize>> {
    let Opened {
        dims,
        count,
        reader,
        plain_len,
    } = open_idx(path, magic, rank)?;
    let found = match plain_len {
        Some(len) => len,
        None => {
            std::io::copy(&mut reader.take(count + 1), &mut std::io::sink()).with_context(|| {
                format!(
                    "{}: cannot read the items (broken gzip stream?)",
                    path.display()
                )
            })?
        }
    };
    check_item_count(path, &dims, count, found)?;
    Ok(dims)
}

struct RawSplit {
    n: usize,
    height: usize,
    width: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

fn raw_split(dir: &Path, prefix: &str) -> Result<RawSplit> {
    let (idims, pixels) = read_idx(
        &find(dir, &format!("{prefix}-images-idx3-ubyte"))?,
        IMAGES_MAGIC,
        3,
    )?;
    let (ldims, labels) = read_idx(
        &find(dir, &format!("{prefix}-labels-idx1-ubyte"))?,
        LABELS_MAGIC,
        1,
    )?;
    if idims[0] != ldims[0] {
        bail!(
            "{}: {prefix} has {} images but {} labels",
            dir.display(),
            idims[0],
            ldims[0]
        );
    }
    Ok(RawSplit {
        n: idims[0],
        height: idims[1],
        width: idims[2],
        pixels,
        labels,
    })
}

fn to_split(raw: RawSplit) -> Result<Split> {
    let images = Tensor::from_vec(raw.pixels, (raw.n, raw.height * raw.width), &Device::Cpu)?;
    Ok(Split {
        images: (images.to_dtype(DType::F32)? / MNIST_SCALE)?,
        labels: Tensor::from_vec(raw.labels, raw.n, &Device::Cpu)?.to_dtype(DType::U32)?,
    })
}

/// The image size (height, width) of the test split in `dir`, from the IDX headers alone
/// (both `t10k` files found, their magic numbers and dims checked, as many labels as
/// images): what an `--ood` directory is checked by before any work.
pub fn test_image_size(dir: &Path) -> Result<(usize, usize)> {
    let images = read_dims(&find(dir, "t10k-images-idx3-ubyte")?, IMAGES_MAGIC, 3)?;
    let labels = read_dims(&find(dir, "t10k-labels-idx1-ubyte")?, LABELS_MAGIC, 1)?;
    if images[0] != labels[0] {
        bail!(
            "{}: t10k has {} images but {} labels",
            dir.display(),
            images[0],
            labels[0]
        );
    }
    Ok((images[1], images[2]))
}

/// Only the test split of the IDX set in `dir` (for `eval` and out-of-distribution sets: the
/// train files need not be there).
pub fn test_split(dir: &Path) -> Result<(Split, usize, usize)> {
    let raw = raw_split(dir, "t10k")?;
    let (h, w) = (raw.height, raw.width);
    Ok((to_split(raw)?, h, w))
}

/// The train and test splits of the IDX set in `dir`, pixels divided by 255.
pub fn load(dir: &Path) -> Result<IdxData> {
    let train = raw_split(dir, "train")?;
    let test = raw_split(dir, "t10k")?;
    if (train.height, train.width) != (test.height, test.width) {
        bail!(
            "{}: train images are {}×{}, test images {}×{}",
            dir.display(),
            train.height,
            train.width,
            test.height,
            test.width
        );
    }
    let classes = train.labels.iter().copied().max().unwrap_or(0) as usize + 1;
    if !(2..=MAX_CLASSES).contains(&classes) {
        bail!(
            "{}: train labels name {classes} classes, expected 2 to {MAX_CLASSES}",
            dir.display()
        );
    }
    if let Some(bad) = test.labels.iter().find(|&&l| l as usize >= classes) {
        bail!(
            "{}: test label {bad} is not a class of the train labels (0 to {})",
            dir.display(),
            classes - 1
        );
    }
    let (height, width) = (train.height, train.width);
    Ok(IdxData {
        set: DataSet {
            name: "idx",
            input_scale: MNIST_SCALE,
            classes,
            train: to_split(train)?,
            test: to_split(test)?,
        },
        height,
        width,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::io::Write;

    /// IDX bytes: magic, dims, items.
    pub fn idx_bytes(magic: u32, dims: &[u32], items: &[u8]) -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(items);
        out
    }

    pub fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// A directory holding a tiny IDX set: `n` train and `n` test 4×3 images whose pixel p
    /// of image i is (i·12 + p) % 256, labels i % classes.
    pub fn write_set(name: &str, n: usize, classes: u8, compressed: bool) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fgn-idx-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pixels: Vec<u8> = (0..n * 12).map(|v| (v % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| i as u8 % classes).collect();
        for prefix in ["train", "t10k"] {
            let files = [
                (
                    format!("{prefix}-images-idx3-ubyte"),
                    idx_bytes(IMAGES_MAGIC, &[n as u32, 4, 3], &pixels),
                ),
                (
                    format!("{prefix}-labels-idx1-ubyte"),
                    idx_bytes(LABELS_MAGIC, &[n as u32], &labels),
                ),
            ];
            for (file, bytes) in files {
                if compressed {
                    std::fs::write(dir.join(format!("{file}.gz")), gzip(&bytes)).unwrap();
                } else {
                    std::fs::write(dir.join(file), bytes).unwrap();
                }
            }
        }
        dir
    }

    #[test]
    fn plain_and_gzip_read_the_same_pixels() {
        for compressed in [false, true] {
            let dir = write_set(&format!("same-{compressed}"), 5, 3, compressed);
            let data = load(&dir).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            assert_eq!((data.height, data.width, data.set.classes), (4, 3, 3));
            let images = data.set.train.images.to_vec2::<f32>().unwrap();
            assert_eq!(images.len(), 5);
            // Pixel 7 of image 2 is (2·12 + 7) = 31, divided by 255 (in f32).
            assert!((images[2][7] - 31.0 / 255.0).abs() < 1e-7);
            assert_eq!(
                data.set.test.labels.to_vec1::<u32>().unwrap(),
                vec![0, 1, 2, 0, 1]
            );
        }
    }

    /// A gzip file of two members (as `cat a.gz b.gz` or pigz write it) is read whole: the
    /// items are every byte of both parts.
    #[test]
    fn a_gzip_file_of_several_members_is_read_whole() {
        let dir = write_set("members", 4, 2, false);
        let path = dir.join("t10k-images-idx3-ubyte");
        let bytes = std::fs::read(&path).unwrap();
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        let mut two = gzip(head);
        two.extend_from_slice(&gzip(tail));
        std::fs::remove_file(&path).unwrap();
        let gz = dir.join("t10k-images-idx3-ubyte.gz");
        std::fs::write(&gz, two).unwrap();
        let (dims, items) = read_idx(&gz, IMAGES_MAGIC, 3).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(dims, vec![4, 4, 3]);
        assert_eq!(items, bytes[16..].to_vec());
    }

    #[test]
    fn dotted_and_prefixed_names_are_found() {
        let dir = write_set("names", 2, 2, true);
        for stem in ["train-images", "t10k-labels"] {
            let kind = if stem.ends_with("images") {
                "idx3"
            } else {
                "idx1"
            };
            let from = dir.join(format!("{stem}-{kind}-ubyte.gz"));
            let to = if stem.starts_with("train") {
                dir.join(format!("emnist-digits-{stem}-{kind}-ubyte.gz"))
            } else {
                dir.join(format!("{stem}.{kind}-ubyte.gz"))
            };
            std::fs::rename(from, to).unwrap();
        }
        let data = load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(data.set.train.len(), 2);
    }

    #[test]
    fn damaged_files_are_refused_with_a_reason() {
        let dir = write_set("damaged", 3, 3, false);
        let images = dir.join("train-images-idx3-ubyte");
        let labels = dir.join("train-labels-idx1-ubyte");
        let error = |dir: &Path| format!("{:#}", load(dir).err().unwrap());
        // Wrong magic.
        std::fs::write(&images, idx_bytes(0x801, &[3, 4, 3], &[0; 36])).unwrap();
        assert!(error(&dir).contains("magic number is 0x801"));
        // Dims that promise more bytes than the file holds (gzip too).
        std::fs::write(
            &images,
            gzip(&idx_bytes(IMAGES_MAGIC, &[3, 4, 3], &[0; 35])),
        )
        .unwrap();
        assert!(error(&dir).contains("need 36 bytes"), "{}", error(&dir));
        // A header claiming 4 GB is refused before reading.
        std::fs::write(&images, idx_bytes(IMAGES_MAGIC, &[65535, 65535, 2], &[])).unwrap();
        assert!(error(&dir).contains("more than"));
        // Trailing bytes.
        std::fs::write(&images, idx_bytes(IMAGES_MAGIC, &[3, 4, 3], &[0; 37])).unwrap();
        assert!(error(&dir).contains("the file has more"));
        // Counts that disagree.
        std::fs::write(&images, idx_bytes(IMAGES_MAGIC, &[3, 4, 3], &[0; 36])).unwrap();
        std::fs::write(&labels, idx_bytes(LABELS_MAGIC, &[2], &[0, 1])).unwrap();
        assert!(error(&dir).contains("3 images but 2 labels"));
        // A test label the training set never names.
        std::fs::write(&labels, idx_bytes(LABELS_MAGIC, &[3], &[0, 1, 1])).unwrap();
        assert!(error(&dir).contains("test label 2"));
        // A missing file.
        std::fs::remove_file(&images).unwrap();
        assert!(error(&dir).contains("no IDX file `train-images-idx3-ubyte`"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
