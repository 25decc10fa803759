#!/usr/bin/env python3
"""Small DICOM test files for vlsm's DICOM input (tests/fixtures/dicom/), written with pydicom,
and the pixel values pydicom decodes from them (after the modality LUT: stored value ×
RescaleSlope + RescaleIntercept), which the tests compare with vlsm's exactly.

  python tools/make_dicom_fixtures.py tests/fixtures/dicom     # needs numpy, pydicom 3, imagecodecs

Files: ct_explicit.dcm (CT, int16, slope 1 intercept -1024, window 40/400, explicit VR LE),
mono1_implicit.dcm (MONOCHROME1, uint8, implicit VR LE, no window), rgb.dcm (RGB, uint8),
multiframe_rle.dcm (3 frames, uint16, slope 0.5 intercept 10, RLE lossless),
deflated.dcm (deflated explicit VR LE, uint16), j2k_lossless.dcm (12-bit CT, JPEG 2000
reversible) and j2k_lossy.dcm (8-bit, JPEG 2000 irreversible), both encoded by OpenJPEG through
imagecodecs and decoded by pydicom through Pillow's OpenJPEG, j2k_corrupt.dcm (a JPEG 2000
syntax with a broken codestream), jpegls_unsupported.dcm (JPEG-LS, which vlsm does not
decode), truncated.dcm (ct_explicit.dcm cut in half), ybr_full.dcm (YBR_FULL, uncompressed),
jpeg_baseline.dcm (greyscale JPEG baseline, encoded by Pillow), jpeg_lossless.dcm (12-bit
CT, JPEG Lossless SV1, encoded by libjpeg-turbo through imagecodecs; pydicom 3 decodes it only
with a plugin, so its reference values are the encoded ones, checked by decoding them back
with imagecodecs: lossless). reference.json: for each readable
file its rows, columns, frames, photometric interpretation, window and SOP Instance UID;
<name>.values.npy: the decoded values as float64, [frames, rows, columns(, 3)].
"""

import io
import json
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from PIL import Image
from pydicom.pixels import apply_modality_lut, convert_color_space
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(3)
ROWS, COLS = 32, 40


