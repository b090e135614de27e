//! A walk over a DICOM file's element headers that checks every declared length against the bytes
//! that are really there, before dicom-rs parses the file. dicom-parser 0.10 allocates and zero-fills
//! each value's declared length before reading it, so a corrupt length field makes a 10 KB file cost
//! up to 4 GiB of memory (found by the fuzz target); on a 16-thread decode that ends in the OOM killer.
//! The walk reads headers and seeks over values: no value is held in memory, whatever it declares.
//!
//! It understands what the parser does: the preamble, the file meta group (explicit VR little endian),
//! then the data set in its transfer syntax (implicit or explicit VR, either byte order, deflated),
//! sequences and items of defined and undefined length, and encapsulated pixel data.

use std::io::{self, Read, Seek, SeekFrom};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

const UNDEFINED: u32 = u32::MAX;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);
/// Deeper nesting than any real file has; the object builder recurses per level.
const MAX_DEPTH: usize = 32;
/// The file meta group's values are read (the transfer syntax is one of them); none is this large.
const MAX_META_VALUE: u32 = 1 << 16;
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

/// Where to stop: after the whole data set, or at the top-level Pixel Data header (header indexing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    Everything,
    UntilPixelData,
}

/// What the walk saw of the top-level Pixel Data element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelData {
    /// With the declared length of native (not encapsulated) pixel data.
    Present {
        length: Option<u32>,
    },
    Absent,
    /// The walk did not run: no DICM magic or no usable file meta group (the parser decides).
    Unknown,
}

/// Checks the file at `path`; the error says which element declares what.
pub fn check_file(path: &std::path::Path, extent: Extent) -> Result<PixelData, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    check(io::BufReader::new(file), len, extent)
}

pub fn check_bytes(bytes: &[u8], extent: Extent) -> Result<PixelData, String> {
    check(io::Cursor::new(bytes), bytes.len() as u64, extent)
}

fn check<R: Read + Seek>(mut r: R, len: u64, extent: Extent) -> Result<PixelData, String> {
    let mut head = [0u8; 132];
    let n = read_up_to(&mut r, &mut head).map_err(|e| e.to_string())?;
    let start = if n == 132 && &head[128..132] == b"DICM" {
        132
    } else if n >= 4 && &head[..4] == b"DICM" {
        4
    } else {
        // No magic: the parser rejects the file on its own, before any large allocation.
        return Ok(PixelData::Unknown);
    };
    r.seek(SeekFrom::Start(start)).map_err(|e| e.to_string())?;
    let mut src = Seekable { r, pos: start, len };
    let Some(syntax) = meta_group(&mut src)? else { return Ok(PixelData::Unknown) };
    let encoding = Encoding { explicit: syntax != "1.2.840.10008.1.2", big_endian: syntax == "1.2.840.10008.1.2.2" };
    if syntax == DEFLATED {
        let rest = src.r.seek(SeekFrom::Start(src.pos)).map(|_| src.r).map_err(|e| e.to_string())?;
        let mut inflated = Streamed { r: flate2::read::DeflateDecoder::new(rest), pos: 0 };
        return walk(&mut inflated, encoding, extent);
    }
    walk(&mut src, encoding, extent)
}

/// Whether the bytes have neither the preamble's nor a bare "DICM" magic: no File Meta header.
pub fn lacks_file_meta(bytes: &[u8]) -> bool {
    !(bytes.len() >= 132 && &bytes[128..132] == b"DICM" || bytes.starts_with(b"DICM"))
}

/// The transfer syntax of a data set that has no File Meta header, from its first element header, as
/// pydicom's `force=True` guesses it: little endian when the first group number reads smaller that
/// way, explicit VR when bytes 4-5 name a VR. None when it reads as neither (or as implicit VR big
/// endian, which does not exist).
pub fn bare_syntax(bytes: &[u8]) -> Option<&'static str> {
    let head = bytes.get(..6)?;
    let little = u16::from_le_bytes([head[0], head[1]]) <= u16::from_be_bytes([head[0], head[1]]);
    let explicit = head[4..6].iter().all(u8::is_ascii_uppercase)
        && std::str::from_utf8(&head[4..6]).ok().and_then(|s| s.parse::<VR>().ok()).is_some();
    match (little, explicit) {
        (true, false) => Some("1.2.840.10008.1.2"),
        (true, true) => Some("1.2.840.10008.1.2.1"),
        (false, true) => Some("1.2.840.10008.1.2.2"),
        (false, false) => None,
    }
}

