//! Tensors out of the files PyTorch's ecosystem writes: `torch.save` archives (the zip format of
//! torch >= 1.6, and the older single-stream format), TorchScript archives (`torch.jit.save`: the same
//! zip layout, the module's attributes pickled as objects' states), and safetensors (timm's and Hugging Face's
//! downloads). Everything reachable through nested dicts, lists and objects' states is flattened to
//! dotted names (`state_dict.backbone.conv1.weight`, `optimizer_states.0.state.3.momentum_buffer`), so
//! one key-matching step ([`crate::import::resnet_keys`]) finds the encoder in a plain state dict, a
//! Lightning checkpoint or a solo-learn one alike.
//!
//! Layout of the zip format (torch/serialization.py): `ARCHIVE/data.pkl` holds the object graph, in which
//! each tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and each storage a
//! persistent id `("storage", torch.FloatStorage, key, location, numel)` whose bytes are the entry
//! `ARCHIVE/data/KEY`, little-endian unless `ARCHIVE/byteorder` says otherwise. The legacy format is a
//! sequence of pickles (magic number, protocol, system info, the object graph with the same kind of
//! persistent ids, the storage keys), then each storage as an 8-byte element count and its bytes.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use super::pickle::{self, Hooks, Value};
use super::ImportError;

/// Element types a checkpoint's tensors come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    fn from_storage(name: &str) -> Option<DType> {
        Some(match name {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

/// A tensor read from a checkpoint: contiguous, row-major, little-endian elements of `dtype`.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as f32 (floats converted; integers as their value).
    pub fn to_f32(&self) -> Vec<f32> {
        if self.dtype == DType::F32 {
            return self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        }
        let n = self.numel();
        let mut out = Vec::with_capacity(n);
        let d = &self.data;
        for i in 0..n {
            let v = match self.dtype {
                DType::F32 => f32::from_le_bytes(d[4 * i..4 * i + 4].try_into().expect("4 bytes")),
                DType::F64 => f64::from_le_bytes(d[8 * i..8 * i + 8].try_into().expect("8 bytes")) as f32,
                DType::F16 => half::f16::from_le_bytes([d[2 * i], d[2 * i + 1]]).to_f32(),
                DType::BF16 => half::bf16::from_le_bytes([d[2 * i], d[2 * i + 1]]).to_f32(),
                DType::I64 | DType::I32 | DType::I16 | DType::I8 | DType::U8 | DType::Bool => self.int_at(i) as f32,
            };
            out.push(v);
        }
        out
    }

    /// Element `i` as an integer (for integer tensors such as `num_batches_tracked`).
    pub fn int_at(&self, i: usize) -> i64 {
        let d = &self.data;
        match self.dtype {
            DType::I64 => i64::from_le_bytes(d[8 * i..8 * i + 8].try_into().expect("8 bytes")),
            DType::I32 => i32::from_le_bytes(d[4 * i..4 * i + 4].try_into().expect("4 bytes")) as i64,
            DType::I16 => i16::from_le_bytes([d[2 * i], d[2 * i + 1]]) as i64,
            DType::I8 => d[i] as i8 as i64,
            DType::U8 | DType::Bool => d[i] as i64,
            DType::F32 | DType::F64 | DType::F16 | DType::BF16 => self.to_f32()[i] as i64,
        }
    }
}

/// A storage as the pickle refers to it; its bytes are read once the whole graph is known.
#[derive(Debug)]
struct StorageRef {
    key: String,
    dtype: DType,
}

/// A tensor as the pickle describes it: a strided view of a storage.
#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Default)]
struct TorchHooks {
    storages: HashMap<String, Rc<StorageRef>>,
}

fn ints(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    v.items()
        .ok_or_else(|| format!("{what} is not a tuple"))?
        .iter()
        .map(|x| x.as_int().and_then(|i| usize::try_from(i).ok()).ok_or_else(|| format!("{what} holds a non-integer")))
        .collect()
}

impl Hooks for TorchHooks {
    fn persistent_load(&mut self, id: Value) -> Result<Value, String> {
        let parts = id.items().ok_or("a persistent id that is not a tuple")?;
        if parts.first().and_then(Value::as_str) != Some("storage") || parts.len() < 5 {
            return Err(format!("a persistent id that is not a storage: {parts:?}"));
        }
        let type_name = parts[1].global_name().map(|(_, n)| n).ok_or("a storage type that is not a class")?;
        let dtype = DType::from_storage(type_name).ok_or_else(|| format!("unsupported storage type {type_name}"))?;
        let key = match &parts[2] {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            other => return Err(format!("a storage key that is not text: {other:?}")),
        };
        let storage = self.storages.entry(key.clone()).or_insert_with(|| Rc::new(StorageRef { key, dtype })).clone();
        Ok(Value::Persistent(storage))
    }

    fn call(&mut self, module: &str, name: &str, args: &[Value]) -> Result<Option<Value>, String> {
        match (module, name) {
            ("collections", "OrderedDict") => Ok(Some(Value::Dict(Rc::new(RefCell::new(Vec::new()))))),
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                if args.len() < 4 {
                    return Err(format!("{name} with {} arguments", args.len()));
                }
                let storage = match &args[0] {
                    Value::Persistent(p) => {
                        p.clone().downcast::<StorageRef>().map_err(|_| "a tensor whose storage is not a storage")?
                    }
                    other => return Err(format!("a tensor whose storage is {other:?}")),
                };
                let offset = args[1].as_int().and_then(|i| usize::try_from(i).ok()).ok_or("a bad storage offset")?;
                let shape = ints(&args[2], "a tensor's size")?;
                let stride = ints(&args[3], "a tensor's stride")?;
                if shape.len() != stride.len() {
                    return Err("a tensor whose size and stride differ in length".into());
                }
                Ok(Some(Value::Persistent(Rc::new(TensorRef { storage, offset, shape, stride }))))
            }
            // nn.Parameter(data, requires_grad, hooks[, state]): the data.
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                Ok(Some(args.first().cloned().ok_or("a parameter without data")?))
            }
            _ => Ok(None),
        }
    }
}

