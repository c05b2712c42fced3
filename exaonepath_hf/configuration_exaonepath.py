"""EXAONEPath model configuration.

Hub-loadable: imports only transformers, so `save_pretrained` can ship it as remote code.
"""

from transformers import PreTrainedConfig


class ExaonePathConfig(PreTrainedConfig):
    r"""
    Configuration of [`ExaonePathModel`]: the DINO Vision Transformer of EXAONEPath (arXiv 2408.00380).

    The defaults describe the released model, a ViT-B/16 (86M parameters). Smaller sizes use the same
    architecture, e.g. ViT-S/16 (`hidden_size=384, num_attention_heads=6`) or ViT-Ti/16
    (`hidden_size=192, num_attention_heads=3`).

    Args:
        hidden_size (`int`, defaults to 768): width of the patch embeddings and transformer blocks.
        num_hidden_layers (`int`, defaults to 12): number of transformer blocks.
        num_attention_heads (`int`, defaults to 12): attention heads per block; must divide `hidden_size`.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width as a multiple of `hidden_size`.
        qkv_bias (`bool`, defaults to `True`): bias in the fused query/key/value projection.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon used in training (the release's own
            loader rebuilds LayerNorm with 1e-5; 1e-6 is the faithful value).
        image_size (`int`, defaults to 224): side of the square image the position embeddings were trained on.
            Other sides that are multiples of `patch_size` work through DINO's interpolation.
        patch_size (`int`, defaults to 16): side of the square patches.
        num_channels (`int`, defaults to 3): input channels.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, rising linearly from 0 in the first block to
            this value in the last, as in DINO.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal initialisation.

    Example:

    ```python
    >>> from exaonepath_hf import ExaonePathConfig, ExaonePathModel
    >>> config = ExaonePathConfig(hidden_size=384, num_attention_heads=6)  # ViT-S/16
    >>> model = ExaonePathModel(config)
    ```
    """

    model_type = "exaonepath"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")

    @property
    def grid_size(self) -> int:
        """Patches per side at `image_size`: the side of the trained position-embedding grid."""
        return self.image_size // self.patch_size


ExaonePathConfig.register_for_auto_class()

__all__ = ["ExaonePathConfig"]