def base(uid_suffix: str, syntax) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{uid_suffix}"
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["vlsm study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["vlsm series"])
    ds.Modality = "OT"
    ds.PatientName = "Test^Fixture"
    ds.Rows, ds.Columns = ROWS, COLS
    return ds


def grey(ds: Dataset, values: np.ndarray, bits: int, signed: bool, photometric="MONOCHROME2"):
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = values.tobytes()


files = {}

# A CT slice: Hounsfield units from stored values by the rescale.
ct = base("1", ExplicitVRLittleEndian)
ct.Modality = "CT"
hu = rng.integers(-1000, 1500, (ROWS, COLS)).astype(np.int16)
hu[8:20, 10:30] = rng.integers(20, 80, (12, 20))  # soft tissue
grey(ct, (hu + 1024).astype(np.int16), 16, True)
ct.RescaleSlope, ct.RescaleIntercept, ct.RescaleType = 1, -1024, "HU"
ct.WindowCenter, ct.WindowWidth = 40, 400
files["ct_explicit"] = ct

mono1 = base("2", ImplicitVRLittleEndian)
grey(mono1, rng.integers(0, 256, (ROWS, COLS)).astype(np.uint8), 8, False, "MONOCHROME1")
files["mono1_implicit"] = mono1

rgb = base("3", ExplicitVRLittleEndian)
rgb.SamplesPerPixel = 3
rgb.PhotometricInterpretation = "RGB"
rgb.PlanarConfiguration = 0
rgb.BitsAllocated = rgb.BitsStored = 8
rgb.HighBit = 7
rgb.PixelRepresentation = 0
rgb.PixelData = rng.integers(0, 256, (ROWS, COLS, 3)).astype(np.uint8).tobytes()
files["rgb"] = rgb

multi = base("4", ExplicitVRLittleEndian)
frames = rng.integers(0, 4096, (3, ROWS, COLS)).astype(np.uint16)
grey(multi, frames, 16, False)
multi.BitsStored, multi.HighBit = 12, 11
multi.NumberOfFrames = 3
multi.RescaleSlope, multi.RescaleIntercept = 0.5, 10
multi.compress(RLELossless, frames, generate_instance_uid=False)  # repeatable UIDs
files["multiframe_rle"] = multi

deflated = base("5", DeflatedExplicitVRLittleEndian)
grey(deflated, rng.integers(0, 65536, (ROWS, COLS)).astype(np.uint16), 16, False)
files["deflated"] = deflated

# YBR_FULL, uncompressed (pydicom reads it back as RGB).
ybr = base("7", ExplicitVRLittleEndian)
ybr.SamplesPerPixel = 3
ybr.PhotometricInterpretation = "YBR_FULL"
ybr.PlanarConfiguration = 0
ybr.BitsAllocated = ybr.BitsStored = 8
ybr.HighBit = 7
ybr.PixelRepresentation = 0
colours = rng.integers(0, 256, (ROWS, COLS, 3)).astype(np.uint8)
ybr.PixelData = convert_color_space(colours, "RGB", "YBR_FULL").tobytes()
files["ybr_full"] = ybr

# JPEG baseline, greyscale (encoded by Pillow, decoded by pydicom through Pillow).
jpeg = base("8", JPEGBaseline8Bit)
gradient = (np.add.outer(np.arange(ROWS) * 6, np.arange(COLS) * 4) % 256).astype(np.uint8)
grey(jpeg, gradient, 8, False)
encoded = io.BytesIO()
Image.fromarray(gradient).save(encoded, format="JPEG", quality=90)
jpeg.PixelData = encapsulate([encoded.getvalue()])
jpeg["PixelData"].VR = "OB"
files["jpeg_baseline"] = jpeg

# JPEG Lossless SV1 (process 14, first-order prediction), 12-bit CT with a rescale.
lossless = base("9", JPEGLosslessSV1)
stored = (np.add.outer(np.arange(ROWS) * 97, np.arange(COLS) * 31) % 4096).astype(np.uint16)
grey(lossless, stored, 16, False)
lossless.BitsStored, lossless.HighBit = 12, 11
lossless.RescaleSlope, lossless.RescaleIntercept = 1, -1024
encoded = imagecodecs.jpeg8_encode(stored, lossless=True, bitspersample=12, predictor=1)
assert (imagecodecs.jpeg8_decode(encoded) == stored).all()
lossless.PixelData = encapsulate([encoded])
lossless["PixelData"].VR = "OB"
files["jpeg_lossless"] = lossless
# JPEG 2000: reversible 12-bit CT and irreversible 8-bit (a lossy code: pydicom decodes it
# with OpenJPEG, as the pure-Rust port vlsm uses).
j2k = base("10", JPEG2000Lossless)
grey(j2k, stored, 16, False)
j2k.BitsStored, j2k.HighBit = 12, 11
j2k.RescaleSlope, j2k.RescaleIntercept = 1, -1024
j2k.PixelData = encapsulate([imagecodecs.jpeg2k_encode(stored, level=0, codecformat="J2K", bitspersample=12)])
j2k["PixelData"].VR = "OB"
files["j2k_lossless"] = j2k
j2k_lossy = base("11", JPEG2000)
grey(j2k_lossy, gradient, 8, False)
j2k_lossy.PixelData = encapsulate([imagecodecs.jpeg2k_encode(gradient, level=30, codecformat="J2K")])
j2k_lossy["PixelData"].VR = "OB"
files["j2k_lossy"] = j2k_lossy
# pydicom cannot decode it without a plugin: the stored values, through the modality LUT.
known = {"jpeg_lossless": stored.astype(np.float64) - 1024}

reference = {}
for name, ds in files.items():
    path = out / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    if name in known:
        values = known[name]
    else:
        values = apply_modality_lut(back.pixel_array, back).astype(np.float64)
    frames_n = int(getattr(back, "NumberOfFrames", 1))
    values = values.reshape((frames_n,) + values.shape[-3 + (back.SamplesPerPixel == 1):])
    np.save(out / f"{name}.values.npy", values)
    window = None
    if "WindowCenter" in back:
        window = [float(back.WindowCenter), float(back.WindowWidth)]
    reference[name] = {
        "rows": int(back.Rows),
        "columns": int(back.Columns),
        "frames": frames_n,
        "photometric": str(back.PhotometricInterpretation),
        "window": window,
        "sop_instance_uid": str(back.SOPInstanceUID),
        "transfer_syntax": str(back.file_meta.TransferSyntaxUID),
    }

corrupt = base("6", JPEG2000Lossless)
grey(corrupt, np.zeros((ROWS, COLS), np.uint16), 16, False)
corrupt.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a real codestream"])
corrupt["PixelData"].VR = "OB"
corrupt.save_as(out / "j2k_corrupt.dcm", enforce_file_format=True)
jpegls = base("12", JPEGLSLossless)
grey(jpegls, np.zeros((ROWS, COLS), np.uint16), 16, False)
jpegls.PixelData = encapsulate([b"\xff\xd8\xff\xf7 a JPEG-LS stream"])
jpegls["PixelData"].VR = "OB"
jpegls.save_as(out / "jpegls_unsupported.dcm", enforce_file_format=True)

whole = (out / "ct_explicit.dcm").read_bytes()
(out / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
(out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
print(f"wrote {len(files) + 3} files to {out}")
