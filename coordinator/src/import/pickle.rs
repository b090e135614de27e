//! A Python pickle reader for the object graphs that `torch.save` writes: state dicts, Lightning and
//! solo-learn checkpoints (which also hold hyper-parameters, optimiser states and callbacks' states).
//!
//! It runs the pickle machine without running any Python: a class or function reference (`GLOBAL`)
//! stays a name, a call (`REDUCE`, `NEWOBJ`) stays a record of the callee and its arguments, and the
//! few callees a checkpoint needs understood (`collections.OrderedDict`, torch's tensor rebuilders) are
//! interpreted by the caller ([`crate::import::torch_file`]). Nothing in a file can make it execute code,
//! which loading with Python's `pickle` would.
//!
//! Why not a crate: `serde-pickle` refuses persistent ids, which is how every tensor in a `torch.save`
//! file refers to its storage; the maintained readers that accept them (candle-core's) come with a
//! whole tensor library that the coordinator does not otherwise need.
//!
//! Lists, dicts and objects are shared (`Rc<RefCell<..>>`) because pickle's memo refers to the same
//! object that later opcodes fill in. Every length and index is checked against the input, so a
//! truncated or hostile file is an error, never a panic.

use std::cell::RefCell;
use std::rc::Rc;

/// A value on the pickle machine's stack.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Rc<Vec<u8>>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A class or function named by module and qualified name, never resolved.
    Global(Rc<(String, String)>),
    /// `callee(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ), plus what BUILD set on it.
    Call(Rc<RefCell<Call>>),
    /// What the file's persistent-id hook returned for this id (torch: a storage reference).
    Persistent(Rc<dyn std::any::Any>),
}

#[derive(Debug)]
pub struct Call {
    pub callee: Value,
    pub args: Vec<Value>,
    pub state: Option<Value>,
}

impl Value {
    pub fn global_name(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global(g) => Some((g.0.as_str(), g.1.as_str())),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// A tuple's or a list's items.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Call(_) => "object",
            Value::Persistent(_) => "persistent reference",
        }
    }
}

/// The reader's hooks: what a persistent id stands for, and how a call of a named callee is
/// interpreted (None: kept as a [`Call`] record).
pub trait Hooks {
    fn persistent_load(&mut self, id: Value) -> Result<Value, String>;
    fn call(&mut self, module: &str, name: &str, args: &[Value]) -> Result<Option<Value>, String>;
}

#[derive(Debug, thiserror::Error)]
#[error("pickle stream at byte {offset}: {message}")]
pub struct PickleError {
    pub offset: usize,
    pub message: String,
}

enum Slot {
    Value(Value),
    Mark,
}

struct Machine<'a, H: Hooks> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: std::collections::HashMap<u32, Value>,
    hooks: &'a mut H,
}

/// Reads one pickle from the start of `data`; returns the value and the number of bytes it took.
pub fn read<H: Hooks>(data: &[u8], hooks: &mut H) -> Result<(Value, usize), PickleError> {
    let mut machine = Machine { data, pos: 0, stack: Vec::new(), memo: Default::default(), hooks };
    let value = machine.run().map_err(|message| PickleError { offset: machine.pos, message })?;
    Ok((value, machine.pos))
}

