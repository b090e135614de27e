//! The pixel pipeline: DICOM file -> stored values (Bits Stored, High Bit, Pixel Representation) ->
//! modality LUT (Rescale Slope and Intercept; the slope may be negative) -> VOI (Window Center/Width
//! with the VOI LUT Function, or a VOI LUT, or the image's own range when neither is present) ->
//! inversion (MONOCHROME1, or Presentation LUT Shape INVERSE) -> f32 in [0, 1], bright = dense.
//! Decompression comes from dicom-pixeldata; every step after it is ours, in this order, so that its
//! behaviour does not depend on the decoder's defaults. Multi-frame files give their first frame.

use std::path::Path;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use simclr_common::config::ColorMode;

use crate::guard;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a readable DICOM file: {0}")]
    NotDicom(String),
    #[error("no pixel data")]
    NoPixelData,
    #[error("colour image ({0}); data.color = \"luminance\" converts colour images to grey")]
    Color(String),
    #[error("no DICOM File Meta header (an ACR-NEMA-style data set); data.accept_no_meta = true reads it in the transfer syntax its first element shows")]
    NoFileMeta,
    #[error("unsupported transfer syntax {uid} ({name})")]
    UnsupportedTransferSyntax { uid: String, name: String },
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("missing or invalid attribute {0}")]
    Attribute(&'static str),
    #[error("pixel data cannot be decoded: {0}")]
    Pixels(String),
    /// A path that would read outside the dataset root (never opened).
    #[error("refused: {0}")]
    Refused(String),
}

/// A decoded image at its native size, values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedImage {
    pub rows: u32,
    pub cols: u32,
    pub pixels: Vec<f32>,
    /// Frames in the file (only the first is decoded).
    pub frames: u32,
}

/// How values of interest map to [0, 1].
#[derive(Debug, Clone, PartialEq)]
enum Voi {
    Window { center: f64, width: f64, function: VoiFunction },
    Lut { first_mapped: f64, bits: u32, data: Vec<u16> },
    ImageRange,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

/// What the pipeline accepts beyond monochrome files with a File Meta header (`data.color`,
/// `data.accept_no_meta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeOptions {
    pub color: ColorMode,
    pub accept_no_meta: bool,
}

impl DecodeOptions {
    pub fn of(data: &simclr_common::config::DataSection) -> DecodeOptions {
        DecodeOptions { color: data.color, accept_no_meta: data.accept_no_meta }
    }
}

/// The pipeline on a file, with the default options (monochrome files with a File Meta header).
pub fn decode_file(path: &Path) -> Result<DecodedImage, DecodeError> {
    decode_file_with(path, DecodeOptions::default())
}

/// The pipeline on a file. The file is read once into memory (the parser holds every value, pixel data
/// included, in memory anyway), so the length guard and the parser do not read it twice.
pub fn decode_file_with(path: &Path, options: DecodeOptions) -> Result<DecodedImage, DecodeError> {
    decode_bytes_with(&std::fs::read(path).map_err(|e| DecodeError::NotDicom(format!("cannot read: {e}")))?, options)
}

/// The pipeline on a file's bytes (with or without the 128-byte preamble); the fuzz target's entry.
pub fn decode_bytes(bytes: &[u8]) -> Result<DecodedImage, DecodeError> {
    decode_bytes_with(bytes, DecodeOptions::default())
}

pub fn decode_bytes_with(bytes: &[u8], options: DecodeOptions) -> Result<DecodedImage, DecodeError> {
    let (obj, _) = open_bytes(bytes, guard::Extent::Everything, options)?;
    decode_object_with(&obj, options)
}

