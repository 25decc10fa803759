#!/usr/bin/env python3
"""A small NIfTI test volume for vlsm's NIfTI input (tests/fixtures/nifti/), written with
nibabel, and what nibabel reads from it, which the tests compare with vlsm's exactly.

  python tools/make_nifti_fixtures.py tests/fixtures/nifti     # needs numpy, nibabel

volume.nii.gz: 20 × 16 × 6 int16, scl_slope 2, scl_inter -5, stored in LPI-ish voxel order
(x flipped, y and z swapped: a non-trivial affine); values.npy: nibabel's get_fdata(),
float64, [x, y, z]. slices.json: for each plane the slice count and, for slice 1, the
model's view of it from nibabel's closest canonical (RAS+) image in radiological display
(rows top to bottom: anterior→posterior for axial, superior→inferior otherwise; columns:
the patient's right first, or anterior first for sagittal), as float64.
"""

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(5)
data = rng.integers(-300, 900, (20, 16, 6)).astype(np.int16)
# Voxel axis 0 runs right→left (x flipped), axis 1 inferior→superior, axis 2 posterior→anterior.
affine = np.array(
    [
        [-0.8, 0.0, 0.0, 30.0],
        [0.0, 0.0, 2.5, -20.0],
        [0.0, 1.2, 0.0, -10.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
img = nib.Nifti1Image(data, affine)
img.header.set_slope_inter(2.0, -5.0)
img.header.set_sform(affine, code=1)
img.header.set_qform(affine, code=1)
nib.save(img, out / "volume.nii.gz")

back = nib.load(out / "volume.nii.gz")
values = back.get_fdata()
np.save(out / "values.npy", values.reshape(-1, order="F"))
canon = nib.as_closest_canonical(back).get_fdata()  # [X (→R), Y (→A), Z (→S)]
nx, ny, nz = canon.shape


def view(plane, k):
    if plane == "axial":  # rows: anterior first; columns: patient's right first
        return canon[::-1, ::-1, k].T
    if plane == "coronal":  # rows: superior first; columns: right first
        return canon[::-1, k, ::-1].T
    return canon[k, ::-1, ::-1].T  # sagittal: rows superior first, columns anterior first


slices = {}
for plane, n in [("axial", nz), ("coronal", ny), ("sagittal", nx)]:
    v = view(plane, 1)
    slices[plane] = {"count": int(n), "rows": int(v.shape[0]), "columns": int(v.shape[1]),
                     "slice_1": [float(x) for x in v.reshape(-1)]}
(out / "slices.json").write_text(json.dumps({"shape": list(values.shape), "affine": back.affine.tolist(), "slices": slices}) + "\n")
print("wrote", out / "volume.nii.gz")
