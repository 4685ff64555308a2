"""The closed sets of names that the config accepts and the tagging stage implements.

They live here, below both, because the config sits below the tagging stage in the checked
layers and must not import it: the config validates against these names, and the owning
modules (tagging.preprocess, tagging.labels, tagging.families, tagging.thresholds) type
their fields with them. tests/test_config_schema.py checks each owner implements exactly
these names, so neither side can gain one the other lacks. Imports nothing at run time:
`tagd search` loads the config on every start.
"""

from __future__ import annotations

from typing import Literal, get_args

Layout = Literal["NHWC", "NCHW"]
Channels = Literal["RGB", "BGR"]
# "stages" is set only from a model's preprocess.json, never from the config.
ConfigFit = Literal["pad", "stretch", "fit-pad", "fit-edge", "fit-tensor"]
Fit = Literal[ConfigFit, "stages"]
Resample = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
LabelFormat = Literal[
    "selected_tags.csv",
    "tags.txt",
    "class.json",
    "tags.json",
    "tag_mapping.json",
    "camie-metadata.json",
]
ThresholdMode = Literal["top", "mcut"]
Device = Literal["auto", "cpu", "cuda"]
Aggregate = Literal["max", "mean"]

LAYOUTS: tuple[str, ...] = get_args(Layout)
CHANNELS: tuple[str, ...] = get_args(Channels)
CONFIG_FITS: tuple[str, ...] = get_args(ConfigFit)
RESAMPLES: tuple[str, ...] = get_args(Resample)
LABEL_FORMATS: tuple[str, ...] = get_args(LabelFormat)
THRESHOLD_MODES: tuple[str, ...] = get_args(ThresholdMode)
DEVICES: tuple[str, ...] = get_args(Device)
AGGREGATES: tuple[str, ...] = get_args(Aggregate)

# The presets in tagging.families.FAMILIES, in the order the docs list them.
BUILTIN_FAMILIES: tuple[str, ...] = (
    "wd14",
    "deepdanbooru",
    "ml-danbooru",
    "jtp",
    "pixai",
    "cl-tagger",
    "animetimm",
    "camie-v2",
)
