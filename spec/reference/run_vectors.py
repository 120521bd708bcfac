#!/usr/bin/env python3
"""Run dcmref over the conformance vectors of spec/vectors/ (spec §19).

Run: python spec/reference/run_vectors.py [-v]   (exit status 0 when all agree)
"""

import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dcmref  # noqa: E402

VECTORS = os.path.join(HERE, "..", "vectors")


def digest(b):
    return {"count": None, "sha256": hashlib.sha256(b).hexdigest()}


def values_of(dtype, data):
    return dcmref.to_float32(dtype, data).astype(np.float64)


def compare_tensor(name, t, exp):
    errs = []
    for key in ("kind", "dtype"):
        if getattr(t, key) != exp[key]:
            errs.append(f"{name}: {key} {getattr(t, key)} != {exp[key]}")
    if list(t.shape) != exp["shape"]:
        errs.append(f"{name}: shape {list(t.shape)} != {exp['shape']}")
    for key in ("codes", "factors"):
        got, want = getattr(t, key), exp[key]
        if (got is None) != (want is None):
            errs.append(f"{name}: {key} {'null' if got is None else 'present'}, expected "
                        f"{'null' if want is None else 'present'}")
        elif got is not None:
            width = 4 if key == "factors" else 1
            count = len(got) // width
            if key == "codes" and (t.inner or t.kind) in ("dense-delta", "full"):
                count = len(got) // dcmref.DTYPES[t.dtype]
            if count != want["count"] or hashlib.sha256(got).hexdigest() != want["sha256"]:
                errs.append(f"{name}: {key} differ (count {count} vs {want['count']})")
    if exp["sha256"] is not None:
        if t.data is None or hashlib.sha256(t.data).hexdigest() != exp["sha256"]:
            errs.append(f"{name}: tensor sha256 differs")
    if exp["values"] is not None:
        got = values_of(t.dtype, t.data)
        want, atol = np.array(exp["values"], np.float64), np.array(exp["atol"], np.float64)
        bad = np.abs(got - want) > atol
        if bad.any():
            i = int(np.argmax(bad))
            errs.append(f"{name}: {int(bad.sum())} values out of tolerance, e.g. [{i}] "
                        f"{got[i]} vs {want[i]} ± {atol[i]}")
    return errs


def run_valid(v):
    """§19.3: decoded with the base to the expected results, and accepted in both
    procedures with and without the base."""
    exp = json.load(open(os.path.join(VECTORS, v["expected"])))
    path = os.path.join(VECTORS, v["path"])
    errs = []
    if hashlib.sha256(open(path, "rb").read()).hexdigest() != exp["sha256"]:
        errs.append("file sha256 differs from expected.json")
    base = os.path.join(VECTORS, v["base"])
    out = dcmref.decode(path, base)
    if list(out.tensors) != list(exp["tensors"]):
        errs.append(f"tensor names {list(out.tensors)} != {list(exp['tensors'])}")
    for name, t in out.tensors.items():
        if name in exp["tensors"]:
            errs += compare_tensor(name, t, exp["tensors"][name])
    atts = {k: hashlib.sha256(b).hexdigest() for k, b in out.attachments.items()}
    if atts != exp["attachments"]:
        errs.append("attachments differ")
    dcmref.decode(path, base, "reader")
    dcmref.decode(path, None, "reader")    # without the base: payloads still fully checked
    dcmref.decode(path, None, "verifier")
    return errs


def run_faulty(v):
    """§19.3: the procedure of `mode`, with `base` when it is given, rejects the
    vector with `code`; a vector that needs its base is accepted without it."""
    path = os.path.join(VECTORS, v["path"])
    base = os.path.join(VECTORS, v["base"]) if v["base"] else None
    errs = []
    if v["needs_base"]:
        try:
            dcmref.decode(path, None, v["mode"])
        except dcmref.DcmRefError as e:
            errs.append(f"without base: {e.code}: {e}")
    try:
        dcmref.decode(path, base, v["mode"])
    except dcmref.DcmRefError as e:
        if e.code != v["code"]:
            errs.append(f"got {e.code} ({e}), expected {v['code']}")
        return errs, f"{e.code}: {e}"
    errs.append(f"accepted, expected {v['code']}")
    return errs, "accepted"


def main():
    verbose = "-v" in sys.argv
    manifest = json.load(open(os.path.join(VECTORS, "index.json")))
    counts, failures = {}, 0
    for v in manifest["vectors"]:
        try:
            if v["tier"] == "faulty":
                errs, what = run_faulty(v)
            else:
                errs, what = run_valid(v), "ok"
        except dcmref.DcmRefError as e:
            errs, what = [f"rejected: {e.code}: {e}"], "rejected"
        ok = not errs
        c = counts.setdefault(v["tier"], [0, 0])
        c[0 if ok else 1] += 1
        failures += not ok
        if verbose or not ok:
            print(f"{'PASS' if ok else 'FAIL'} {v['path']}  [{what}]")
            for e in errs:
                print(f"     {e}")
    for tier, (good, bad) in counts.items():
        print(f"{tier}: {good} agree, {bad} disagree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
