"""EXAONEPath inside the field's frameworks, each running the model folder's own preprocessing (Macenko with the
folder's stain reference → resize → crop → normalize) instead of the framework's, which has no Macenko:

- kaiko-eva: `eva_backbone`, a function for `eva.models.ModelFromFunction`;
- lazyslide: `lazyslide_model` (an `ImageModel`) and `register_lazyslide`, which makes
  `zs.tl.feature_extraction(wsi, "exaonepath", model_path=FOLDER)` work;
- timm: `exaonepath-convert --format timm` (`exaonepath_hf.convert.convert(..., folder_format="timm")`) writes a
  folder timm loads; timm then applies no Macenko, and its card says how the caller does.

The frameworks are imported inside the functions that need them, so this package imports with none installed.
"""

from .encoder import ProcessorEncoder
from .eva import eva_backbone
from .lazyslide import lazyslide_model, register_lazyslide

__all__ = ["ProcessorEncoder", "eva_backbone", "lazyslide_model", "register_lazyslide"]
