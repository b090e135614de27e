//! The decode cache: each image decoded once through the pixel pipeline and resized, then kept as one
//! small file (unorm16 pixels) per image under the cache directory, shared by every worker of a host.
//! An entry is keyed by the file's identity (path, SOP Instance UID, size, modification time) and the
//! preprocessing parameters (image size, pipeline version): any change makes a new key. Every entry
//! carries its full key and a checksum; one that does not verify is rebuilt, never trusted. Entries are
//! written to a temporary file and renamed into place, so concurrent workers and crashes are safe.

use std::path::{Path, PathBuf};

use crate::pixels::{decode_file_with, resize, DecodeError, DecodeOptions};

/// Bump when the pixel pipeline's output changes: old entries then miss instead of lying.
pub const PIPELINE_VERSION: u32 = 1;
const MAGIC: &[u8; 4] = b"SCD2";

/// What identifies one preprocessed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub path: PathBuf,
    pub sop_uid: String,
    pub file_size: u64,
    pub modified_ns: u64,
    pub image_size: u32,
}

impl CacheKey {
    fn text(&self) -> String {
        format!(
            "v{PIPELINE_VERSION}|{}|{}|{}|{}|{}",
            self.path.display(),
            self.sop_uid,
            self.file_size,
            self.modified_ns,
            self.image_size
        )
    }
}

/// How a lookup went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    /// Not there: decoded and stored.
    Miss,
    /// There but unreadable or not matching its checksum: decoded again and replaced.
    Rebuilt,
}

pub struct DecodeCache {
    dir: PathBuf,
    options: DecodeOptions,
}

/// FNV-1a, 64 bits: a short stable name for a key (entry file names, sample ids). Not a checksum: entries
/// carry a CRC-32.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl DecodeCache {
    pub fn open(dir: &Path) -> std::io::Result<DecodeCache> {
        std::fs::create_dir_all(dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create decode cache {}: {e}", dir.display())))?;
        Ok(DecodeCache { dir: dir.to_path_buf(), options: DecodeOptions::default() })
    }

    /// Decodes misses with `options` (`data.color`, `data.accept_no_meta`). They decide which files
    /// decode at all, never what a file decodes to, so they are not part of the key.
    pub fn with_options(mut self, options: DecodeOptions) -> DecodeCache {
        self.options = options;
        self
    }

    fn entry_path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{:016x}.px", fnv1a(key.text().as_bytes())))
    }

    /// The preprocessed image (`image_size`^2 values in [0, 1]) for `key`, decoding `root/key.path`
    /// on a miss. A path that would leave `root` is refused before anything is read.
    pub fn get_or_decode(&self, root: &Path, key: &CacheKey) -> Result<(Vec<f32>, CacheOutcome), DecodeError> {
        let (pixels, outcome) = self.get_or_decode_unorm16(root, key)?;
        Ok((pixels.into_iter().map(from_unorm16).collect(), outcome))
    }

    /// As [`DecodeCache::get_or_decode`], in the stored form: unorm16, v / 65535 in [0, 1] (half the
    /// memory of float32, for readers that convert on the device).
    pub fn get_or_decode_unorm16(&self, root: &Path, key: &CacheKey) -> Result<(Vec<u16>, CacheOutcome), DecodeError> {
        crate::check_inside_root(&key.path).map_err(DecodeError::Refused)?;
        let entry = self.entry_path(key);
        let outcome = match std::fs::read(&entry) {
            Ok(bytes) => match parse_entry(&bytes, key) {
                Some(pixels) => return Ok((pixels, CacheOutcome::Hit)),
                None => {
                    tracing::warn!(entry = %entry.display(), image = %key.path.display(), "corrupt decode-cache entry; rebuilding");
                    CacheOutcome::Rebuilt
                }
            },
            Err(_) => CacheOutcome::Miss,
        };
        let decoded = decode_file_with(&root.join(&key.path), self.options)?;
        if decoded.frames > 1 {
            tracing::info!(image = %key.path.display(), frames = decoded.frames, "multi-frame file: using its first frame");
        }
        // A miss returns what a later hit will (16-bit values), so that a run does not depend on what
        // the cache held when it started.
        let pixels: Vec<u16> = resize(&decoded, key.image_size).into_iter().map(to_unorm16).collect();
        if let Err(e) = self.store(&entry, key, &pixels) {
            // A cache that cannot be written costs time, not correctness.
            tracing::warn!(entry = %entry.display(), error = %e, "cannot write decode-cache entry");
        }
        Ok((pixels, outcome))
    }

    fn store(&self, entry: &Path, key: &CacheKey, pixels: &[u16]) -> std::io::Result<()> {
        let key_text = key.text();
        let mut bytes = Vec::with_capacity(16 + key_text.len() + pixels.len() * 2 + 8);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(key_text.len() as u32).to_le_bytes());
        bytes.extend_from_slice(key_text.as_bytes());
        bytes.extend_from_slice(&(pixels.len() as u32).to_le_bytes());
        for &v in pixels {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let checksum = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        simclr_common::atomic_file::write_bytes_atomic(entry, &bytes)
    }
}