impl<H: Hooks> Machine<'_, H> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or("truncated")?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.le()?) as usize)
    }

    fn len64(&mut self) -> Result<usize, String> {
        usize::try_from(u64::from_le_bytes(self.le()?)).map_err(|_| "length overflows".to_string())
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or("unterminated text argument")?;
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn utf8(&mut self, n: usize) -> Result<Value, String> {
        let bytes = self.take(n)?;
        Ok(Value::Str(std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8 string: {e}"))?.to_string()))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Slot::Value(v));
    }

    fn pop(&mut self) -> Result<Value, String> {
        match self.stack.pop() {
            Some(Slot::Value(v)) => Ok(v),
            Some(Slot::Mark) => Err("unexpected mark".into()),
            None => Err("stack underflow".into()),
        }
    }

    fn top(&self) -> Result<&Value, String> {
        match self.stack.last() {
            Some(Slot::Value(v)) => Ok(v),
            _ => Err("no value on the stack".into()),
        }
    }

    /// Everything above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self.stack.iter().rposition(|s| matches!(s, Slot::Mark)).ok_or("no mark on the stack")?;
        let items = self
            .stack
            .split_off(at + 1)
            .into_iter()
            .map(|s| match s {
                Slot::Value(v) => v,
                Slot::Mark => unreachable!("the topmost mark is at `at`"),
            })
            .collect();
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), String> {
        let v = self.memo.get(&key).cloned().ok_or_else(|| format!("memo key {key} was never stored"))?;
        self.push(v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("odd number of items for a dict".into());
        }
        let target = self.top()?.clone();
        let mut pairs = items.into_iter();
        match &target {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                while let (Some(k), Some(v)) = (pairs.next(), pairs.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            // A dict subclass built by a call (e.g. an AttributeDict): keep its items as its state.
            Value::Call(c) => {
                let mut c = c.borrow_mut();
                let dict = Rc::new(RefCell::new(Vec::new()));
                while let (Some(k), Some(v)) = (pairs.next(), pairs.next()) {
                    dict.borrow_mut().push((k, v));
                }
                c.state.get_or_insert(Value::Dict(dict));
                Ok(())
            }
            other => Err(format!("setting items on a {}", other.kind())),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            // A list subclass or a set built by a call: its items are not needed.
            Value::Call(_) => Ok(()),
            other => Err(format!("appending to a {}", other.kind())),
        }
    }

    fn call(&mut self, callee: Value, args: Vec<Value>) -> Result<Value, String> {
        if let Some((module, name)) = callee.global_name() {
            if let Some(v) = self.hooks.call(module, name, &args)? {
                return Ok(v);
            }
        }
        Ok(Value::Call(Rc::new(RefCell::new(Call { callee, args, state: None }))))
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let protocol = self.u8()?;
                    if protocol > 5 {
                        return Err(format!("pickle protocol {protocol} is newer than 5"));
                    }
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Slot::Mark),
                b')' => self.push(Value::Tuple(Rc::new(Vec::new()))),
                b']' => self.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b'}' => self.push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                0x8f => self.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("stack underflow".into());
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Rc::new(RefCell::new(Vec::new()))));
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.len32()? };
                    let bytes = self.take(n)?.to_vec();
                    self.push(long(&bytes));
                }
                b'I' | b'L' => {
                    let text = self.line()?;
                    let text = text.trim_end_matches('L');
                    let v = match text {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        t => t.parse::<i64>().map(Value::Int).unwrap_or(Value::Float(f64::NAN)),
                    };
                    self.push(v);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v));
                }
                b'F' => {
                    let text = self.line()?;
                    self.push(Value::Float(text.trim().parse().map_err(|_| format!("bad float '{text}'"))?));
                }
                b'X' => {
                    let n = self.len32()?;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.len64()?;
                    let v = self.utf8(n)?;
                    self.push(v);
                }
                b'V' => {
                    let text = self.line()?;
                    self.push(Value::Str(text));
                }
                b'S' => {
                    let text = self.line()?;
                    self.push(Value::Str(text.trim_matches(|c| c == '\'' || c == '"').to_string()));
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'T' | b'B' => self.len32()?,
                        b'U' | b'C' => self.u8()? as usize,
                        _ => self.len64()?,
                    };
                    let bytes = self.take(n)?.to_vec();
                    // Python 2 strings (T, U) are text in every checkpoint that matters here.
                    let v = match op {
                        b'T' | b'U' => Value::Str(String::from_utf8_lossy(&bytes).into_owned()),
                        _ => Value::Bytes(Rc::new(bytes)),
                    };
                    self.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(Rc::new((module, name))));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(Rc::new((m, n)))),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'R' => {
                    let args = self.pop()?.items().ok_or("REDUCE needs an argument tuple")?;
                    let callee = self.pop()?;
                    let v = self.call(callee, args)?;
                    self.push(v);
                }
                0x81 => {
                    let args = self.pop()?.items().ok_or("NEWOBJ needs an argument tuple")?;
                    let class = self.pop()?;
                    let v = self.call(class, args)?;
                    self.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?.items().ok_or("NEWOBJ_EX needs an argument tuple")?;
                    let class = self.pop()?;
                    let v = self.call(class, args)?;
                    self.push(v);
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err("OBJ without a class".into());
                    }
                    let class = items.remove(0);
                    let v = self.call(class, items)?;
                    self.push(v);
                }
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let args = self.pop_mark()?;
                    let v = self.call(Value::Global(Rc::new((module, name))), args)?;
                    self.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.top()? {
                        Value::Call(c) => c.borrow_mut().state = Some(state),
                        // An OrderedDict's attributes (torch keeps `_metadata` there): not needed.
                        Value::Dict(_) => {}
                        other => return Err(format!("BUILD on a {}", other.kind())),
                    }
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_put(k)?;
                }
                b'p' => {
                    let k = self.line()?.trim().parse().map_err(|_| "bad PUT index")?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_get(k)?;
                }
                b'g' => {
                    let k = self.line()?.trim().parse().map_err(|_| "bad GET index")?;
                    self.memo_get(k)?;
                }
                b'Q' => {
                    let id = self.pop()?;
                    let v = self.hooks.persistent_load(id)?;
                    self.push(v);
                }
                b'P' => {
                    let id = Value::Str(self.line()?);
                    let v = self.hooks.persistent_load(id)?;
                    self.push(v);
                }
                b'0' => {
                    self.stack.pop().ok_or("stack underflow")?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
            }
        }
    }
}

