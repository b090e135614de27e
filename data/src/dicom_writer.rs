//! Writes single-frame grayscale radiographs as DICOM files, the ways real ones come: explicit or
//! implicit VR little endian, explicit VR big endian, deflated, or RLE lossless (encoded here);
//! MONOCHROME1 or MONOCHROME2; 8, 12 or 16 bits stored; with or without a rescale (the slope may be
//! negative) and a window. Used by the synthetic dataset and by the tests' golden files.

use std::path::Path;

use dicom_core::value::{PixelFragmentSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

/// How the file's data set and pixel data are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Encoding {
    ExplicitVrLittleEndian,
    ImplicitVrLittleEndian,
    ExplicitVrBigEndian,
    DeflatedExplicitVrLittleEndian,
    RleLossless,
}

impl Encoding {
    pub const ALL: [Encoding; 5] = [
        Encoding::ExplicitVrLittleEndian,
        Encoding::ImplicitVrLittleEndian,
        Encoding::ExplicitVrBigEndian,
        Encoding::DeflatedExplicitVrLittleEndian,
        Encoding::RleLossless,
    ];

    pub fn transfer_syntax(self) -> &'static str {
        match self {
            Encoding::ExplicitVrLittleEndian => uids::EXPLICIT_VR_LITTLE_ENDIAN,
            Encoding::ImplicitVrLittleEndian => uids::IMPLICIT_VR_LITTLE_ENDIAN,
            // Retired from the standard, still found in archives.
            Encoding::ExplicitVrBigEndian => "1.2.840.10008.1.2.2",
            Encoding::DeflatedExplicitVrLittleEndian => uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
            Encoding::RleLossless => uids::RLE_LOSSLESS,
        }
    }
}

/// Everything about one image file other than its pixels.
#[derive(Debug, Clone)]
pub struct ImageHeader {
    pub patient_id: String,
    pub study_uid: String,
    pub series_uid: String,
    pub sop_uid: String,
    pub encoding: Encoding,
    pub monochrome1: bool,
    /// 8, 12 or 16 (8: 8 bits allocated; otherwise 16).
    pub bits_stored: u16,
    pub rescale: Option<(f64, f64)>,
    /// Window centre and width, in modality units.
    pub window: Option<(f64, f64)>,
    pub presentation_lut_inverse: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Writes `stored` (row-major stored values, `rows` x `cols`) as a DICOM file.
pub fn write_image(path: &Path, h: &ImageHeader, rows: u16, cols: u16, stored: &[u16]) -> Result<(), WriteError> {
    if stored.len() != rows as usize * cols as usize {
        return Err(WriteError::Invalid(format!("{} pixels for {rows}x{cols}", stored.len())));
    }
    if !matches!(h.bits_stored, 8 | 12 | 16) {
        return Err(WriteError::Invalid(format!("bits stored {} (expected 8, 12 or 16)", h.bits_stored)));
    }
    let max = (1u32 << h.bits_stored) - 1;
    if let Some(v) = stored.iter().find(|&&v| u32::from(v) > max) {
        return Err(WriteError::Invalid(format!("stored value {v} does not fit {} bits", h.bits_stored)));
    }
    let bits_allocated: u16 = if h.bits_stored == 8 { 8 } else { 16 };
    let mut obj = InMemDicomObject::new_empty();
    let mut put_str = |tag, vr, value: &str| obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
    put_str(tags::SOP_CLASS_UID, VR::UI, uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION);
    put_str(tags::SOP_INSTANCE_UID, VR::UI, &h.sop_uid);
    put_str(tags::STUDY_INSTANCE_UID, VR::UI, &h.study_uid);
    put_str(tags::SERIES_INSTANCE_UID, VR::UI, &h.series_uid);
    put_str(tags::PATIENT_ID, VR::LO, &h.patient_id);
    put_str(tags::MODALITY, VR::CS, "DX");
    put_str(tags::BODY_PART_EXAMINED, VR::CS, "CHEST");
    put_str(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, if h.monochrome1 { "MONOCHROME1" } else { "MONOCHROME2" });
    if let Some((slope, intercept)) = h.rescale {
        put_str(tags::RESCALE_SLOPE, VR::DS, &format!("{slope}"));
        put_str(tags::RESCALE_INTERCEPT, VR::DS, &format!("{intercept}"));
        put_str(tags::RESCALE_TYPE, VR::LO, "US");
    }
    if let Some((center, width)) = h.window {
        put_str(tags::WINDOW_CENTER, VR::DS, &format!("{center}"));
        put_str(tags::WINDOW_WIDTH, VR::DS, &format!("{width}"));
    }
    if h.presentation_lut_inverse {
        put_str(tags::PRESENTATION_LUT_SHAPE, VR::CS, "INVERSE");
    }
    let us = |v: u16| PrimitiveValue::from(v);
    obj.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, us(1)));
    obj.put(DataElement::new(tags::ROWS, VR::US, us(rows)));
    obj.put(DataElement::new(tags::COLUMNS, VR::US, us(cols)));
    obj.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, us(bits_allocated)));
    obj.put(DataElement::new(tags::BITS_STORED, VR::US, us(h.bits_stored)));
    obj.put(DataElement::new(tags::HIGH_BIT, VR::US, us(h.bits_stored - 1)));
    obj.put(DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, us(0)));
    let pixel_element = match h.encoding {
        Encoding::RleLossless => {
            let fragment = rle_encode_frame(stored, rows as usize, cols as usize, bits_allocated);
            let seq = PixelFragmentSequence::new_fragments(vec![fragment]);
            DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(seq))
        }
        _ if bits_allocated == 8 => {
            let bytes: Vec<u8> = stored.iter().map(|&v| v as u8).collect();
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(bytes))
        }
        _ => DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(stored.iter().copied().collect())),
    };
    obj.put(pixel_element);
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(h.encoding.transfer_syntax()))
        .map_err(|e| WriteError::Invalid(e.to_string()))?;
    file.write_to_file(path).map_err(|e| WriteError::Write { path: path.display().to_string(), message: e.to_string() })
}