/// The pixels of a verified entry for exactly `key`, or `None`.
fn parse_entry(bytes: &[u8], key: &CacheKey) -> Option<Vec<u16>> {
    let body = bytes.len().checked_sub(4)?;
    let checksum = u32::from_le_bytes(bytes[body..].try_into().ok()?);
    if crc32fast::hash(&bytes[..body]) != checksum || bytes.get(..4)? != MAGIC {
        return None;
    }
    let key_len = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
    let key_text = bytes.get(8..8 + key_len)?;
    if key_text != key.text().as_bytes() {
        return None;
    }
    let at = 8 + key_len;
    let n = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
    if n != (key.image_size as usize).pow(2) || at + 4 + 2 * n != body {
        return None;
    }
    Some(bytes[at + 4..body].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
}

fn to_unorm16(v: f32) -> u16 {
    (v.clamp(0.0, 1.0) * 65535.0).round() as u16
}

fn from_unorm16(v: u16) -> f32 {
    f32::from(v) / 65535.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom_writer::{write_image, Encoding, ImageHeader};

    fn setup() -> (tempfile::TempDir, CacheKey) {
        let dir = tempfile::tempdir().unwrap();
        let header = ImageHeader {
            patient_id: "P".into(),
            study_uid: "2.25.1".into(),
            series_uid: "2.25.2".into(),
            sop_uid: "2.25.3".into(),
            encoding: Encoding::ExplicitVrLittleEndian,
            monochrome1: false,
            bits_stored: 12,
            rescale: None,
            window: None,
            presentation_lut_inverse: false,
        };
        let stored: Vec<u16> = (0..32 * 32).map(|i| (i * 4) as u16).collect();
        write_image(&dir.path().join("a.dcm"), &header, 32, 32, &stored).unwrap();
        let key =
            CacheKey { path: "a.dcm".into(), sop_uid: "2.25.3".into(), file_size: 1, modified_ns: 2, image_size: 16 };
        (dir, key)
    }

    #[test]
    fn miss_then_hit_with_the_same_pixels_and_new_parameters_miss() {
        let (dir, key) = setup();
        let cache = DecodeCache::open(&dir.path().join("cache")).unwrap();
        let (first, o1) = cache.get_or_decode(dir.path(), &key).unwrap();
        let (second, o2) = cache.get_or_decode(dir.path(), &key).unwrap();
        assert_eq!((o1, o2), (CacheOutcome::Miss, CacheOutcome::Hit));
        // A miss returns exactly what a later hit reads back (unorm16), so that a run does not depend on
        // what the cache held when it started.
        assert_eq!(first, second);
        let bigger = CacheKey { image_size: 8, ..key.clone() };
        assert_eq!(cache.get_or_decode(dir.path(), &bigger).unwrap().1, CacheOutcome::Miss);
        let touched = CacheKey { modified_ns: 3, ..key };
        assert_eq!(cache.get_or_decode(dir.path(), &touched).unwrap().1, CacheOutcome::Miss);
    }

    #[test]
    fn a_path_outside_the_root_is_refused_even_when_the_file_is_readable() {
        let (dir, key) = setup();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let cache = DecodeCache::open(&dir.path().join("cache")).unwrap();
        // dir/a.dcm is a good image, one level above the root.
        let escape = CacheKey { path: "../a.dcm".into(), ..key.clone() };
        let err = cache.get_or_decode(&root, &escape).unwrap_err().to_string();
        assert!(err.starts_with("refused") && err.contains("../a.dcm"), "{err}");
        let absolute = CacheKey { path: dir.path().join("a.dcm"), ..key };
        let err = cache.get_or_decode(&root, &absolute).unwrap_err().to_string();
        assert!(err.contains("absolute"), "{err}");
    }

    #[test]
    fn corrupt_or_truncated_entries_are_rebuilt_not_trusted() {
        let (dir, key) = setup();
        let cache = DecodeCache::open(&dir.path().join("cache")).unwrap();
        let (good, _) = cache.get_or_decode(dir.path(), &key).unwrap();
        let entry = cache.entry_path(&key);
        let mut bytes = std::fs::read(&entry).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&entry, &bytes).unwrap();
        let (again, outcome) = cache.get_or_decode(dir.path(), &key).unwrap();
        assert_eq!(outcome, CacheOutcome::Rebuilt);
        assert_eq!(again, good);
        std::fs::write(&entry, &bytes[..10]).unwrap();
        assert_eq!(cache.get_or_decode(dir.path(), &key).unwrap().1, CacheOutcome::Rebuilt);
        assert_eq!(cache.get_or_decode(dir.path(), &key).unwrap().1, CacheOutcome::Hit);
    }
}