/// Checks a data set that has no File Meta header, walked from its first byte in the transfer syntax
/// [`bare_syntax`] finds (how such files are read when `data.accept_no_meta` is on).
pub fn check_bare_bytes(bytes: &[u8], extent: Extent) -> Result<PixelData, String> {
    let syntax = bare_syntax(bytes).ok_or("neither a File Meta header nor a data set's first element")?;
    let encoding = Encoding { explicit: syntax != "1.2.840.10008.1.2", big_endian: syntax == "1.2.840.10008.1.2.2" };
    let mut src = Seekable { r: io::Cursor::new(bytes), pos: 0, len: bytes.len() as u64 };
    walk(&mut src, encoding, extent)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A byte source that can skip values: by seeking within a known length, or by reading through a
/// stream (a deflated data set) whose end shows only when it comes.
trait Source {
    fn pos(&self) -> u64;
    /// Fills `buf`, or says how many bytes there were (0 at a clean end).
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, String>;
    /// Skips `n` bytes; `Err(left)` when fewer than `n` remain.
    fn skip(&mut self, n: u64) -> Result<(), u64>;
}

struct Seekable<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Source for Seekable<R> {
    fn pos(&self) -> u64 {
        self.pos
    }
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        let n = read_up_to(&mut self.r, buf).map_err(|e| e.to_string())?;
        self.pos += n as u64;
        Ok(n)
    }
    fn skip(&mut self, n: u64) -> Result<(), u64> {
        let left = self.len.saturating_sub(self.pos);
        if n > left {
            return Err(left);
        }
        self.r.seek(SeekFrom::Current(n as i64)).map_err(|_| left)?;
        self.pos += n;
        Ok(())
    }
}

struct Streamed<R> {
    r: R,
    pos: u64,
}

impl<R: Read> Source for Streamed<R> {
    fn pos(&self) -> u64 {
        self.pos
    }
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        let n = read_up_to(&mut self.r, buf).map_err(|e| format!("inflating the data set: {e}"))?;
        self.pos += n as u64;
        Ok(n)
    }
    fn skip(&mut self, n: u64) -> Result<(), u64> {
        let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink()).unwrap_or(0);
        self.pos += copied;
        if copied < n {
            Err(copied)
        } else {
            Ok(())
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Encoding {
    explicit: bool,
    big_endian: bool,
}

impl Encoding {
    const META: Encoding = Encoding { explicit: true, big_endian: false };
    fn u16(self, b: [u8; 2]) -> u16 {
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }
    fn u32(self, b: [u8; 4]) -> u32 {
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }
}

struct Header {
    tag: (u16, u16),
    vr: Option<VR>,
    len: u32,
    at: u64,
}

fn exact<const N: usize>(src: &mut impl Source, what: &str) -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    match src.read_some(&mut b)? {
        n if n == N => Ok(b),
        _ => Err(format!("file ends inside {what} at byte {}", src.pos())),
    }
}

/// The next element header, or None at a clean end of the stream.
fn header(src: &mut impl Source, enc: Encoding) -> Result<Option<Header>, String> {
    let at = src.pos();
    let mut t = [0u8; 4];
    match src.read_some(&mut t)? {
        0 => return Ok(None),
        4 => {}
        _ => return Err(format!("file ends inside an element tag at byte {}", src.pos())),
    }
    let tag = (enc.u16([t[0], t[1]]), enc.u16([t[2], t[3]]));
    // Items and delimiters have no VR in any encoding.
    if tag.0 == 0xFFFE {
        let len = enc.u32(exact(src, "an element length")?);
        return Ok(Some(Header { tag, vr: None, len, at }));
    }
    if !enc.explicit {
        // As dicom-encoding resolves implicit VRs: OW for pixel and overlay data, else the dictionary.
        let len = enc.u32(exact(src, "an element length")?);
        let vr = if tag == PIXEL_DATA || (tag.0 >> 8 == 0x60 && tag.1 == 0x3000) {
            VR::OW
        } else {
            StandardDataDictionary.by_tag(Tag(tag.0, tag.1)).map(|e| e.vr().relaxed()).unwrap_or(VR::UN)
        };
        return Ok(Some(Header { tag, vr: Some(vr), len, at }));
    }
    // As dicom-encoding reads it: bytes that name no VR mean UN; the VRs of PS3.5 table 7.1-2 have a
    // 16-bit length, every other one a reserved field and a 32-bit length.
    let v = exact::<2>(src, "a VR")?;
    let vr = std::str::from_utf8(&v).ok().and_then(|s| s.parse::<VR>().ok()).unwrap_or(VR::UN);
    let short = matches!(
        vr,
        VR::AE
            | VR::AS
            | VR::AT
            | VR::CS
            | VR::DA
            | VR::DS
            | VR::DT
            | VR::FL
            | VR::FD
            | VR::IS
            | VR::LO
            | VR::LT
            | VR::PN
            | VR::SH
            | VR::SL
            | VR::SS
            | VR::ST
            | VR::TM
            | VR::UI
            | VR::UL
            | VR::US
    );
    let vr = Some(vr);
    let len = if !short {
        exact::<2>(src, "a reserved field")?;
        enc.u32(exact(src, "an element length")?)
    } else {
        u32::from(enc.u16(exact(src, "an element length")?))
    };
    Ok(Some(Header { tag, vr, len, at }))
}

