//! TensorFlow checkpoints (`tf.train.Checkpoint`, `tf.compat.v1.train.Saver`, a SavedModel's
//! `variables/`): a tensor bundle, `PREFIX.index` and `PREFIX.data-SSSSS-of-NNNNN`.
//!
//! The index is a LevelDB-format table (TensorFlow's `core/lib/io/table`): data blocks of
//! prefix-compressed entries with a restart array, an index block pointing at them, and a 48-byte
//! footer (two block handles, padding, magic 0xdb4775248b80fb57). Each entry maps a tensor's name to a
//! `BundleEntryProto` (dtype, shape, shard, offset, size, crc32c); the empty name holds the
//! `BundleHeaderProto`. The tensor's bytes are `size` bytes at `offset` of its shard, little-endian.
//! Bundles are written without block compression; a compressed block is refused by name.
//!
//! Why not a crate: the `tensorflow` crate links libtensorflow, and the LevelDB table readers read
//! LevelDB's own files (other comparator and compression defaults); the format here is small.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::torch_file::{DType, RawTensor};
use super::ImportError;

const MAGIC: u64 = 0xdb47_7524_8b80_fb57;
const FOOTER: usize = 48;

#[derive(Clone, PartialEq, prost::Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
    #[prost(bool, tag = "3")]
    unknown_rank: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BundleEntryProto {
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
    #[prost(int32, tag = "3")]
    shard_id: i32,
    #[prost(int64, tag = "4")]
    offset: i64,
    #[prost(int64, tag = "5")]
    size: i64,
    #[prost(fixed32, tag = "6")]
    crc32c: u32,
    /// Partitioned variables' slices: not supported.
    #[prost(bytes = "vec", repeated, tag = "7")]
    slices: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BundleHeaderProto {
    #[prost(int32, tag = "1")]
    num_shards: i32,
    /// 0 little-endian, 1 big-endian.
    #[prost(int32, tag = "2")]
    endianness: i32,
}

/// TensorFlow's `DataType` numbers (types.proto) for the element types a checkpoint's weights use.
fn dtype(code: i32) -> Option<DType> {
    Some(match code {
        1 => DType::F32,
        2 => DType::F64,
        3 => DType::I32,
        4 => DType::U8,
        5 => DType::I16,
        6 => DType::I8,
        9 => DType::I64,
        10 => DType::Bool,
        14 => DType::BF16,
        19 => DType::F16,
        _ => return None,
    })
}

fn varint(data: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// A block's (offset, size) in the index file.
fn handle(data: &[u8], pos: &mut usize) -> Result<(usize, usize), String> {
    let offset = usize::try_from(varint(data, pos)?).map_err(|e| e.to_string())?;
    let size = usize::try_from(varint(data, pos)?).map_err(|e| e.to_string())?;
    Ok((offset, size))
}

/// The (key, value) entries of the block at `(offset, size)`.
/// A table entry: key and value bytes.
type Entry = (Vec<u8>, Vec<u8>);

fn block(file: &[u8], (offset, size): (usize, usize)) -> Result<Vec<Entry>, String> {
    let end = offset.checked_add(size).filter(|&e| e + 5 <= file.len()).ok_or("a block past the end of the index")?;
    let compression = file[end];
    if compression != 0 {
        return Err(format!("a block with compression type {compression} (only uncompressed bundles are read)"));
    }
    let data = &file[offset..end];
    if data.len() < 4 {
        return Err("a block shorter than its restart count".into());
    }
    let restarts = u32::from_le_bytes(data[data.len() - 4..].try_into().expect("4 bytes")) as usize;
    let entries_end = data.len().checked_sub(4 + 4 * restarts).ok_or("a restart array longer than its block")?;
    let mut out: Vec<Entry> = Vec::new();
    let mut pos = 0;
    let mut key: Vec<u8> = Vec::new();
    while pos < entries_end {
        let shared = varint(data, &mut pos)? as usize;
        let unshared = varint(data, &mut pos)? as usize;
        let value_len = varint(data, &mut pos)? as usize;
        if shared > key.len() {
            return Err("an entry sharing more of the key than there is".into());
        }
        let key_end = pos.checked_add(unshared).filter(|&e| e <= entries_end).ok_or("a truncated key")?;
        key.truncate(shared);
        key.extend_from_slice(&data[pos..key_end]);
        let value_end = key_end.checked_add(value_len).filter(|&e| e <= entries_end).ok_or("a truncated value")?;
        out.push((key.clone(), data[key_end..value_end].to_vec()));
        pos = value_end;
    }
    Ok(out)
}

/// `PATH` may name the prefix, the `.index` file or a data shard.
pub fn bundle_prefix(path: &Path) -> Option<PathBuf> {
    let text = path.to_string_lossy();
    if let Some(prefix) = text.strip_suffix(".index") {
        return Some(PathBuf::from(prefix));
    }
    if let Some(at) = text.rfind(".data-") {
        return Some(PathBuf::from(&text[..at]));
    }
    let index = PathBuf::from(format!("{text}.index"));
    index.is_file().then(|| path.to_path_buf())
}

/// Every numeric tensor of the bundle at `prefix`, by name (string tensors such as the object graph
/// are left out).
pub fn read_bundle(prefix: &Path) -> Result<BTreeMap<String, RawTensor>, ImportError> {
    BundleIndex::open(prefix)?.read(|_| true)
}

/// A bundle's index: every tensor's name, type, shape and place, with no tensor data read yet.
pub struct BundleIndex {
    prefix: PathBuf,
    index_path: PathBuf,
    shards: i32,
    entries: Vec<(String, DType, Vec<usize>, BundleEntryProto)>,
}

impl BundleIndex {
    pub fn open(prefix: &Path) -> Result<BundleIndex, ImportError> {
        let index_path = PathBuf::from(format!("{}.index", prefix.display()));
        let bad = |reason: String| ImportError::Unreadable { path: index_path.clone(), reason };
        let index = std::fs::read(&index_path).map_err(|e| bad(e.to_string()))?;
        let raw = read_index(&index).map_err(bad)?;
        let mut header = BundleHeaderProto { num_shards: 1, endianness: 0 };
        let mut entries = Vec::new();
        for (key, value) in raw {
            let decode_error = |e: prost::DecodeError| bad(e.to_string());
            if key.is_empty() {
                header = prost::Message::decode(value.as_slice()).map_err(decode_error)?;
                continue;
            }
            let name = String::from_utf8_lossy(&key).into_owned();
            let entry: BundleEntryProto = prost::Message::decode(value.as_slice()).map_err(decode_error)?;
            let Some(dtype) = dtype(entry.dtype) else { continue };
            let shape: Vec<usize> = entry
                .shape
                .as_ref()
                .map(|s| s.dim.iter().map(|d| usize::try_from(d.size).unwrap_or(0)).collect())
                .unwrap_or_default();
            entries.push((name, dtype, shape, entry));
        }
        if header.endianness != 0 {
            return Err(bad("a big-endian bundle".into()));
        }
        Ok(BundleIndex { prefix: prefix.to_path_buf(), index_path, shards: header.num_shards.max(1), entries })
    }

    /// Every numeric tensor's shape, by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.entries.iter().map(|(name, _, shape, _)| (name.clone(), shape.clone())).collect()
    }

    /// The tensors whose names `keep` accepts, each read from its shard where it lies (a checkpoint's
    /// optimiser slots and moving averages, often twice the weights, are never read).
    pub fn read(&self, keep: impl Fn(&str) -> bool) -> Result<BTreeMap<String, RawTensor>, ImportError> {
        use std::io::{Read, Seek, SeekFrom};
        let bad = |path: &Path, reason: String| ImportError::Unreadable { path: path.to_path_buf(), reason };
        let mut files: BTreeMap<i32, (PathBuf, std::fs::File, u64)> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (name, dtype, shape, entry) in &self.entries {
            if !keep(name) {
                continue;
            }
            if !entry.slices.is_empty() {
                return Err(bad(&self.index_path, format!("{name}: a partitioned variable (slices) is not supported")));
            }
            let (shard_path, file, len) = match files.entry(entry.shard_id) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let path = PathBuf::from(format!(
                        "{}.data-{:05}-of-{:05}",
                        self.prefix.display(),
                        entry.shard_id,
                        self.shards
                    ));
                    let file = std::fs::File::open(&path).map_err(|e| bad(&path, e.to_string()))?;
                    let len = file.metadata().map_err(|e| bad(&path, e.to_string()))?.len();
                    v.insert((path, file, len))
                }
            };
            let (offset, size) = (entry.offset.max(0) as u64, entry.size.max(0) as usize);
            let expected = shape.iter().product::<usize>() * dtype.size();
            if size != expected {
                return Err(bad(shard_path, format!("{name}: {size} bytes for shape {shape:?} of {dtype:?}")));
            }
            if offset.checked_add(size as u64).is_none_or(|end| end > *len) {
                return Err(bad(shard_path, format!("{name}: bytes {offset}..+{size} lie past the end")));
            }
            let mut data = vec![0u8; size];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut data))
                .map_err(|e| bad(shard_path, format!("{name}: {e}")))?;
            if entry.crc32c != 0 && simclr_common::crc32c::masked_crc32c(&data) != entry.crc32c {
                return Err(bad(shard_path, format!("{name}: checksum mismatch (a corrupt or truncated shard)")));
            }
            out.insert(name.clone(), RawTensor { dtype: *dtype, shape: shape.clone(), data });
        }
        Ok(out)
    }
}

