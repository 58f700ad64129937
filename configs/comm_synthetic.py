"""CoMM on synthetic_trimodal, for side-by-side comparison with default.py.

Same data, encoders (as CoMM's modality encoders), seed, steps, batch and optimiser as
configs/default.py. CoMM fuses the tokens of all modalities, so it needs two augmented views
("light" augmentations) and its own loss (NT-Xent between views, full and single-modality
masks, tau = 0.1). Retrieval reads CoMM's projected space: text-alone embeddings against the
single-modality image/audio embeddings (volume, span distance, cosine) and against the fused
image+audio embedding (``fused_cosine``).
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
    c.name = "comm_synthetic"
    c.model.kind = "comm"
    c.model.fusion_width = 64
    c.model.fusion_depth = 1
    c.model.fusion_heads = 8
    c.model.projector_dims = (256, 128)
    c.loss.name = "comm"
    c.loss.comm_temperature = 0.1
    c.data.two_views = True
    c.data.augment = "light"
    # CoMM's decay rule (docs/authors_code.md 7): wd 1e-4 on matrices only.
    c.optim.weight_decay = 1e-4
    return c
