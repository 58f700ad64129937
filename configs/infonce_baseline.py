"""Baseline for default.py: anchored InfoNCE (text-image + text-audio CLIP losses).

Same data, encoders, seed, steps, batch and optimiser as configs/default.py; only the loss
changes (ImageBind / LanguageBind style: the anchor is contrasted with each other modality
separately, so no term sees image and audio together).
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "_default_config", pathlib.Path(__file__).with_name("default.py")
)
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def get_config():
    c = _default.get_config()
    c.name = "infonce_baseline"
    c.loss.name = "infonce"
    c.loss.pairs = "anchored"
    c.loss.label_smoothing = 0.1  # as GRAM's loss, so only the score differs
    return c
