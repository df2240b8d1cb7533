"""The detector's strides and post-processing settings, in one torch-free place.

`GFL.postprocess` (torch) and `export.postprocess_onnx_outputs` (numpy, for onnxruntime without torch) both read
them, so a deployed ONNX model detects exactly what the checkpoint does.
"""
from __future__ import annotations

STRIDES = (8, 16, 32, 64, 128)  # P3-P7
# Score > score_thr, the top nms_pre per level, NMS at iou_thr (per class; across classes with agnostic=True: one box per
# place, the best-scored class's); with class_groups (one group id per class) a box is also dropped where a higher-scored
# box of an earlier group overlaps it at IoU > iou_thr (old classes 0, added 1); then the top max_per_img per image.
POSTPROCESS = {"score_thr": 0.05, "nms_pre": 1000, "iou_thr": 0.6, "max_per_img": 100, "agnostic": False,
               "class_groups": None}
# Rows of the across-groups IoU matrix computed at once: 2048 x N values, so memory stays bounded for any box count.
ACROSS_GROUPS_BLOCK = 2048