/// Python's `LONG1`/`LONG4`: little-endian two's complement of any length. Longer than 8 bytes
/// (torch's legacy magic number) becomes the text of its bytes, which only needs comparing.
fn long(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        return Value::Bytes(Rc::new(bytes.to_vec()));
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = [if negative { 0xff } else { 0 }; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoHooks;
    impl Hooks for NoHooks {
        fn persistent_load(&mut self, id: Value) -> Result<Value, String> {
            Ok(Value::Persistent(Rc::new(format!("{id:?}"))))
        }
        fn call(&mut self, module: &str, name: &str, _args: &[Value]) -> Result<Option<Value>, String> {
            Ok((module == "collections" && name == "OrderedDict").then(|| Value::Dict(Default::default())))
        }
    }

    fn dict_pairs(v: &Value) -> Vec<(String, Value)> {
        match v {
            Value::Dict(d) => d.borrow().iter().map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone())).collect(),
            other => panic!("not a dict: {other:?}"),
        }
    }

    #[test]
    fn reads_what_python_pickle_writes_at_protocol_2() {
        // Python 3: pickle.dumps(collections.OrderedDict([("a", 1), ("b", [2.5, -300, (True, None)]),
        //   ("c", 2**40)]), protocol=2)
        let data: &[u8] = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00aq\x02K\x01X\x01\x00\x00\x00bq\x03]q\x04(G@\x04\x00\x00\x00\x00\x00\x00J\xd4\xfe\xff\xff\x88N\x86q\x05eX\x01\x00\x00\x00cq\x06\x8a\x06\x00\x00\x00\x00\x00\x01u.";
        let (v, used) = read(data, &mut NoHooks).unwrap();
        assert_eq!(used, data.len());
        let pairs = dict_pairs(&v);
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[0].1.as_int(), Some(1));
        let list = pairs[1].1.items().unwrap();
        assert!(matches!(list[0], Value::Float(f) if f == 2.5));
        assert_eq!(list[1].as_int(), Some(-300));
        let tuple = list[2].items().unwrap();
        assert!(matches!(tuple[0], Value::Bool(true)) && matches!(tuple[1], Value::None));
        assert_eq!(pairs[2].1.as_int(), Some(1 << 40));
    }

    #[test]
    fn memo_shares_the_object_that_later_opcodes_fill() {
        // x = []; pickle.dumps({"p": x, "q": x}, protocol=2) with x filled after memoisation
        // (`]q\x01` then APPENDS): both keys see the same items.
        let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00pq\x01]q\x02(K\x01K\x02eX\x01\x00\x00\x00qq\x03h\x02u.";
        let (v, _) = read(data, &mut NoHooks).unwrap();
        let pairs = dict_pairs(&v);
        assert_eq!(pairs[1].1.items().unwrap().len(), 2);
    }

    #[test]
    fn truncated_and_unknown_input_is_an_error_with_its_offset() {
        let data: &[u8] = b"\x80\x02}q\x00(X\x09\x00\x00\x00pq";
        let err = read(data, &mut NoHooks).unwrap_err();
        assert!(err.message.contains("truncated"), "{err}");
        let err = read(b"\x80\x02\xff", &mut NoHooks).unwrap_err();
        assert_eq!(err.offset, 3);
        assert!(err.message.contains("0xff"), "{err}");
        assert!(read(b"\x80\x02e.", &mut NoHooks).is_err());
        assert!(read(b"\x80\x02h\x05.", &mut NoHooks).unwrap_err().message.contains("memo key 5"));
    }

    #[test]
    fn longs_of_any_length() {
        assert!(matches!(long(&[0xff]), Value::Int(-1)));
        assert!(matches!(long(&[0x00, 0x80]), Value::Int(-32768)));
        assert!(matches!(long(&[0x01, 0x02, 0x03]), Value::Int(0x030201)));
        assert!(matches!(long(&[0; 10]), Value::Bytes(_)));
    }
}
