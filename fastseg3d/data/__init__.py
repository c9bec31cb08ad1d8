"""Datasets for training and evaluation: the embedded synthetic volumes and Medical Segmentation Decathlon folders."""

from __future__ import annotations

from fastseg3d.data.msd import (
    build_msd_datasets,
    infer_modality,
    label_names,
    load_msd_datalist,
    load_msd_test_list,
    msd_transforms,
    num_input_channels,
    num_output_channels,
    split_cases,
)
from fastseg3d.data.synthetic import CLASS_NAMES, SyntheticSegmentation, generate_case

__all__ = [
    "CLASS_NAMES",
    "SyntheticSegmentation",
    "build_msd_datasets",
    "generate_case",
    "infer_modality",
    "label_names",
    "load_msd_datalist",
    "load_msd_test_list",
    "msd_transforms",
    "num_input_channels",
    "num_output_channels",
    "split_cases",
]
