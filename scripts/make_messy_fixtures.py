"""Writes data/tests/fixtures/messy/: what a real export folder holds besides monochrome radiographs,
each file made by third-party software (pydicom or GDCM):

- colour images (RGB interleaved and planar, YBR_FULL, YBR_FULL_422 uncompressed; GDCM's YBR_FULL and
  its JPEG baseline, which it stores as YBR_FULL_422),
- a data set without File Meta header (no preamble, no "DICM": ACR-NEMA style, implicit VR little
  endian), monochrome,
- pydicom's own test files without File Meta (copied from its package: `pydicom/data/test_files/`
  ExplVR_LitEndNoMeta.dcm, ExplVR_BigEndNoMeta.dcm, rtstruct.dcm and the unreadable no_meta.dcm), with
  the UIDs pydicom reads from them with `force=True` in `expected.json`,
- two monochrome files whose Specific Character Set names no known character set (dicom-rs reads
  them, with a warning per file).

`expected.json` holds, for every colour file, pydicom's reading of it: the pixels decoded by pydicom
(its JPEG plugin for the JPEG file), converted to RGB by `pydicom.pixels.convert_color_space` where
the file is YBR, then the ITU-R BT.601 luma over 8 bits, 0.299 R + 0.587 G + 0.114 B, divided by 255.
data/tests/colour.rs compares our `data.color = "luminance"` pipeline with it. The fixtures are committed;
this script only documents and regenerates them:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install pydicom==3.0.1 numpy==2.2.6 python-gdcm==3.2.6 pylibjpeg==2.1.0 \
        pylibjpeg-libjpeg==2.5.0
    .venv-bench/bin/python scripts/make_messy_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from make_codec_fixtures import gdcm_transcode  # this directory; imports GDCM only when called

ROWS, COLS = 24, 32  # even columns: YBR_FULL_422 pairs pixels along a row
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "tests", "fixtures", "messy")


def rgb_image():
    """Smooth colour fields with saturated corners, so that YBR -> RGB clipping is exercised."""
    r, c = np.mgrid[0:ROWS, 0:COLS].astype(np.float64)
    red = 255 * (0.5 + 0.5 * np.sin(r / 4.0))
    green = 255 * (c / (COLS - 1))
    blue = 255 * (0.5 + 0.5 * np.cos((r + c) / 6.0))
    img = np.stack([red, green, blue], axis=-1)
    img[0, 0] = [255, 0, 0]
    img[0, 1] = [0, 0, 255]
    img[1, 0] = [255, 255, 255]
    return np.rint(img).astype(np.uint8)


def base(name, samples, photometric, bits=8):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["messy", name])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "2.25.7101"
    ds.SeriesInstanceUID = "2.25.7102"
    ds.PatientID = "MESSY"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    return ds


def rgb_to_ybr_full(rgb):
    """PS3.3 C.7.6.3.1.2, as pydicom's convert_color_space does it (rounded, clipped to 8 bits)."""
    return convert_color_space(rgb, "RGB", "YBR_FULL")


def save(ds, name):
    path = os.path.join(OUT, name)
    ds.save_as(path, enforce_file_format=True)
    return path


def luma_by_pydicom(path):
    ds = pydicom.dcmread(path)
    arr = pixel_array(ds, as_rgb=False).astype(np.uint8)
    photometric = ds.PhotometricInterpretation
    if photometric.startswith("YBR"):
        arr = convert_color_space(arr, photometric, "RGB")
    arr = arr.astype(np.float64)
    luma = (0.299 * arr[..., 0] + 0.587 * arr[..., 1] + 0.114 * arr[..., 2]) / 255.0
    return {"photometric": photometric, "syntax": ds.file_meta.TransferSyntaxUID.name,
            "rows": int(ds.Rows), "cols": int(ds.Columns), "luma": [round(float(v), 7) for v in luma.ravel()]}


