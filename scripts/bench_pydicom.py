"""pydicom side of the decode benchmark: the same files, the same pipeline (modality LUT -> window ->
MONOCHROME1 inversion -> [0, 1] -> 64x64), the way a user of the Python stack would write it. pydicom
decodes the JPEG family through its plugins: pylibjpeg (libjpeg, OpenJPEG), pyjpegls (CharLS) and GDCM.

    python scripts/bench_pydicom.py DIR SIDE              times every syntax directory present
    python scripts/bench_pydicom.py --transcode DIR SIDE  writes the JPEG-family directories from the
                                                          ExplicitVrLittleEndian phantoms, with GDCM
"""
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

SYNTAXES = ["ExplicitVrLittleEndian", "ImplicitVrLittleEndian", "ExplicitVrBigEndian",
            "DeflatedExplicitVrLittleEndian", "RleLossless"]
# Directory name -> GDCM transfer syntax (all lossless: the phantoms are 12-bit, and GDCM 3.2.6 writes
# 12-bit lossy JPEG with an invalid frame precision).
TRANSCODED = {"JpegLosslessSv1": "JPEGLosslessProcess14_1", "JpegLsLossless": "JPEGLSLossless",
              "Jpeg2000Lossless": "JPEG2000Lossless"}


def transcode(root, side):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_codec_fixtures import gdcm_transcode

    src_dir = os.path.join(root, f"ExplicitVrLittleEndian-{side}")
    for name, syntax in TRANSCODED.items():
        out = os.path.join(root, f"{name}-{side}")
        os.makedirs(out, exist_ok=True)
        for f in sorted(os.listdir(src_dir)):
            dst = os.path.join(out, f)
            if not os.path.exists(dst):
                gdcm_transcode(os.path.join(src_dir, f), dst + ".tmp", syntax)
                os.replace(dst + ".tmp", dst)


def preprocess(path):
    ds = pydicom.dcmread(path)
    m = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        v = np.clip((m - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    else:
        v = (m - m.min()) / max(np.ptp(m), 1e-12)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        v = 1.0 - v
    img = Image.fromarray(v.astype(np.float32), mode="F").resize((64, 64), Image.BILINEAR)
    return float(np.asarray(img).sum())


def rate(paths, processes):
    start = time.perf_counter()
    if processes == 1:
        total = sum(map(preprocess, paths))
    else:
        with Pool(processes) as pool:
            total = sum(pool.map(preprocess, paths, chunksize=8))
    assert np.isfinite(total)
    return len(paths) / (time.perf_counter() - start)


def main():
    if sys.argv[1] == "--transcode":
        transcode(sys.argv[2], sys.argv[3])
        return
    root, side = sys.argv[1], sys.argv[2]
    cores = os.cpu_count()
    print(f"| transfer syntax | images | {side}x{side} -> 64x64, 1 process (img/s) | {cores} processes (img/s) |")
    print("|---|---|---|---|")
    for syntax in SYNTAXES + [name for name in TRANSCODED if os.path.isdir(os.path.join(root, f"{name}-{side}"))]:
        d = os.path.join(root, f"{syntax}-{side}")
        paths = sorted(os.path.join(d, f) for f in os.listdir(d))
        print(f"| {syntax} | {len(paths)} | {rate(paths, 1):.0f} | {rate(paths, cores):.0f} |")


if __name__ == "__main__":
    main()