fn read_index(file: &[u8]) -> Result<Vec<Entry>, String> {
    if file.len() < FOOTER {
        return Err("shorter than a table footer".into());
    }
    let footer = &file[file.len() - FOOTER..];
    let magic = u64::from_le_bytes(footer[40..48].try_into().expect("8 bytes"));
    if magic != MAGIC {
        return Err("not a TensorFlow checkpoint index (no table magic number)".into());
    }
    let mut pos = 0;
    let _metaindex = handle(footer, &mut pos)?;
    let index = handle(footer, &mut pos)?;
    let mut out = Vec::new();
    for (_, value) in block(file, index)? {
        let mut p = 0;
        out.extend(block(file, handle(&value, &mut p)?)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixtures_keys_share_prefixes_across_several_restart_points() {
        // Keys are stored as the part that differs from the previous key, with a full key every 16
        // entries (a restart point): the object-based fixture has 130 entries.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tf/object/ckpt.index");
        let file = std::fs::read(path).unwrap();
        let footer = &file[file.len() - FOOTER..];
        let mut pos = 0;
        let _ = handle(footer, &mut pos).unwrap();
        let index = handle(footer, &mut pos).unwrap();
        let (_, first) = &block(&file, index).unwrap()[0];
        let (offset, size) = handle(first, &mut 0).unwrap();
        let restarts = u32::from_le_bytes(file[offset + size - 4..offset + size].try_into().unwrap());
        assert!(restarts >= 2, "{restarts} restart points");
        let names: Vec<Vec<u8>> = read_index(&file).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names.len(), 130, "the header, the object graph and 128 variables");
        assert!(names.windows(2).all(|w| w[0] < w[1]), "keys in order");
        assert!(names.iter().any(|k| k.starts_with(b"model/many/119/")));
    }

    #[test]
    fn varints_and_truncation() {
        let mut pos = 0;
        assert_eq!(varint(&[0xac, 0x02], &mut pos).unwrap(), 300);
        assert_eq!(pos, 2);
        assert!(varint(&[0x80], &mut 0).is_err());
        assert!(read_index(&[0u8; 10]).is_err());
    }
}
