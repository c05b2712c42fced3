"""EXAONEPath: the DINO ViT of arXiv 2408.00380 as a transformers model.

Module names are the release's (and DINO's and timm's): `cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, so the released checkpoint, DINO and timm
ViT weights load without renaming.

Hub-loadable: imports only torch, transformers and the sibling configuration file, so `save_pretrained` can
ship it as remote code.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_exaonepath import ExaonePathConfig


def interpolate_position_embeddings(
    pos_embed: torch.Tensor, height: int, width: int, patch_size: int
) -> torch.Tensor:
    """Resample the trained position embeddings to a `height` x `width` image, the way DINO does.

    DINO scales the square grid by `(side / patch_size + 0.1) / grid` with bicubic interpolation (the 0.1
    avoids floating-point truncation of the output size). transformers' Dinov2 asks for an exact `size=`
    instead, which gives different embeddings (28% apart on a 96 px crop), so the formula is kept as DINO
    trained it. Computed in fp32: bicubic in bf16 is visibly off.
    """
    num_positions = pos_embed.shape[1] - 1
    grid = round(num_positions**0.5)
    rows, cols = height // patch_size, width // patch_size
    if rows == grid and cols == grid:
        return pos_embed
    class_pos_embed, patch_pos_embed = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.float(),
        scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid),
        mode="bicubic",
        align_corners=False,
    ).to(pos_embed.dtype)
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((class_pos_embed, patch_pos_embed), dim=1)


class ExaonePathPatchEmbed(nn.Module):
    """Non-overlapping `patch_size` patches → `hidden_size` tokens (a strided convolution named `proj`)."""

    def __init__(self, config: ExaonePathConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.proj = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}; preprocess images with ExaonePathImageProcessor."
            )
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"pixel_values height and width must be multiples of the patch size {self.patch_size}, "
                f"got {height}x{width}; resize or crop the images first."
            )
        pixel_values = pixel_values.to(self.proj.weight.dtype)
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out, so the attention probabilities can be returned."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = attn_weights.softmax(dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class ExaonePathAttention(nn.Module):
    """Multi-head self-attention with DINO's fused `qkv` projection."""

    def __init__(self, config: ExaonePathConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(self, query, key, value, None, scaling=self.scaling)
        attn_output = attn_output.reshape(batch_size, seq_len, -1)
        return self.proj(attn_output), attn_weights


class ExaonePathMLP(nn.Module):
    def __init__(self, config: ExaonePathConfig):
        super().__init__()
        hidden_features = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class ExaonePathDropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        keep = hidden_states.new_empty(mask_shape).bernoulli_(keep_prob)
        return hidden_states * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ExaonePathBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ExaonePathConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = ExaonePathAttention(config)
        self.drop_path = ExaonePathDropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ExaonePathMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attn(self.norm1(hidden_states))
        hidden_states = hidden_states + self.drop_path(attn_output)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, attn_weights


class ExaonePathPreTrainedModel(PreTrainedModel):
    config_class = ExaonePathConfig
    config: ExaonePathConfig
    base_model_prefix = "exaonepath"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ExaonePathBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """timm/DINO ViT initialisation: truncated normal weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ExaonePathModel):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            init.trunc_normal_(module.pos_embed, mean=0.0, std=std)


class ExaonePathModel(ExaonePathPreTrainedModel):
    """The EXAONEPath backbone. `pooler_output` (the CLS token after the final LayerNorm) is the feature."""

    def __init__(self, config: ExaonePathConfig):
        super().__init__(config)
        self.patch_embed = ExaonePathPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2 + 1, config.hidden_size))
        drop_path_rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.blocks = nn.ModuleList(ExaonePathBlock(config, rate) for rate in drop_path_rates)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the CLS token prepended and position embeddings (interpolated if needed) added."""
        height, width = pixel_values.shape[-2:]
        tokens = self.patch_embed(pixel_values)
        cls_tokens = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls_tokens, tokens), dim=1)
        return tokens + interpolate_position_embeddings(self.pos_embed, height, width, self.config.patch_size)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        stain_normalized: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch, channels, height, width)`):
            Images from [`ExaonePathImageProcessor`]; height and width must be multiples of the patch size.
        output_attentions (`bool`, *optional*):
            Return each block's attention probabilities. Needs `attn_implementation="eager"`.
        output_hidden_states (`bool`, *optional*):
            Return the embeddings and each block's output (before the final norm).
        stain_normalized (`torch.Tensor`, *optional*):
            The processor's per-image Macenko flags. Accepted so that `model(**processor(images))` works;
            not used by the forward pass.
        """
        output_attentions = (
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                "output_attentions=True needs eager attention: load the model with "
                "from_pretrained(..., attn_implementation='eager') or call model.set_attn_implementation('eager')."
            )

        hidden_states = self.embed(pixel_values)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self.blocks:
            hidden_states, attn_weights = block(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)

        sequence_output = self.norm(hidden_states)
        pooled_output = sequence_output[:, 0]
        if not return_dict:
            extras = tuple(value for value in (all_hidden_states, all_attentions) if value is not None)
            return (sequence_output, pooled_output) + extras
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


class ExaonePathForImageClassification(ExaonePathPreTrainedModel):
    """EXAONEPath with a linear head on the feature (the CLS token after the final norm): a linear probe."""

    def __init__(self, config: ExaonePathConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.exaonepath = ExaonePathModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        stain_normalized: torch.Tensor | None = None,
    ) -> ImageClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Class indices in `[0, num_labels)`; when given, the cross-entropy loss is returned.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.exaonepath(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        if not return_dict:
            extras = tuple(v for v in (outputs.hidden_states, outputs.attentions) if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + extras
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


ExaonePathModel.register_for_auto_class("AutoModel")
ExaonePathForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "ExaonePathForImageClassification",
    "ExaonePathModel",
    "ExaonePathPreTrainedModel",
    "interpolate_position_embeddings",
]