fn too_long(h: &Header, left: u64) -> String {
    format!(
        "element ({:04X},{:04X}) at byte {} declares {} bytes but only {left} remain",
        h.tag.0, h.tag.1, h.at, h.len
    )
}

/// The file meta group, framed as dicom-object frames it: (0002,0000) first, then elements until its
/// group length is consumed. Returns the transfer syntax UID, or None where the parser will reject
/// the file on its own.
fn meta_group(src: &mut Seekable<impl Read + Seek>) -> Result<Option<String>, String> {
    let Some(first) = header(src, Encoding::META)? else { return Ok(None) };
    if first.tag != (0x0002, 0x0000) || first.len != 4 {
        return Ok(None);
    }
    let group_length = u64::from(Encoding::META.u32(exact(src, "the file meta group length")?));
    let start = src.pos;
    let mut syntax = None;
    while src.pos - start < group_length {
        let Some(h) = header(src, Encoding::META)? else { return Ok(None) };
        if h.len == UNDEFINED {
            return Ok(None);
        }
        if h.len > MAX_META_VALUE {
            return Err(format!("file meta {}", too_long(&h, src.len.saturating_sub(src.pos))));
        }
        if h.tag == (0x0002, 0x0010) {
            let mut value = vec![0u8; h.len as usize];
            if src.read_some(&mut value)? != value.len() {
                return Err(format!("file ends inside the transfer syntax UID at byte {}", src.pos));
            }
            syntax = Some(String::from_utf8_lossy(&value).trim_end_matches(['\0', ' ']).to_string());
        } else {
            src.skip(u64::from(h.len)).map_err(|left| too_long(&h, left))?;
        }
    }
    Ok(syntax)
}

/// Walks the data set's element headers in the order dicom-parser's flat token reader meets them,
/// skipping each value it would read and checking that value's length against what remains.
/// Sequences and items are entered, not skipped (their contents are headers too); the open ones are
/// counted, because the object builder recurses once per level.
fn walk(src: &mut impl Source, enc: Encoding, extent: Extent) -> Result<PixelData, String> {
    // Ends of the open containers: Some(byte) for a defined length, None until a delimiter.
    let mut open: Vec<Option<u64>> = Vec::new();
    let mut in_fragments = false;
    let mut pixel_data = PixelData::Absent;
    loop {
        while open.last().is_some_and(|end| end.is_some_and(|end| src.pos() >= end)) {
            open.pop();
        }
        if open.len() > MAX_DEPTH {
            return Err(format!("sequences nested deeper than {MAX_DEPTH} at byte {}", src.pos()));
        }
        let Some(h) = header(src, enc)? else { return Ok(pixel_data) };
        if in_fragments {
            match h.tag {
                SEQUENCE_END => in_fragments = false,
                ITEM if h.len != UNDEFINED => src.skip(u64::from(h.len)).map_err(|left| too_long(&h, left))?,
                (g, e) => {
                    return Err(format!("expected a pixel data fragment at byte {}, found ({g:04X},{e:04X})", h.at))
                }
            }
            continue;
        }
        match h.tag {
            ITEM_END | SEQUENCE_END => {
                // The innermost container of undefined length ends (a stray delimiter is ignored).
                if let Some(i) = open.iter().rposition(Option::is_none) {
                    open.truncate(i);
                }
                continue;
            }
            ITEM => {
                open.push((h.len != UNDEFINED).then(|| src.pos() + u64::from(h.len)));
                continue;
            }
            _ => {}
        }
        if h.tag == PIXEL_DATA && open.is_empty() {
            pixel_data = PixelData::Present { length: (h.len != UNDEFINED).then_some(h.len) };
            if extent == Extent::UntilPixelData {
                return Ok(pixel_data);
            }
        }
        if h.len == UNDEFINED {
            if h.tag == PIXEL_DATA {
                in_fragments = true;
            } else {
                // SQ, or any other element of undefined length: read as a sequence.
                open.push(None);
            }
        } else if h.vr == Some(VR::SQ) {
            open.push(Some(src.pos() + u64::from(h.len)));
        } else {
            // dicom-parser reads whole numbers of a numeric VR's values and leaves the rest of the
            // declared length in the stream, where it becomes the next header: so must we.
            let width = h.vr.map_or(1, value_width);
            src.skip(u64::from(h.len - h.len % width)).map_err(|left| too_long(&h, left))?;
        }
    }
}