/// Parses a file's bytes into an object, checked by the length guard first: a file with its File Meta
/// header, or (with `accept_no_meta`) a bare data set. Also says whether the data set has top-level
/// Pixel Data (always `Present` or `Absent` after a whole-file read).
pub fn open_bytes(
    bytes: &[u8],
    extent: guard::Extent,
    options: DecodeOptions,
) -> Result<(DefaultDicomObject, guard::PixelData), DecodeError> {
    let pixel_data = guard::check_bytes(bytes, extent).map_err(DecodeError::NotDicom)?;
    if pixel_data != guard::PixelData::Unknown || !guard::lacks_file_meta(bytes) {
        let obj = parse_guarded(|| OpenFileOptions::new().read_preamble(ReadPreamble::Auto).from_reader(bytes))?;
        let pixel_data = match pixel_data {
            guard::PixelData::Unknown if obj.get(tags::PIXEL_DATA).is_some() => {
                guard::PixelData::Present { length: None }
            }
            guard::PixelData::Unknown if extent == guard::Extent::Everything => guard::PixelData::Absent,
            other => other,
        };
        return Ok((obj, pixel_data));
    }
    // No File Meta: perhaps a bare data set (read only where the user asks for it), guarded the same
    // way. Bytes whose first element is not of group 0008, where a data set starts, are simply not
    // DICOM: say so rather than what their bytes would declare.
    let not_a_data_set = || DecodeError::NotDicom("no DICOM preamble or File Meta header, and not a data set".into());
    let starts_like_a_data_set = bytes.len() >= 2 && matches!(bytes[..2], [0x08, 0x00] | [0x00, 0x08]);
    let pixel_data = match guard::check_bare_bytes(bytes, extent) {
        Ok(pixel_data) => pixel_data,
        Err(e) if starts_like_a_data_set => return Err(DecodeError::NotDicom(e)),
        Err(_) => return Err(not_a_data_set()),
    };
    let syntax = guard::bare_syntax(bytes).unwrap_or("1.2.840.10008.1.2");
    let read = std::panic::catch_unwind(|| {
        let ts = TransferSyntaxRegistry.get(syntax).ok_or("no such transfer syntax")?;
        let dataset = dicom_object::InMemDicomObject::read_dataset_with_ts(bytes, ts).map_err(|e| e.to_string())?;
        dataset
            .with_meta(dicom_object::meta::FileMetaTableBuilder::new().transfer_syntax(syntax))
            .map_err(|e| e.to_string())
    });
    let obj = match read {
        Ok(Ok(obj)) if obj.get(tags::SOP_INSTANCE_UID).is_some() || obj.get(tags::STUDY_INSTANCE_UID).is_some() => obj,
        _ => return Err(not_a_data_set()),
    };
    if !options.accept_no_meta {
        return Err(DecodeError::NoFileMeta);
    }
    Ok((obj, pixel_data))
}

/// The parser is third-party code fed untrusted bytes: its panics become this file's error.
fn parse_guarded(
    parse: impl FnOnce() -> Result<DefaultDicomObject, dicom_object::ReadError> + std::panic::UnwindSafe,
) -> Result<DefaultDicomObject, DecodeError> {
    std::panic::catch_unwind(parse)
        .map_err(|panic| DecodeError::NotDicom(format!("parser failed on corrupt data: {}", panic_message(&panic))))?
        .map_err(|e| DecodeError::NotDicom(e.to_string()))
}

/// How the stored samples of an image are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Samples {
    /// One sample per pixel; MONOCHROME1 shows low values bright.
    Monochrome { inverse: bool },
    /// Three samples per pixel, as the decoder hands them over (after decompression).
    Color(ColorLayout),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorLayout {
    Rgb {
        planar: bool,
    },
    YbrFull {
        planar: bool,
    },
    /// Native YBR_FULL_422: each pair of pixels as Y1 Y2 Cb Cr.
    YbrFull422,
}

/// The image attributes the pipeline reads, checked from the header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLayout {
    pub rows: u32,
    pub cols: u32,
    pub bits_allocated: u32,
    pub bits_stored: u32,
    pub high_bit: u32,
    pub signed: bool,
    pub samples: Samples,
}

