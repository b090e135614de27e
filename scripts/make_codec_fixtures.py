"""Writes data/tests/fixtures/codecs/: DICOM files in the compressed transfer syntaxes that our own
writer does not produce (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000), plus a multi-frame file
and a VOI LUT file, each made by third-party software (GDCM, or pydicom with CharLS / OpenJPEG).

The pixel values are formulas that data/tests/codecs.rs evaluates again on its own, so the files carry
no expected output. The fixtures are committed; this script only documents and regenerates them:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install pydicom==3.0.1 numpy==2.2.6 python-gdcm==3.2.6 pyjpegls==1.5.1 \
        pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0
    .venv-bench/bin/python scripts/make_codec_fixtures.py
"""
import os
import sys

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (JPEG2000, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLSLossless, JPEGLSNearLossless, RLELossless, SecondaryCaptureImageStorage)

ROWS, COLS = 40, 32  # not square, so a transposed decode fails
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "tests", "fixtures", "codecs")


# The formulas, mirrored in data/tests/codecs.rs.
def textured(bits, frame=0):
    """Lossless content: high-entropy but deterministic, the full `bits` range in use."""
    r, c = np.mgrid[0:ROWS, 0:COLS]
    v = (r * 61 + c * 17 + (r * c * 7) % 251 + frame * 1009) % (1 << bits)
    v[0, 0], v[0, 1] = 0, (1 << bits) - 1
    return v


def smooth(bits):
    """Lossy content: a smooth field that JPEG keeps within a few levels."""
    r, c = np.mgrid[0:ROWS, 0:COLS]
    top = (1 << bits) - 1
    return np.rint(top * (0.5 + 0.4 * np.sin(r / 6.0) * np.cos(c / 5.0))).astype(np.int64)


def dataset(pixels, bits_stored, *, signed=False, monochrome1=False, frames=1, bits_allocated=None, window=False):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(pixels.sum()), str(bits_stored)])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "2.25.7001"
    ds.SeriesInstanceUID = "2.25.7002"
    ds.PatientID = "FIXTURE"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = bits_allocated or (8 if bits_stored <= 8 else 16)
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if window:
        # Center 2^(b-1), width 2^b: the linear window maps stored value v to v / (2^b - 1) exactly, so
        # the test reads lossy errors back in stored units.
        ds.WindowCenter, ds.WindowWidth = 1 << (bits_stored - 1), 1 << bits_stored
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(ds.BitsAllocated, signed)]
    ds.PixelData = pixels.astype(dtype).tobytes()
    return ds


def save(ds, name):
    path = os.path.join(OUT, name)
    ds.save_as(path, enforce_file_format=True)
    return path


def gdcm_transcode(src, dst, syntax, lossy_quality=None):
    """Rewrites DICOM file `src` as `dst` in the gdcm.TransferSyntax named `syntax`, with GDCM (also
    used by scripts/bench_pydicom.py). Imported here only: python-gdcm 3.2.6 brings its own zlib, and
    pydicom's deflate afterwards aborts the process (double free)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(src)
    if not reader.Read():
        sys.exit(f"gdcm cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    if lossy_quality is not None:
        codec = gdcm.JPEGCodec()
        codec.SetLossless(False)
        codec.SetQuality(lossy_quality)
        change.SetUserCodec(codec)
    change.SetInput(reader.GetImage())
    if not change.Change():
        sys.exit(f"gdcm cannot transcode {src} to {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(dst)
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        sys.exit(f"gdcm cannot write {dst}")


def main():
    os.makedirs(OUT, exist_ok=True)
    tmp = os.path.join(OUT, "_source.dcm")

    # pydicom's own writers for the uncompressed, deflated and RLE paths (our writer covers them too;
    # these are the same syntaxes as another implementation lays them out).
    ds = dataset(textured(16, frame=1), 16, monochrome1=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    save(ds, "pydicom_implicit_le_16bit_mono1.dcm")
    ds = dataset(textured(12, frame=2), 12)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = textured(12, frame=2).astype(">u2").tobytes()  # OW is written as given: big-endian words
    save(ds, "pydicom_explicit_be_12bit.dcm")
    ds = dataset(textured(8, frame=1), 8)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    save(ds, "pydicom_deflated_8bit.dcm")
    ds = dataset(textured(12, frame=1), 12)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    save(ds, "pydicom_rle_12bit.dcm")

    # pydicom's encoders: JPEG-LS (pyjpegls/CharLS) and JPEG 2000 (pylibjpeg-openjpeg).
    ds = dataset(textured(12) - 2048, 12, signed=True)
    ds.RescaleSlope, ds.RescaleIntercept = -2, 100
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    save(ds, "j2k_lossless_12bit_signed_rescale.dcm")
    ds = dataset(smooth(12), 12, window=True)
    ds.compress(JPEG2000, j2k_psnr=[70], encoding_plugin="pylibjpeg")
    save(ds, "j2k_lossy_12bit.dcm")
    ds = dataset(smooth(12), 12, window=True)
    ds.compress(JPEGLSNearLossless, jls_error=2, encoding_plugin="pyjpegls")
    save(ds, "jpegls_near_lossless_12bit.dcm")
    # Three frames; decoding keeps the first.
    frames = np.stack([textured(12, frame=f) for f in range(3)])
    ds = dataset(frames, 12, frames=3)
    ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls")
    save(ds, "multiframe_jpegls_3frames.dcm")

    # A VOI LUT (no window): a 12-bit gamma-like LUT over stored values 512..3583, 10-bit output.
    ds = dataset(textured(12), 12)
    item = Dataset()
    first, entries, out_bits = 512, 3072, 10
    lut = np.rint(((np.arange(entries) / (entries - 1)) ** 0.5) * ((1 << out_bits) - 1)).astype(np.uint16)
    item.LUTDescriptor = [entries, first, out_bits]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    save(ds, "voi_lut_sequence_12bit.dcm")

    # GDCM (its IJG libjpeg 8/12/16, CharLS and OpenJPEG builds), last (see gdcm_transcode).
    def T(name, syntax, **kw):
        gdcm_transcode(tmp, os.path.join(OUT, name), syntax, **kw)

    save(dataset(smooth(8), 8, window=True), "_source.dcm")
    T("jpeg_baseline_8bit.dcm", "JPEGBaselineProcess1", lossy_quality=95)
    # JPEG extended at 8 bits: for 12 bits GDCM 3.2.6 writes a lossy frame of precision 16, which the
    # standard forbids and no decoder (pylibjpeg, jpeg-decoder) reads.
    T("jpeg_extended_8bit.dcm", "JPEGExtendedProcess2_4", lossy_quality=90)
    save(dataset(textured(12), 12), "_source.dcm")
    T("jpeg_lossless_p14_12bit.dcm", "JPEGLosslessProcess14")
    T("jpegls_lossless_12bit.dcm", "JPEGLSLossless")
    save(dataset(textured(16), 16, monochrome1=True), "_source.dcm")
    T("jpeg_lossless_sv1_16bit_mono1.dcm", "JPEGLosslessProcess14_1")
    T("j2k_lossless_16bit_mono1.dcm", "JPEG2000Lossless")
    os.remove(tmp)

    for name in sorted(os.listdir(OUT)):
        check = pydicom.dcmread(os.path.join(OUT, name))
        print(f"{name}: {check.file_meta.TransferSyntaxUID.name}, {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
    main()