def main():
    os.makedirs(OUT, exist_ok=True)
    rgb = rgb_image()

    ds = base("rgb", 3, "RGB")
    ds.PixelData = rgb.tobytes()
    save(ds, "pydicom_rgb.dcm")

    ds = base("rgb_planar", 3, "RGB")
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    save(ds, "pydicom_rgb_planar.dcm")

    ybr = rgb_to_ybr_full(rgb)
    ds = base("ybr_full", 3, "YBR_FULL")
    ds.PixelData = ybr.tobytes()
    save(ds, "pydicom_ybr_full.dcm")

    # YBR_FULL_422 uncompressed: each pair of pixels along a row as Y1 Y2 Cb Cr, the chroma of the
    # pair's first pixel (PS3.3 C.7.6.3.1.2 leaves the subsampling filter to the writer).
    pairs = ybr.reshape(ROWS, COLS // 2, 2, 3)
    packed = np.stack([pairs[:, :, 0, 0], pairs[:, :, 1, 0], pairs[:, :, 0, 1], pairs[:, :, 0, 2]], axis=-1)
    ds = base("ybr_full_422", 3, "YBR_FULL_422")
    ds.PixelData = packed.astype(np.uint8).tobytes()
    save(ds, "pydicom_ybr_full_422.dcm")

    # A data set without File Meta: no preamble, no "DICM", implicit VR little endian, monochrome.
    ds = base("no_meta", 1, "MONOCHROME2", bits=16)
    del ds.file_meta
    r, c = np.mgrid[0:ROWS, 0:COLS]
    ds.PixelData = ((r * 97 + c * 31) % 4096).astype("<u2").tobytes()
    ds.BitsStored, ds.HighBit = 12, 11
    ds.preamble = None
    pydicom.dcmwrite(os.path.join(OUT, "pydicom_no_meta.dcm"), ds, implicit_vr=True, little_endian=True,
                     enforce_file_format=False)

    # Usable files that make the parser warn: an unknown Specific Character Set.
    for k in (1, 2):
        ds = base(f"charset_{k}", 1, "MONOCHROME2")
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds.PixelData = ((r * 5 + c * 3 + k) % 256).astype(np.uint8).tobytes()
        save(ds, f"pydicom_unknown_charset_{k}.dcm")

    # GDCM, last (its zlib clashes with pydicom's deflate: see make_codec_fixtures.py).
    ds = base("gdcm_src", 3, "YBR_FULL")
    ds.PixelData = ybr.tobytes()
    src = save(ds, "_source.dcm")
    gdcm_transcode(src, os.path.join(OUT, "gdcm_ybr_full.dcm"), "ExplicitVRLittleEndian")
    ds = base("gdcm_jpeg", 3, "RGB")
    ds.PixelData = rgb.tobytes()
    ds.save_as(src, enforce_file_format=True)
    gdcm_transcode(src, os.path.join(OUT, "gdcm_jpeg_baseline_rgb.dcm"), "JPEGBaselineProcess1", lossy_quality=95)
    os.remove(src)

    bare_dir = os.path.join(OUT, "pydicom_test_files")
    os.makedirs(bare_dir, exist_ok=True)
    bare_expected = {}
    for name in ("ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm", "rtstruct.dcm", "no_meta.dcm"):
        shutil.copy(get_testdata_file(name), os.path.join(bare_dir, name))
        ds = pydicom.dcmread(os.path.join(bare_dir, name), force=True)
        bare_expected[name] = {"sop_uid": ds.get("SOPInstanceUID"), "study_uid": ds.get("StudyInstanceUID"),
                               "pixel_data": "PixelData" in ds}
        print(f"pydicom_test_files/{name}: {bare_expected[name]}")

    expected = {}
    for name in sorted(os.listdir(OUT)):
        if not name.endswith(".dcm") or name == "pydicom_no_meta.dcm" or "charset" in name:
            continue
        expected[name] = luma_by_pydicom(os.path.join(OUT, name))
        print(f"{name}: {expected[name]['photometric']}, {expected[name]['syntax']}, "
              f"{os.path.getsize(os.path.join(OUT, name))} bytes")
    bare = pydicom.dcmread(os.path.join(OUT, "pydicom_no_meta.dcm"), force=True)
    print(f"pydicom_no_meta.dcm: read with force=True, {bare.Rows}x{bare.Columns}, "
          f"starts with {open(os.path.join(OUT, 'pydicom_no_meta.dcm'), 'rb').read(4).hex()}")
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"generator": f"pydicom {pydicom.__version__}", "luma": "0.299 R + 0.587 G + 0.114 B, / 255",
                   "files": expected, "no_meta": bare_expected}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