/// Bytes per value of a VR, as dicom-parser 0.10 reads values.
fn value_width(vr: VR) -> u32 {
    match vr {
        VR::US | VR::OW | VR::SS => 2,
        VR::AT | VR::FL | VR::OF | VR::SL | VR::UL | VR::OL => 4,
        VR::FD | VR::OD | VR::SV | VR::OV | VR::UV => 8,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with the preamble and a meta group declaring `syntax`, then `body`.
    fn file(syntax: &str, body: &[u8]) -> Vec<u8> {
        let mut uid = syntax.as_bytes().to_vec();
        if uid.len() % 2 == 1 {
            uid.push(0);
        }
        let mut meta = Vec::new();
        meta.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        meta.extend_from_slice(&(uid.len() as u16).to_le_bytes());
        meta.extend_from_slice(&uid);
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(body);
        out
    }

    fn explicit(tag: (u16, u16), vr: &[u8; 2], value_len: u32, long: bool) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&tag.0.to_le_bytes());
        out.extend_from_slice(&tag.1.to_le_bytes());
        out.extend_from_slice(vr);
        if long {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&value_len.to_le_bytes());
        } else {
            out.extend_from_slice(&(value_len as u16).to_le_bytes());
        }
        out
    }

    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

    #[test]
    fn a_length_past_the_end_is_named() {
        let mut body = explicit((0x0010, 0x0020), b"LO", 4, false);
        body.extend_from_slice(b"P1  ");
        body.extend(explicit((0x0009, 0x1001), b"OB", 0xF000_0000, true));
        body.extend_from_slice(&[0u8; 16]);
        let err = check_bytes(&file(EXPLICIT_LE, &body), Extent::Everything).unwrap_err();
        assert!(err.contains("(0009,1001)") && err.contains("declares 4026531840 bytes but only 16 remain"), "{err}");
        // Indexing stops at the pixel data header; this element comes before it, so it is checked too.
        assert!(check_bytes(&file(EXPLICIT_LE, &body), Extent::UntilPixelData).is_err());
    }

    #[test]
    fn values_are_skipped_and_nested_items_checked() {
        // SQ (undefined) > item (undefined) > US, then the delimiters, then a well-formed OB.
        let mut body = explicit((0x0028, 0x3010), b"SQ", UNDEFINED, true);
        body.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        body.extend(explicit((0x0028, 0x3002), b"US", 6, false));
        body.extend_from_slice(&[0, 1, 0, 0, 16, 0]);
        body.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0, 0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        body.extend(explicit((0x0009, 0x1001), b"OB", 4, true));
        body.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(check_bytes(&file(EXPLICIT_LE, &body), Extent::Everything), Ok(PixelData::Absent));
        // The same item's US declaring more than there is (its length field follows SQ 12 + item 8
        // + tag and VR 6 bytes).
        body[26..28].copy_from_slice(&0xFFFEu16.to_le_bytes());
        let err = check_bytes(&file(EXPLICIT_LE, &body), Extent::Everything).unwrap_err();
        assert!(err.contains("(0028,3002)") && err.contains("declares 65534 bytes"), "{err}");
    }

    #[test]
    fn nesting_bombs_are_refused() {
        let mut body = Vec::new();
        for _ in 0..10_000 {
            body.extend(explicit((0x0040, 0xA730), b"SQ", UNDEFINED, true));
            body.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        let err = check_bytes(&file(EXPLICIT_LE, &body), Extent::Everything).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn deflated_data_sets_are_checked_after_inflating() {
        use std::io::Write;
        let mut plain = explicit((0x0009, 0x1001), b"OB", 0x8000_0000, true);
        plain.extend_from_slice(&[7u8; 32]);
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&plain).unwrap();
        let err = check_bytes(&file(DEFLATED, &z.finish().unwrap()), Extent::Everything).unwrap_err();
        assert!(err.contains("(0009,1001)") && err.contains("only 32 remain"), "{err}");
    }

    #[test]
    fn non_dicom_bytes_are_left_to_the_parser() {
        assert_eq!(check_bytes(b"not a dicom file at all", Extent::Everything), Ok(PixelData::Unknown));
        assert_eq!(check_bytes(&[], Extent::Everything), Ok(PixelData::Unknown));
    }
}
