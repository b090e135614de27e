"""pydicom side of the index benchmark: what a Python user writes to index a DICOM folder before
training: walk it, read every header with `dcmread(stop_before_pixels=True)` (a file that fails is
kept with its reason), keep the identity and image attributes, group images by study. One process,
and a multiprocessing pool of all cores (each worker returns its files' records). Prints seconds and
files per second for each.

    python scripts/bench_index_pydicom.py DIR
"""
import multiprocessing
import os
import sys
import time

import pydicom

KEYS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PhotometricInterpretation",
        "BitsStored", "Rows", "Columns", "SamplesPerPixel")


def files(root):
    out = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(os.path.join(dirpath, n) for n in names
                   if not n.startswith(".") and not n.lower().endswith((".csv", ".txt", ".json", ".md", ".toml")))
    return sorted(out)


def record(path):
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return path, {k: str(ds.get(k, "")) for k in KEYS}, None
    except Exception as e:  # noqa: BLE001 - a bad file is listed, as the index lists it
        return path, None, str(e)


def index(paths, pool=None):
    records = pool.map(record, paths, chunksize=256) if pool else [record(p) for p in paths]
    studies = {}
    for path, rec, err in records:
        if rec is not None:
            studies.setdefault(rec["StudyInstanceUID"], []).append(path)
    return studies


def main():
    root = sys.argv[1]
    paths = files(root)
    for label, procs in (("pydicom, 1 process", 0), (f"pydicom, {os.cpu_count()} processes", os.cpu_count())):
        pool = multiprocessing.Pool(procs) if procs else None
        start = time.perf_counter()
        studies = index(paths, pool)
        seconds = time.perf_counter() - start
        if pool:
            pool.close()
        print(f"{label}: {len(paths)} files, {len(studies)} studies, {seconds:.2f} s, {len(paths) / seconds:.0f} files/s")


if __name__ == "__main__":
    main()