/// Walks the object graph and collects every tensor under its dotted path.
fn flatten(v: &Value, path: &str, out: &mut Vec<(String, Rc<TensorRef>)>, depth: usize) {
    if depth > 64 {
        return;
    }
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match v {
        Value::Persistent(p) => {
            if let Ok(t) = p.clone().downcast::<TensorRef>() {
                out.push((path.to_string(), t));
            }
        }
        Value::Dict(d) => {
            for (k, v) in d.borrow().iter() {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                flatten(v, &join(&key), out, depth + 1);
            }
        }
        Value::List(_) | Value::Tuple(_) => {
            for (i, item) in v.items().unwrap_or_default().iter().enumerate() {
                flatten(item, &join(&i.to_string()), out, depth + 1);
            }
        }
        Value::Call(c) => {
            if let Some(state) = &c.borrow().state {
                flatten(state, path, out, depth + 1);
            }
        }
        _ => {}
    }
}

/// Copies a strided view out of its storage's bytes into a contiguous tensor.
fn materialise(t: &TensorRef, bytes: &[u8], big_endian: bool, name: &str) -> Result<RawTensor, String> {
    let size = t.storage.dtype.size();
    let numel: usize = t.shape.iter().product();
    let past_end = |element: usize| {
        format!("{name}: element {element} lies past the end of storage {} ({} bytes)", t.storage.key, bytes.len())
    };
    let mut row_major = vec![1usize; t.shape.len()];
    for d in (0..t.shape.len().saturating_sub(1)).rev() {
        row_major[d] = row_major[d + 1] * t.shape[d + 1];
    }
    let contiguous = t.shape.iter().zip(&t.stride).zip(&row_major).all(|((&n, &s), &r)| n <= 1 || s == r);
    let mut data = if contiguous {
        let start = t.offset * size;
        let end = start + numel * size;
        bytes.get(start..end).ok_or_else(|| past_end(t.offset + numel.saturating_sub(1)))?.to_vec()
    } else {
        let mut data = Vec::with_capacity(numel * size);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let element = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            let at = element * size;
            data.extend_from_slice(bytes.get(at..at + size).ok_or_else(|| past_end(element))?);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        data
    };
    if big_endian && size > 1 {
        data.chunks_exact_mut(size).for_each(<[u8]>::reverse);
    }
    Ok(RawTensor { dtype: t.storage.dtype, shape: t.shape.clone(), data })
}

