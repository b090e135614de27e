"""pydicom side of the decode benchmark: the same files, the same pipeline (modality LUT -> window ->
MONOCHROME1 inversion -> [0, 1] -> 64x64), the way a user of the Python stack would write it.

    python scripts/bench_pydicom.py DIR SIDE
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
    root, side = sys.argv[1], sys.argv[2]
    cores = os.cpu_count()
    print(f"| transfer syntax | images | {side}x{side} -> 64x64, 1 process (img/s) | {cores} processes (img/s) |")
    print("|---|---|---|---|")
    for syntax in SYNTAXES:
        d = os.path.join(root, f"{syntax}-{side}")
        paths = sorted(os.path.join(d, f) for f in os.listdir(d))
        print(f"| {syntax} | {len(paths)} | {rate(paths, 1):.0f} | {rate(paths, cores):.0f} |")


if __name__ == "__main__":
    main()
