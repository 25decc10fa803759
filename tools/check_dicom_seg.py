#!/usr/bin/env python3
"""Checks a DICOM SEG written by `vlsm segment` with highdicom: the file parses as a
segmentation, and the mask highdicom gives for each source frame and segment equals the PNG
mask vlsm wrote for that frame and prompt.

  vlsm segment scan.dcm --prompt "a lesion" --prompt "the liver" --out out
  python tools/check_dicom_seg.py out scan.dcm        # needs highdicom, pydicom, numpy, pillow
"""

import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image

out, source = Path(sys.argv[1]), pydicom.dcmread(sys.argv[2])
uid = source.SOPInstanceUID
frames = int(getattr(source, "NumberOfFrames", 1))
seg = hd.seg.segread(out / f"{uid}.seg.dcm")
segments = list(range(1, seg.number_of_segments + 1))
if frames == 1:
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=segments)
else:
    masks = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=uid, source_frame_numbers=list(range(1, frames + 1)), segment_numbers=segments
    )
for f in range(frames):
    folder = out / (uid if frames == 1 else f"{uid}_f{f:03d}")
    for s in range(len(segments)):
        (png,) = folder.glob(f"{s:02d}_*.mask.png")
        expected = np.array(Image.open(png)) > 127
        if not (masks[f, :, :, s].astype(bool) == expected).all():
            sys.exit(f"frame {f}, segment {s + 1}: highdicom's mask differs from {png}")
labels = [s.SegmentLabel for s in seg.SegmentSequence]
print(f"ok: {len(segments)} segments {labels} × {frames} frames equal the PNG masks")