/// Every tensor in the file, by dotted path, in the file's order.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, RawTensor>, ImportError> {
    let bad = |reason: String| ImportError::Unreadable { path: path.to_path_buf(), reason };
    if let Some(prefix) = super::tf_bundle::bundle_prefix(path) {
        if Path::new(&format!("{}.index", prefix.display())).is_file() {
            return Err(ImportError::Unsupported {
                detail: format!(
                    "{}: a TensorFlow checkpoint; import google-research/simclr's with --from simclr-tf",
                    path.display()
                ),
            });
        }
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if bytes.starts_with(b"PK\x03\x04") {
        read_zip(path, &bytes).map_err(bad)
    } else if bytes.starts_with(b"\x80") {
        read_legacy(&bytes).map_err(bad)
    } else if looks_like_safetensors(&bytes) {
        read_safetensors(&bytes).map_err(bad)
    } else {
        Err(bad("neither a torch.save archive (zip or legacy pickle) nor safetensors".into()))
    }
}

fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() >= 9 && bytes[8] == b'{'
}

fn read_zip(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>, String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let pickle_name =
        names.iter().find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1).cloned().ok_or_else(|| {
            format!("a zip without a torch.save or torch.jit.save data.pkl ({} entries)", names.len())
        })?;
    let root = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut entry = |name: &str| -> Result<Vec<u8>, String> {
        let mut file = archive.by_name(name).map_err(|e| format!("{name}: {e}"))?;
        let mut out = Vec::with_capacity(file.size() as usize);
        file.read_to_end(&mut out).map_err(|e| format!("{name}: {e}"))?;
        Ok(out)
    };
    let big_endian = match entry(&format!("{root}byteorder")) {
        Ok(order) => order.trim_ascii() == b"big",
        Err(_) => false,
    };
    let graph = entry(&pickle_name)?;
    let mut hooks = TorchHooks::default();
    let (value, _) = pickle::read(&graph, &mut hooks).map_err(|e| format!("{pickle_name}: {e}"))?;
    let mut found = Vec::new();
    flatten(&value, "", &mut found, 0);
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = BTreeMap::new();
    for (name, t) in found {
        if !storages.contains_key(&t.storage.key) {
            let data = entry(&format!("{root}data/{}", t.storage.key))?;
            storages.insert(t.storage.key.clone(), data);
        }
        let tensor = materialise(&t, &storages[&t.storage.key], big_endian, &name)?;
        out.insert(name, tensor);
    }
    tracing::debug!(path = %path.display(), tensors = out.len(), "torch.save archive read");
    Ok(out)
}

fn read_legacy(bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>, String> {
    let mut pos = 0;
    let mut next = |hooks: &mut TorchHooks| -> Result<Value, String> {
        let (v, used) = pickle::read(&bytes[pos..], hooks).map_err(|e| e.to_string())?;
        pos += used;
        Ok(v)
    };
    let mut hooks = TorchHooks::default();
    let magic = next(&mut hooks)?;
    if !matches!(magic, Value::Bytes(_)) {
        return Err("a pickle that is not a torch.save file (no magic number)".into());
    }
    let _protocol = next(&mut hooks)?;
    let _sys_info = next(&mut hooks)?;
    let value = next(&mut hooks)?;
    let keys = next(&mut hooks)?.items().ok_or("the storage key list is missing")?;
    let mut storages = HashMap::new();
    let mut at = pos;
    for key in keys {
        let key = key.as_str().ok_or("a storage key that is not text")?.to_string();
        let storage = hooks.storages.get(&key).ok_or_else(|| format!("storage {key} is listed but never used"))?;
        let count = bytes.get(at..at + 8).ok_or("truncated storage")?;
        let count =
            usize::try_from(u64::from_le_bytes(count.try_into().expect("8 bytes"))).map_err(|e| e.to_string())?;
        let len = count.checked_mul(storage.dtype.size()).ok_or("storage size overflows")?;
        let data = bytes.get(at + 8..at + 8 + len).ok_or_else(|| format!("storage {key} is truncated"))?;
        storages.insert(key, data.to_vec());
        at += 8 + len;
    }
    let mut found = Vec::new();
    flatten(&value, "", &mut found, 0);
    let mut out = BTreeMap::new();
    for (name, t) in found {
        let data =
            storages.get(&t.storage.key).ok_or_else(|| format!("{name}: storage {} is missing", t.storage.key))?;
        out.insert(name.clone(), materialise(&t, data, false, &name)?);
    }
    Ok(out)
}

/// Every tensor of a safetensors file, by name.
pub fn read_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>, String> {
    use safetensors::Dtype as S;
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("{e:?}"))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let dtype = match view.dtype() {
            S::F64 => DType::F64,
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            other => return Err(format!("{name}: unsupported dtype {other:?}")),
        };
        out.insert(name, RawTensor { dtype, shape: view.shape().to_vec(), data: view.data().to_vec() });
    }
    Ok(out)
}