/// Everything the pipeline refuses that the header alone shows: transfer syntax, samples per pixel and
/// photometric interpretation (colour under `data.color`), bits, size. The index runs it on every
/// file's header and the decoder again on the whole file, so that no file the index accepts is refused
/// later for a reason its header already gave.
pub fn check_header(obj: &DefaultDicomObject, options: DecodeOptions) -> Result<ImageLayout, DecodeError> {
    let ts_uid = obj.meta().transfer_syntax().trim_end_matches('\0').to_string();
    let encapsulated = match TransferSyntaxRegistry.get(&ts_uid) {
        Some(ts) if ts.can_decode_all() => ts.is_encapsulated_pixel_data(),
        Some(ts) => {
            return Err(DecodeError::UnsupportedTransferSyntax { uid: ts_uid.clone(), name: ts.name().to_string() })
        }
        None => return Err(DecodeError::UnsupportedTransferSyntax { uid: ts_uid, name: "unknown".into() }),
    };
    let samples = uint(obj, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel").unwrap_or(1);
    let photometric = string(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    let bits_allocated = uint(obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
    let planar = uint(obj, tags::PLANAR_CONFIGURATION, "PlanarConfiguration").unwrap_or(0) == 1;
    let samples = match (samples, photometric.as_str()) {
        (1, "MONOCHROME1" | "MONOCHROME2") => Samples::Monochrome { inverse: photometric == "MONOCHROME1" },
        (3, "RGB" | "YBR_FULL" | "YBR_FULL_422" | "YBR_RCT" | "YBR_ICT" | "YBR_PARTIAL_420") => {
            if options.color == ColorMode::Reject {
                return Err(DecodeError::Color(photometric));
            }
            // Decoders of compressed frames hand over interleaved RGB whatever the stored colour space.
            let layout = match photometric.as_str() {
                _ if encapsulated => ColorLayout::Rgb { planar: false },
                "RGB" => ColorLayout::Rgb { planar },
                "YBR_FULL" => ColorLayout::YbrFull { planar },
                "YBR_FULL_422" if bits_allocated == 8 && !planar => ColorLayout::YbrFull422,
                _ => {
                    return Err(DecodeError::Unsupported(format!(
                        "uncompressed {photometric} with {bits_allocated} bits allocated{} (PS3.3 C.7.6.3.1.2 allows \
                         YBR_FULL_422 only interleaved, 8 bits, and YBR_RCT/ICT/PARTIAL_420 only compressed)",
                        if planar { ", planar" } else { "" }
                    )))
                }
            };
            Samples::Color(layout)
        }
        _ => {
            return Err(DecodeError::Unsupported(format!(
                "{samples} samples per pixel, photometric interpretation '{photometric}' (expected MONOCHROME1/2, \
                 or RGB/YBR with data.color = \"luminance\")"
            )))
        }
    };
    let rows = uint(obj, tags::ROWS, "Rows")?;
    let cols = uint(obj, tags::COLUMNS, "Columns")?;
    let bits_stored = uint(obj, tags::BITS_STORED, "BitsStored")?;
    let high_bit = uint(obj, tags::HIGH_BIT, "HighBit").unwrap_or(bits_stored.saturating_sub(1));
    let signed = uint(obj, tags::PIXEL_REPRESENTATION, "PixelRepresentation").unwrap_or(0) == 1;
    let colour_bits_ok = matches!(samples, Samples::Monochrome { .. }) || (matches!(bits_allocated, 8 | 16) && !signed);
    if !matches!(bits_allocated, 8 | 16 | 32)
        || !colour_bits_ok
        || bits_stored == 0
        || bits_stored > bits_allocated
        || high_bit >= bits_allocated
        || high_bit + 1 < bits_stored
    {
        return Err(DecodeError::Unsupported(format!(
            "bits allocated {bits_allocated}, stored {bits_stored}, high bit {high_bit}{}",
            if signed { ", signed" } else { "" }
        )));
    }
    if rows == 0 || cols == 0 {
        return Err(DecodeError::Attribute("Rows/Columns"));
    }
    if u64::from(rows) * u64::from(cols) > MAX_PIXELS {
        return Err(DecodeError::Unsupported(format!("{rows}x{cols} pixels (at most {MAX_PIXELS} are decoded)")));
    }
    Ok(ImageLayout { rows, cols, bits_allocated, bits_stored, high_bit, signed, samples })
}

/// The pipeline on a parsed object, with the default options.
pub fn decode_object(obj: &DefaultDicomObject) -> Result<DecodedImage, DecodeError> {
    decode_object_with(obj, DecodeOptions::default())
}

pub fn decode_object_with(obj: &DefaultDicomObject, options: DecodeOptions) -> Result<DecodedImage, DecodeError> {
    if obj.get(tags::PIXEL_DATA).is_none() {
        return Err(DecodeError::NoPixelData);
    }
    let layout = check_header(obj, options)?;
    let ImageLayout { rows, cols, bits_allocated, bits_stored, high_bit, signed, samples } = layout;
    let ts_uid = obj.meta().transfer_syntax().trim_end_matches('\0').to_string();
    check_frame_header(obj, &ts_uid, rows, cols)?;
    let frames = string(obj, tags::NUMBER_OF_FRAMES).and_then(|s| s.parse::<u32>().ok()).unwrap_or(1).max(1);
    if let Samples::Color(ColorLayout::YbrFull422) = samples {
        // Uncompressed 8-bit YBR_FULL_422: two bytes per pixel, which dicom-pixeldata 0.10 takes for
        // three; the frame is read from the element itself.
        let bytes = obj
            .get(tags::PIXEL_DATA)
            .and_then(|e| e.to_bytes().ok())
            .ok_or_else(|| DecodeError::Pixels("unreadable native pixel data".into()))?;
        let n = n_pixels(rows, cols);
        let pixels = luminance(&bytes, n, 1, bits_stored, high_bit, ColorLayout::YbrFull422).ok_or_else(|| {
            DecodeError::Pixels(format!("{} bytes of pixel data for {rows}x{cols} YBR_FULL_422 pixels", bytes.len()))
        })?;
        return Ok(DecodedImage { rows, cols, pixels, frames });
    }
    if let Samples::Color(color) = samples {
        if let Some(rgb) = rgb_jpeg_frame(obj, &ts_uid, frames)? {
            let pixels = luminance(&rgb, n_pixels(rows, cols), 1, bits_stored, high_bit, color).ok_or_else(|| {
                DecodeError::Pixels(format!("{} bytes of JPEG output for {rows}x{cols} RGB pixels", rgb.len()))
            })?;
            return Ok(DecodedImage { rows, cols, pixels, frames });
        }
    }
    // Decoders are third-party code fed untrusted bytes; a panic in one (dicom-rs 0.10's RLE decoder
    // indexes out of bounds on some corrupt segments) becomes this file's error, not the process's end.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obj.decode_pixel_data_frame(0)))
        .map_err(|panic| DecodeError::Pixels(format!("decoder failed on corrupt data: {}", panic_message(&panic))))?
        .map_err(|e| DecodeError::Pixels(e.to_string()))?;
    let bytes = decoded.data();
    let n = rows as usize * cols as usize;
    let width = bits_allocated as usize / 8;
    let inverse = match samples {
        Samples::Monochrome { inverse } => inverse,
        Samples::Color(color) => {
            let pixels = luminance(bytes, n, width, bits_stored, high_bit, color).ok_or_else(|| {
                DecodeError::Pixels(format!(
                    "{} bytes of pixel data for {rows}x{cols} {color:?} pixels of {bits_allocated} bits",
                    bytes.len()
                ))
            })?;
            return Ok(DecodedImage { rows, cols, pixels, frames });
        }
    };
    if bytes.len() < n * width {
        return Err(DecodeError::Pixels(format!(
            "{} bytes of pixel data for {rows}x{cols}x{bits_allocated} bits",
            bytes.len()
        )));
    }
    let stored = stored_values(&bytes[..n * width], bits_allocated, bits_stored, high_bit, signed);

    let slope = decimal(obj, tags::RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = decimal(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    if slope == 0.0 || !slope.is_finite() || !intercept.is_finite() {
        return Err(DecodeError::Attribute("RescaleSlope/RescaleIntercept"));
    }
    let voi = voi_of(obj)?;
    let inverse = inverse || string(obj, tags::PRESENTATION_LUT_SHAPE).is_some_and(|s| s == "INVERSE");
    let pixels = present(&stored, slope, intercept, &voi, inverse);
    Ok(DecodedImage { rows, cols, pixels, frames })
}

fn n_pixels(rows: u32, cols: u32) -> usize {
    rows as usize * cols as usize
}

/// The first frame of a JPEG (baseline or extended) colour file whose Photometric Interpretation is
/// RGB, decoded as RGB (no YCbCr conversion). PS3.5 8.2.1: such a frame stores R, G and B as they are,
/// while dicom-rs 0.10 lets jpeg-decoder assume YCbCr for every 3-component frame without an Adobe
/// marker, and so returns wrong colours for these files (GDCM writes them). None for every other file.
fn rgb_jpeg_frame(obj: &DefaultDicomObject, ts_uid: &str, frames: u32) -> Result<Option<Vec<u8>>, DecodeError> {
    use dicom_dictionary_std::uids::{JPEG_BASELINE8_BIT, JPEG_EXTENDED12_BIT};
    let photometric = string(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
    if !(ts_uid == JPEG_BASELINE8_BIT || ts_uid == JPEG_EXTENDED12_BIT) || photometric != "RGB" {
        return Ok(None);
    }
    let fragments = obj
        .get(tags::PIXEL_DATA)
        .and_then(|e| e.fragments())
        .ok_or_else(|| DecodeError::Pixels("JPEG pixel data has no fragment".into()))?;
    // One frame: all its fragments; several: the first frame is the first fragment (PS3.5 A.4 allows a
    // frame to span fragments only where the file holds one frame or an offset table says so).
    let data: Vec<u8> = if frames == 1 {
        fragments.iter().flatten().copied().collect()
    } else {
        fragments.first().cloned().unwrap_or_default()
    };
    let decoded = std::panic::catch_unwind(|| {
        let mut decoder = jpeg_decoder::Decoder::new(data.as_slice());
        decoder.set_color_transform(jpeg_decoder::ColorTransform::RGB);
        decoder.decode()
    })
    .map_err(|panic| DecodeError::Pixels(format!("decoder failed on corrupt data: {}", panic_message(&panic))))?
    .map_err(|e| DecodeError::Pixels(format!("JPEG: {e}")))?;
    Ok(Some(decoded))
}

/// Grey values in [0, 1] of a colour frame's `n` pixels: YBR_FULL to RGB as PS3.3 C.7.6.3.1.2 defines
/// it (rounded and clipped to the stored range, as decoders and pydicom store RGB), then ITU-R BT.601
/// luma, over the stored range. None when the frame holds fewer bytes than its layout needs.
fn luminance(
    bytes: &[u8],
    n: usize,
    width: usize,
    bits_stored: u32,
    high_bit: u32,
    color: ColorLayout,
) -> Option<Vec<f32>> {
    let shift = high_bit + 1 - bits_stored;
    let top = ((1u64 << bits_stored) - 1) as f64;
    let sample = |i: usize| -> Option<f64> {
        let b = bytes.get(i * width..(i + 1) * width)?;
        let raw = if width == 1 { u64::from(b[0]) } else { u64::from(u16::from_le_bytes([b[0], b[1]])) };
        Some(((raw >> shift) & ((1u64 << bits_stored) - 1)) as f64)
    };
    // The i-th pixel's three samples, in stored order.
    let triple = |i: usize, planar: bool| -> Option<[f64; 3]> {
        if planar {
            Some([sample(i)?, sample(n + i)?, sample(2 * n + i)?])
        } else {
            Some([sample(3 * i)?, sample(3 * i + 1)?, sample(3 * i + 2)?])
        }
    };
    let half = (top + 1.0) / 2.0;
    let to_rgb = |[y, cb, cr]: [f64; 3]| -> [f64; 3] {
        let (cb, cr) = (cb - half, cr - half);
        let round = |v: f64| (v + 0.5).floor().clamp(0.0, top);
        [
            round(y + 1.402 * cr),
            round(y - 0.114 * 1.772 / 0.587 * cb - 0.299 * 1.402 / 0.587 * cr),
            round(y + 1.772 * cb),
        ]
    };
    let luma = |[r, g, b]: [f64; 3]| ((0.299 * r + 0.587 * g + 0.114 * b) / top) as f32;
    (0..n)
        .map(|i| {
            let rgb = match color {
                ColorLayout::Rgb { planar } => triple(i, planar)?,
                ColorLayout::YbrFull { planar } => to_rgb(triple(i, planar)?),
                ColorLayout::YbrFull422 => {
                    // Pixels 2k and 2k + 1 share Cb and Cr: bytes 4k..4k+4 hold Y1 Y2 Cb Cr.
                    let pair = i / 2;
                    to_rgb([sample(4 * pair + i % 2)?, sample(4 * pair + 2)?, sample(4 * pair + 3)?])
                }
            };
            Some(luma(rgb))
        })
        .collect()
}

/// The largest image decoded (about 6300 x 6300; chest radiographs are at most about 4300 x 4300):
/// decoders allocate for the size a header declares, whatever the file holds.
pub const MAX_PIXELS: u64 = 40_000_000;

/// The first compressed frame's own header, read before any decoder allocates for what it declares
/// (both checks were found necessary by the fuzz target): an RLE header (see [`check_rle_header`]), or
/// the image size in a JPEG / JPEG-LS frame header or JPEG 2000 SIZ marker, which must be the DICOM
/// Rows and Columns (a 2 KB file declaring a 3.7-gigapixel JPEG 2000 image made openjp2 allocate
/// gigabytes). Native (unencapsulated) pixel data has no frame header.
fn check_frame_header(obj: &DefaultDicomObject, ts_uid: &str, rows: u32, cols: u32) -> Result<(), DecodeError> {
    let fragment = obj.get(tags::PIXEL_DATA).and_then(|e| e.fragments()).and_then(|f| f.first());
    if ts_uid == dicom_dictionary_std::uids::RLE_LOSSLESS {
        return check_rle_header(fragment.ok_or_else(|| DecodeError::Pixels("RLE pixel data has no fragment".into()))?);
    }
    let Some(fragment) = fragment else { return Ok(()) };
    let declared = if fragment.starts_with(&[0xFF, 0xD8]) {
        jpeg_frame_size(fragment)
    } else if let Some(at) = find(fragment, &[0xFF, 0x4F, 0xFF, 0x51]) {
        j2k_image_size(&fragment[at..])
    } else {
        // A codec whose header is not read here.
        return Ok(());
    };
    match declared {
        Some((h, w)) if (h, w) == (rows, cols) => Ok(()),
        Some((h, w)) => Err(DecodeError::Pixels(format!(
            "the compressed frame declares {h}x{w} pixels, Rows/Columns say {rows}x{cols}"
        ))),
        None => Err(DecodeError::Pixels("the compressed frame has no readable image header".into())),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).take(4096).position(|w| w == needle)
}

/// (height, width) from the first start-of-frame marker (SOF0-SOF15 but DHT, JPG and DAC; JPEG-LS SOF55).
fn jpeg_frame_size(data: &[u8]) -> Option<(u32, u32)> {
    let mut at = 2;
    while at + 4 <= data.len() {
        if data[at] != 0xFF {
            return None;
        }
        let marker = data[at + 1];
        if marker == 0xFF {
            at += 1; // fill byte
            continue;
        }
        let len = u16::from_be_bytes([data[at + 2], data[at + 3]]) as usize;
        let sof = matches!(marker, 0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC)) || marker == 0xF7;
        if sof {
            let b = data.get(at + 4..at + 9)?;
            return Some((u32::from(u16::from_be_bytes([b[1], b[2]])), u32::from(u16::from_be_bytes([b[3], b[4]]))));
        }
        if marker == 0xDA || len < 2 {
            return None; // scan data before any frame header
        }
        at += 2 + len;
    }
    None
}

/// (height, width) from a JPEG 2000 codestream's SIZ marker, which follows SOC.
fn j2k_image_size(data: &[u8]) -> Option<(u32, u32)> {
    let word = |i: usize| data.get(i..i + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let (x, y, x0, y0) = (word(8)?, word(12)?, word(16)?, word(20)?);
    Some((y.checked_sub(y0)?, x.checked_sub(x0)?))
}

/// The RLE header of the first frame (PS3.5 G.5: 16 little-endian u32, the segment count then up to
/// 15 segment offsets, ascending, inside the fragment). dicom-rs 0.10 allocates the count it reads
/// before any check (a corrupt count asked for 6.6 GB).
fn check_rle_header(fragment: &[u8]) -> Result<(), DecodeError> {
    let bad = |why: String| Err(DecodeError::Pixels(format!("invalid RLE header: {why}")));
    if fragment.len() < 64 {
        return bad(format!("the first fragment has {} bytes, fewer than the 64-byte header", fragment.len()));
    }
    let word =
        |i: usize| u32::from_le_bytes([fragment[4 * i], fragment[4 * i + 1], fragment[4 * i + 2], fragment[4 * i + 3]]);
    let segments = word(0) as usize;
    if !(1..=15).contains(&segments) {
        return bad(format!("{segments} segments (1 to 15 allowed)"));
    }
    let mut previous = 64;
    for i in 1..=segments {
        let offset = word(i) as usize;
        if offset < previous || offset > fragment.len() {
            return bad(format!("segment {i} starts at byte {offset} of a {}-byte fragment", fragment.len()));
        }
        previous = offset;
    }
    Ok(())
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Stored values from native little-endian pixel bytes: the `bits_stored` bits ending at `high_bit`,
/// sign-extended for signed pixel representation.
fn stored_values(bytes: &[u8], bits_allocated: u32, bits_stored: u32, high_bit: u32, signed: bool) -> Vec<i64> {
    let shift = high_bit + 1 - bits_stored;
    let mask: u64 = (1u64 << bits_stored) - 1;
    let raw: Box<dyn Iterator<Item = u64>> = match bits_allocated {
        8 => Box::new(bytes.iter().map(|&b| u64::from(b))),
        16 => Box::new(bytes.chunks_exact(2).map(|c| u64::from(u16::from_le_bytes([c[0], c[1]])))),
        _ => Box::new(bytes.chunks_exact(4).map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))),
    };
    raw.map(|r| {
        let v = (r >> shift) & mask;
        if signed && v >> (bits_stored - 1) & 1 == 1 {
            v as i64 - (1i64 << bits_stored)
        } else {
            v as i64
        }
    })
    .collect()
}

fn voi_of(obj: &DefaultDicomObject) -> Result<Voi, DecodeError> {
    if let (Some(center), Some(width)) = (decimal(obj, tags::WINDOW_CENTER), decimal(obj, tags::WINDOW_WIDTH)) {
        let function = match string(obj, tags::VOILUT_FUNCTION).as_deref() {
            None | Some("") | Some("LINEAR") => VoiFunction::Linear,
            Some("LINEAR_EXACT") => VoiFunction::LinearExact,
            Some("SIGMOID") => VoiFunction::Sigmoid,
            Some(other) => return Err(DecodeError::Unsupported(format!("VOI LUT Function '{other}'"))),
        };
        let min_width = if function == VoiFunction::Linear { 1.0 } else { 0.0 };
        if width > min_width && center.is_finite() && width.is_finite() {
            return Ok(Voi::Window { center, width, function });
        }
    }
    if let Some(item) = obj.get(tags::VOILUT_SEQUENCE).and_then(|e| e.items()).and_then(|items| items.first()) {
        let descriptor: Vec<u32> = item
            .get(tags::LUT_DESCRIPTOR)
            .and_then(|e| e.to_multi_int::<u32>().ok())
            .ok_or(DecodeError::Attribute("LUTDescriptor"))?;
        if descriptor.len() != 3 {
            return Err(DecodeError::Attribute("LUTDescriptor"));
        }
        let entries = if descriptor[0] == 0 { 65536 } else { descriptor[0] as usize };
        // The first mapped value is US or SS depending on the pixel representation.
        let first_mapped = if descriptor[1] > 32767 && uint(obj, tags::PIXEL_REPRESENTATION, "").unwrap_or(0) == 1 {
            descriptor[1] as f64 - 65536.0
        } else {
            descriptor[1] as f64
        };
        let bits = descriptor[2].clamp(1, 16);
        let data: Vec<u16> = item
            .get(tags::LUT_DATA)
            .and_then(|e| e.to_multi_int::<u16>().ok())
            .ok_or(DecodeError::Attribute("LUTData"))?;
        if data.len() < entries {
            return Err(DecodeError::Attribute("LUTData"));
        }
        return Ok(Voi::Lut { first_mapped, bits, data: data[..entries].to_vec() });
    }
    Ok(Voi::ImageRange)
}

/// Modality LUT, VOI and inversion of every stored value, in that order. Stored values span a small
/// range (16 bits at most in radiographs), so the chain runs once per distinct value into a table, and
/// the pixels are a table lookup.
fn present(stored: &[i64], slope: f64, intercept: f64, voi: &Voi, inverse: bool) -> Vec<f32> {
    let (lo, hi) = stored.iter().fold((i64::MAX, i64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    if stored.is_empty() {
        return Vec::new();
    }
    // The modality LUT is affine, so the image's modality range comes from its stored extremes.
    let (a, b) = (slope * lo as f64 + intercept, slope * hi as f64 + intercept);
    let range = (a.min(b), a.max(b));
    let one = |sv: i64| {
        let y = voi_value(slope * sv as f64 + intercept, voi, range);
        (if inverse { 1.0 - y } else { y }) as f32
    };
    let span = (hi - lo) as usize + 1;
    if span <= (1 << 20) && span <= stored.len().saturating_mul(4) {
        let table: Vec<f32> = (lo..=hi).map(one).collect();
        stored.iter().map(|&v| table[(v - lo) as usize]).collect()
    } else {
        stored.iter().map(|&v| one(v)).collect()
    }
}

/// VOI of one modality value to [0, 1] (PS3.3 C.11.2.1.2 for windows); `range` is the image's own
/// modality range, used when there is neither a window nor a VOI LUT.
fn voi_value(x: f64, voi: &Voi, range: (f64, f64)) -> f64 {
    match voi {
        Voi::Window { center, width, function } => {
            // LINEAR is LINEAR_EXACT with the center moved down by 0.5 and the width narrowed by 1.
            let (c, w) = match function {
                VoiFunction::Linear => (center - 0.5, width - 1.0),
                VoiFunction::LinearExact => (*center, *width),
                VoiFunction::Sigmoid => return 1.0 / (1.0 + (-4.0 * (x - center) / width).exp()),
            };
            if x <= c - w / 2.0 {
                0.0
            } else if x > c + w / 2.0 {
                1.0
            } else {
                (x - c) / w + 0.5
            }
        }
        Voi::Lut { first_mapped, bits, data } => {
            let top = ((1u32 << bits) - 1) as f64;
            let i = (x - first_mapped).round().clamp(0.0, (data.len() - 1) as f64) as usize;
            (data[i] as f64 / top).clamp(0.0, 1.0)
        }
        Voi::ImageRange => {
            let (lo, hi) = range;
            if hi > lo {
                (x - lo) / (hi - lo)
            } else {
                0.0
            }
        }
    }
}

/// A string attribute, trimmed of padding.
pub fn string(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag).and_then(|e| e.to_str().ok()).map(|s| s.trim().trim_end_matches('\0').to_string())
}

fn uint(obj: &DefaultDicomObject, tag: Tag, name: &'static str) -> Result<u32, DecodeError> {
    obj.get(tag).and_then(|e| e.to_int::<u32>().ok()).ok_or(DecodeError::Attribute(name))
}

/// First value of a decimal string attribute (Window Center may hold several).
fn decimal(obj: &DefaultDicomObject, tag: Tag) -> Option<f64> {
    let s = string(obj, tag)?;
    s.split('\\').next()?.trim().parse::<f64>().ok()
}

/// Area-averaging resize to `size` x `size` (the image crate's triangle filter widens its support
/// when shrinking, so downscaling does not alias).
pub fn resize(img: &DecodedImage, size: u32) -> Vec<f32> {
    if img.rows == size && img.cols == size {
        return img.pixels.clone();
    }
    let buffer = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(img.cols, img.rows, img.pixels.clone())
        .expect("DecodedImage holds rows * cols pixels");
    image::imageops::resize(&buffer, size, size, image::imageops::FilterType::Triangle)
        .into_raw()
        .into_iter()
        .map(|v| v.clamp(0.0, 1.0))
        .collect()
}

/// Runs every image of the index through the pixel pipeline (all threads) and returns those that
/// fail, with the reason. Multi-frame files are decoded for their first frame and counted.
pub fn check_decode(
    root: &Path,
    images: &[crate::index::ImageRecord],
    size: u32,
    options: DecodeOptions,
) -> Vec<crate::index::BadFile> {
    use crate::index::{BadFile, BadKind};
    use rayon::prelude::*;
    let mut bad: Vec<BadFile> = images
        .par_iter()
        .filter_map(|img| match decode_file_with(&root.join(&img.path), options) {
            Ok(decoded) => {
                let resized = resize(&decoded, size);
                if resized.iter().all(|v| v.is_finite()) {
                    None
                } else {
                    Some(BadFile {
                        path: img.path.clone(),
                        kind: BadKind::Undecodable,
                        reason: "decode: non-finite pixel values".into(),
                    })
                }
            }
            Err(e) => Some(BadFile { path: img.path.clone(), kind: BadKind::of(&e), reason: format!("decode: {e}") }),
        })
        .collect();
    bad.sort_by(|a, b| a.path.cmp(&b.path));
    bad
}
