"""ExaonePathModel against timm's ViT-B/16 (the release's architecture) and DINO's interpolation formula."""

import copy
import math

import pytest
import timm
import torch
from torch.nn import functional as F
from transformers import AutoModelForImageClassification

from exaonepath_hf import ExaonePathConfig, ExaonePathForImageClassification, ExaonePathModel

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    # timm zero-initialises nothing we could miss, but make every tensor distinctive anyway.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


@pytest.fixture(scope="module")
def ours(timm_vit):
    model = ExaonePathModel(ExaonePathConfig()).eval()
    model.load_state_dict(timm_vit.state_dict(), strict=True)
    return model


def dino_position_embeddings(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """DINO's `interpolate_pos_encoding`, derived from its formula: bicubic scale_factor with the +0.1 offset."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, scale_factor=(h0 / side, w0 / side), mode="bicubic")
    assert grid.shape[-2:] == (int(h0), int(w0))
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])), dim=1)


def timm_features_with_dino_interpolation(vit, pixel_values: torch.Tensor) -> torch.Tensor:
    """timm's blocks and norm run on tokens whose position embeddings come from the DINO formula above."""
    tokens = vit.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
    tokens = torch.cat((vit.cls_token.expand(len(tokens), -1, -1), tokens), dim=1)
    tokens = tokens + dino_position_embeddings(vit.pos_embed, *pixel_values.shape[-2:], 16)
    return vit.norm(vit.blocks(tokens))[:, 0]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_features_equal_timm_at_224(timm_vit, ours, attn_implementation):
    ours.set_attn_implementation(attn_implementation)
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = timm_vit(pixel_values)
        output = ours(pixel_values)
    assert output.pooler_output.shape == (2, 768)
    assert output.last_hidden_state.shape == (2, 197, 768)
    assert (output.pooler_output - expected).abs().max() < 1e-5
    assert torch.equal(output.pooler_output, output.last_hidden_state[:, 0])
    ours.set_attn_implementation("sdpa")


@pytest.mark.parametrize("side", [96, 256, 512])
def test_other_sizes_follow_dino_interpolation(timm_vit, ours, side):
    pixel_values = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(side))
    with torch.no_grad():
        expected = timm_features_with_dino_interpolation(timm_vit, pixel_values)
        features = ours(pixel_values).pooler_output
    assert (features - expected).abs().max() < 1e-5


def test_non_square_input_uses_rows_and_columns(timm_vit, ours):
    pixel_values = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = timm_features_with_dino_interpolation(timm_vit, pixel_values)
        output = ours(pixel_values)
    assert output.last_hidden_state.shape == (1, 1 + 6 * 10, 768)
    assert (output.pooler_output - expected).abs().max() < 1e-5


def test_attentions_and_hidden_states(ours):
    ours.set_attn_implementation("eager")
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        output = ours(pixel_values, output_attentions=True, output_hidden_states=True)
    ours.set_attn_implementation("sdpa")
    assert len(output.attentions) == 12 and output.attentions[0].shape == (1, 12, 197, 197)
    assert torch.allclose(output.attentions[-1].sum(-1), torch.ones(1, 12, 197), atol=1e-5)
    assert len(output.hidden_states) == 13
    assert torch.allclose(ours.norm(output.hidden_states[-1]), output.last_hidden_state, atol=1e-6)
    with pytest.raises(ValueError, match="eager"):
        ours(pixel_values, output_attentions=True)


def test_tuple_output_matches_dataclass():
    model = ExaonePathModel(ExaonePathConfig(**TINY)).eval()
    pixel_values = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        as_tuple = model(pixel_values, return_dict=False, output_hidden_states=True)
        as_output = model(pixel_values, output_hidden_states=True)
    assert torch.equal(as_tuple[0], as_output.last_hidden_state)
    assert torch.equal(as_tuple[1], as_output.pooler_output)
    assert len(as_tuple[2]) == 3


def test_bad_inputs_are_named():
    model = ExaonePathModel(ExaonePathConfig(**TINY))
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        ExaonePathConfig(hidden_size=64, num_attention_heads=3)


def test_drop_path_is_stochastic_in_training_only():
    model = ExaonePathModel(ExaonePathConfig(**TINY, drop_path_rate=0.5))
    assert [
        block.drop_path.drop_prob if hasattr(block.drop_path, "drop_prob") else 0.0 for block in model.blocks
    ] == [
        0.0,
        0.5,
    ]
    pixel_values = torch.randn(8, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    first = model(pixel_values).pooler_output
    second = model(pixel_values).pooler_output
    assert not torch.allclose(first, second)
    model.eval()
    assert torch.equal(model(pixel_values).pooler_output, model(pixel_values).pooler_output)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = ExaonePathModel(ExaonePathConfig(**TINY)).train()
    pixel_values = torch.randn(2, 3, 32, 32)

    def gradients():
        model.zero_grad()
        model(pixel_values).pooler_output.square().sum().backward()
        return [param.grad.clone() for param in model.parameters()]

    plain = gradients()
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.24 on
        model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing
    checkpointed = gradients()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


def test_bf16_autocast_and_bf16_weights_stay_close_to_fp32(ours):
    pixel_values = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = ours(pixel_values).pooler_output
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_features = ours(pixel_values).pooler_output
        bf16_model = copy.deepcopy(ours).to(torch.bfloat16)
        bf16_features = bf16_model(pixel_values.to(torch.bfloat16)).pooler_output
    assert bf16_features.dtype == torch.bfloat16
    for features in (autocast_features, bf16_features):
        assert F.cosine_similarity(features.float(), reference).item() > 0.99


def test_classification_trains_one_step():
    config = ExaonePathConfig(**TINY, id2label={0: "normal", 1: "tumor", 2: "stroma"})
    model = AutoModelForImageClassification.from_config(config)
    assert isinstance(model, ExaonePathForImageClassification) and model.num_labels == 3
    pixel_values, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    output = model(pixel_values, labels=labels)
    assert output.logits.shape == (4, 3)
    assert torch.isclose(output.loss, F.cross_entropy(output.logits, labels))
    before = model.classifier.weight.detach().clone()
    output.loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.classifier.weight)
    with torch.no_grad():
        assert model(pixel_values, labels=labels).loss < output.loss


def test_init_covers_cls_token_and_position_embeddings():
    torch.manual_seed(0)
    model = ExaonePathModel(ExaonePathConfig(**TINY))
    for param in (model.cls_token, model.pos_embed):
        assert 0.015 < param.std().item() < 0.025
    assert torch.equal(model.norm.weight, torch.ones(64))