/// RLE Lossless (DICOM PS3.5 Annex G): one segment per byte plane, most significant first, each row
/// PackBits-encoded on its own; a 64-byte header of segment offsets.
pub fn rle_encode_frame(stored: &[u16], rows: usize, cols: usize, bits_allocated: u16) -> Vec<u8> {
    let planes: Vec<u32> = if bits_allocated == 8 { vec![0] } else { vec![8, 0] };
    let mut segments: Vec<Vec<u8>> = Vec::new();
    for shift in &planes {
        let mut seg = Vec::new();
        for row in stored.chunks(cols).take(rows) {
            let bytes: Vec<u8> = row.iter().map(|&v| (v >> shift) as u8).collect();
            packbits(&bytes, &mut seg);
        }
        if seg.len() % 2 == 1 {
            seg.push(0);
        }
        segments.push(seg);
    }
    let mut out = Vec::with_capacity(64 + segments.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(&(segments.len() as u32).to_le_bytes());
    let mut offset = 64u32;
    for i in 0..15 {
        let value = if i < segments.len() { offset } else { 0 };
        out.extend_from_slice(&value.to_le_bytes());
        if i < segments.len() {
            offset += segments[i].len() as u32;
        }
    }
    for seg in segments {
        out.extend_from_slice(&seg);
    }
    out
}

/// PackBits: runs of 2..=128 equal bytes as (1 - n, byte), the rest as literals of up to 128 bytes.
fn packbits(data: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < data.len() {
        let mut run = 1;
        while i + run < data.len() && run < 128 && data[i + run] == data[i] {
            run += 1;
        }
        if run >= 2 {
            out.push((1i16 - run as i16) as i8 as u8);
            out.push(data[i]);
            i += run;
            continue;
        }
        let start = i;
        while i < data.len() && i - start < 128 {
            if i + 1 < data.len() && data[i + 1] == data[i] {
                break;
            }
            i += 1;
        }
        out.push((i - start - 1) as u8);
        out.extend_from_slice(&data[start..i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference PackBits decoder, written from the specification, to check the encoder.
    fn unpack(mut data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some((&h, rest)) = data.split_first() {
            let h = h as i8;
            if h >= 0 {
                let n = h as usize + 1;
                out.extend_from_slice(&rest[..n]);
                data = &rest[n..];
            } else if h != -128 {
                out.extend(std::iter::repeat_n(rest[0], (1 - h as isize) as usize));
                data = &rest[1..];
            } else {
                data = rest;
            }
        }
        out
    }

    #[test]
    fn packbits_round_trips_runs_and_literals() {
        let mut data = vec![5u8; 300];
        data.extend((0..=255u8).cycle().take(400));
        data.extend([1, 1, 2, 3, 3, 3, 4]);
        let mut packed = Vec::new();
        packbits(&data, &mut packed);
        assert_eq!(unpack(&packed), data);
        assert!(packed.len() < data.len());
    }
}
