"""Unit tests of the DINO training parts against independent references (hand-computed values, numpy)."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from exaonepath_hf.train.dino.augmentations import AugmentationConfig, DINOMultiCrop
from exaonepath_hf.train.dino.config import load_config
from exaonepath_hf.train.dino.head import DINOHead
from exaonepath_hf.train.dino.loss import DINOLoss
from exaonepath_hf.train.dino.model import MultiCropNetwork
from exaonepath_hf.train.dino.optim import (
    clip_gradients_per_parameter,
    freeze_last_layer_gradients,
    parameter_groups,
)
from exaonepath_hf.train.dino.schedules import DINOSchedules, cosine_schedule, linear_warmup_then_constant
from exaonepath_hf.train.dino.teacher import build_teacher, ema_update

# ------------------------------------------------------------------------------------------------ the loss


def reference_dino_loss(student, teacher, center, num_crops, student_temp, teacher_temp):
    """DINO's loss written from the paper's equations, sample by sample in float64 numpy."""
    student = np.asarray(student, dtype=np.float64)
    teacher = np.asarray(teacher, dtype=np.float64)
    center = np.asarray(center, dtype=np.float64).reshape(-1)
    batch = teacher.shape[0] // 2

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    pair_losses = []
    for t_view in range(2):
        for s_view in range(num_crops):
            if s_view == t_view:
                continue
            per_sample = []
            for b in range(batch):
                q = softmax((teacher[t_view * batch + b] - center) / teacher_temp)
                log_p = np.log(softmax(student[s_view * batch + b] / student_temp))
                per_sample.append(-(q * log_p).sum())
            pair_losses.append(np.mean(per_sample))
    return float(np.mean(pair_losses))


def test_loss_equals_independent_reference_and_center_is_an_ema():
    generator = torch.Generator().manual_seed(0)
    num_crops, batch, dim = 4, 3, 7
    student = torch.randn(num_crops * batch, dim, generator=generator)
    teacher = torch.randn(2 * batch, dim, generator=generator)
    loss_fn = DINOLoss(dim, num_crops, student_temp=0.1, center_momentum=0.9)
    start_center = torch.randn(1, dim, generator=generator)
    loss_fn.center.copy_(start_center)

    loss = loss_fn(student, teacher, teacher_temp=0.04)
    expected = reference_dino_loss(student, teacher, start_center, num_crops, 0.1, 0.04)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    expected_center = 0.9 * start_center.double() + 0.1 * teacher.double().mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center.double(), expected_center, rtol=1e-6, atol=1e-7)


def test_loss_is_fp32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(6, 5, generator=generator)
    teacher = torch.randn(4, 5, generator=generator)
    reference = DINOLoss(5, 3)(student, teacher, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = DINOLoss(5, 3)(student.bfloat16(), teacher.bfloat16(), 0.04)
    assert under_autocast.dtype == torch.float32
    # Only the bf16 rounding of the inputs differs.
    assert under_autocast.item() == pytest.approx(reference.item(), rel=2e-2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _center_worker(rank: int, world_size: int, port: int, outputs: list, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        loss_fn = DINOLoss(outputs[0].shape[1], num_crops=2)
        for _ in range(3):  # several updates: ranks must stay identical, not only after the first
            loss_fn.update_center(outputs[rank])
        torch.save(loss_fn.center, os.path.join(result_dir, f"center_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_center_is_identical_on_both_ranks_and_averages_all_ranks(tmp_path):
    generator = torch.Generator().manual_seed(2)
    # Different batch sizes per rank: the center is the mean over all rows of all ranks.
    outputs = [torch.randn(4, 6, generator=generator), torch.randn(2, 6, generator=generator) + 3.0]
    # fork: the children need no re-import of this module (no CUDA here, so forking is safe)
    mp.start_processes(
        _center_worker,
        args=(2, _free_port(), outputs, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    center_0 = torch.load(tmp_path / "center_0.pt", weights_only=True)
    center_1 = torch.load(tmp_path / "center_1.pt", weights_only=True)
    assert torch.equal(center_0, center_1)
    mean = torch.cat(outputs).double().mean(0, keepdim=True)
    expected = torch.zeros_like(mean)
    for _ in range(3):
        expected = 0.9 * expected + 0.1 * mean
    torch.testing.assert_close(center_0.double(), expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ schedules


def test_cosine_schedule_matches_hand_computed_values():
    # total 10, warm-up 2 from 0 to 1.0, cosine to 0.0 over steps 2..9 (8 steps).
    values = [cosine_schedule(step, 10, start=1.0, end=0.0, warmup_steps=2) for step in range(10)]
    assert values[0] == 0.0
    assert values[1] == pytest.approx(0.5)
    assert values[2] == pytest.approx(1.0)
    assert values[6] == pytest.approx(0.5)  # half-way through the cosine
    assert values[9] == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)))  # 0.0380602
    assert values[9] == pytest.approx(0.0380602, abs=1e-7)
    assert cosine_schedule(10_000, 10, 1.0, 0.0, 2) == values[9]  # clamped past the end


def test_schedules_at_a_step():
    schedules = DINOSchedules(
        total_steps=11,
        lr=0.004,
        min_lr=1e-6,
        lr_warmup_steps=1,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        teacher_temp_warmup_steps=4,
        freeze_last_layer_steps=2,
    )
    first = schedules.at(0)
    assert (first.lr, first.weight_decay, first.teacher_momentum, first.teacher_temp) == pytest.approx(
        (0.0, 0.04, 0.996, 0.04)
    )
    assert first.freeze_last_layer
    middle = schedules.at(6)  # cosine progress (6 - 1) / 10 = 0.5 for lr; 6 / 11 for wd and momentum
    assert middle.lr == pytest.approx(1e-6 + 0.5 * (0.004 - 1e-6))
    assert middle.weight_decay == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * 6 / 11)))
    assert middle.teacher_momentum == pytest.approx(1 - 0.002 * (1 + math.cos(math.pi * 6 / 11)))
    assert middle.teacher_temp == 0.07 and not middle.freeze_last_layer
    assert schedules.at(2).teacher_temp == pytest.approx(0.055)
    assert linear_warmup_then_constant(3, 0, 0.04, 0.07) == 0.07


# ------------------------------------------------------------------------------------------------ teacher


def _tiny_network(out_dim=16) -> MultiCropNetwork:
    from exaonepath_hf import ExaonePathConfig, ExaonePathModel

    backbone = ExaonePathModel(
        ExaonePathConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, drop_path_rate=0.1
        )
    )
    return MultiCropNetwork(backbone, DINOHead(32, out_dim, hidden_dim=24, bottleneck_dim=8))


def test_ema_update_is_exact():
    torch.manual_seed(0)
    student = _tiny_network()
    teacher = build_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema_update(teacher, student, 0.9)
    for name, param in teacher.named_parameters():
        expected = 0.9 * before[name].double() + 0.1 * dict(student.named_parameters())[name].double()
        torch.testing.assert_close(param.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
    ema_update(teacher, student, 1.0)  # momentum 1 keeps the teacher bit for bit
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student bit for bit
    assert all(torch.equal(p, dict(student.named_parameters())[n]) for n, p in teacher.named_parameters())


def test_ema_update_rejects_a_different_network():
    with pytest.raises(ValueError, match="parameters differ"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 3, bias=False), 0.5)


# ------------------------------------------------------------------------------------------------ head, model


def test_head_shapes_fixed_gain_and_fp32_logits():
    head = DINOHead(32, out_dim=50, hidden_dim=24, bottleneck_dim=8)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
    assert logits.shape == (5, 50) and logits.dtype == torch.float32
    # norm_last_layer: a cosine-similarity layer, so |logit| <= 1.
    assert logits.abs().max() <= 1 + 1e-5
    assert DINOHead(
        32, 50, 24, 8, norm_last_layer=False
    ).last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_network_runs_each_resolution_once():
    network = _tiny_network(out_dim=12).eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    calls = []
    network.backbone.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    out = network(crops)
    assert out.shape == (6, 12) and len(calls) == 2
    # Same result as running each crop alone (eval mode: no drop path).
    alone = torch.cat([network(crop) for crop in crops])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ optimizer


def test_parameter_groups_exclude_biases_and_1d_params_from_weight_decay():
    network = _tiny_network()
    regularized, not_regularized = parameter_groups(network)
    names = {id(p): n for n, p in network.named_parameters()}
    assert not_regularized["weight_decay"] == 0.0
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in regularized["params"])
    assert {names[id(p)] for p in not_regularized["params"]} >= {"backbone.norm.weight", "backbone.norm.bias"}
    frozen_gain = "head.last_layer.parametrizations.weight.original0"
    grouped = {names[id(p)] for g in (regularized, not_regularized) for p in g["params"]}
    assert frozen_gain not in grouped and len(grouped) == sum(p.requires_grad for p in network.parameters())


def test_per_parameter_clipping_rescales_each_gradient_on_its_own():
    big, small = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))
    big.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    small.grad = torch.tensor([0.3, 0.4, 0.0])  # norm 0.5
    clip_gradients_per_parameter([big, small], max_norm=1.0)
    torch.testing.assert_close(big.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), rtol=1e-5, atol=1e-6)
    assert torch.equal(small.grad, torch.tensor([0.3, 0.4, 0.0]))  # under the limit: untouched


def test_freeze_last_layer_drops_its_gradients_only():
    head = DINOHead(8, 10, 6, 4)
    head(torch.randn(3, 8)).sum().backward()
    freeze_last_layer_gradients(head)
    assert all(p.grad is None for p in head.last_layer.parameters())
    assert all(p.grad is not None for p in head.mlp.parameters())


# ------------------------------------------------------------------------------------------------ crops, config


def test_multicrop_shapes_normalization_and_determinism():
    config = AugmentationConfig(global_crop_size=32, local_crop_size=16, num_local_crops=3)
    transform = DINOMultiCrop(config)
    image = torch.randint(0, 256, (3, 70, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    crops = transform(image)
    assert transform.num_crops == 5
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(crops, transform(image), strict=True))
    with pytest.raises(ValueError, match="uint8 3xHxW"):
        transform(image.float())


def test_multicrop_without_photometric_ops_is_imagenet_normalized_crop():
    # A flat image stays flat through crops and resizing: each channel equals (value/255 - mean) / std.
    config = AugmentationConfig(
        global_crop_size=16, local_crop_size=16, num_local_crops=1, color_jitter_p=0, grayscale_p=0,
        blur_p=(0, 0, 0), solarize_p=0,
    )  # fmt: skip
    image = torch.stack([torch.full((40, 40), v, dtype=torch.uint8) for v in (200, 100, 50)])
    for crop in DINOMultiCrop(config)(image):
        expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
            [0.229, 0.224, 0.225]
        )
        torch.testing.assert_close(crop.mean(dim=(1, 2)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["paper", "one_gpu", "cpu_smoke"])
def test_shipped_configs_load(name):
    cfg = load_config(name)  # packaged: installed with exaonepath_hf.train
    assert cfg.augmentations.global_crop_size % cfg.model.patch_size == 0
    assert cfg.augmentations.local_crop_size % cfg.model.patch_size == 0
    if name == "paper":
        assert (cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.out_dim) == (768, 12, 65536)
        assert cfg.run.batch_size_per_device * 80 == 5120 and cfg.run.mixed_precision == "bf16"
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.run.epochs) == (0.005, 1000, 10)
        assert cfg.augmentations.num_local_crops == 8
        # 285,153,903 patches / 5,120 = 55,694 steps per epoch; lr is the paper's 0.005 at its batch.
        schedules = cfg.schedules(global_batch=5120, steps_per_epoch=55694, total_steps=556940)
        assert schedules.lr == pytest.approx(0.005) and schedules.lr_warmup_steps == 1000
        assert schedules.freeze_last_layer_steps == 55694 and schedules.teacher_temp_warmup_steps == 69618
        assert cfg.schedules(64, 55694, 556940).lr == pytest.approx(0.005 * 64 / 5120)


def test_config_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  max_steps: 5\n")
    cfg = load_config(path, ["run.max_steps=7", "optim.betas=[0.8, 0.9]", "data.stain_reference=null"])
    assert cfg.run.max_steps == 7 and cfg.optim.betas == (0.8, 0.9) and cfg.data.stain_reference is None
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(path, ["run.max_stpes=7"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(path, ["max_steps"])


def test_config_errors_name_the_key_what_it_takes_and_where_it_was_given(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("run:\n  max_stpes: 5\n")
    with pytest.raises(
        ValueError, match=rf"run.max_stpes \(did you mean run.max_steps\?\) in config {path};"
    ):
        load_config(path)
    with pytest.raises(
        ValueError, match=r"run.max_steps must be an integer or null, got 'abc' in the override"
    ):
        load_config("cpu_smoke", ["run.max_steps=abc"])
    with pytest.raises(ValueError, match=r"run.compile must be true or false, got 1"):
        load_config("cpu_smoke", ["run.compile=1"])
    with pytest.raises(
        ValueError, match=r"optim.betas must be a list of 2 \(a number, a number\), got \[0.9\]"
    ):
        load_config("cpu_smoke", ["optim.betas=[0.9]"])
    with pytest.raises(ValueError, match=r"config section model must be a mapping"):
        load_config("cpu_smoke", ["model=3"])
    path.write_text("run: [1\n")
    with pytest.raises(ValueError, match=rf"config {path} is not valid YAML: [^\n]*line 2") as error:
        load_config(path)
    assert "\n" not in str(error.value)  # the command prints it as its one line
    # PyYAML reads 1e-4 as a string; a number field takes it as the number it spells.
    assert load_config("cpu_smoke", ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_config("cpu_smoke", ["optim.min_lr=0"]).optim.min_lr == 0  # an integer is a number


# ------------------------------------------------------------------------------------------------ on a GPU


def test_optimizer_is_fused_only_when_every_parameter_is_on_cuda():
    from exaonepath_hf.train.dino.optim import build_optimizer

    network = _tiny_network()
    optimizer = build_optimizer(network, (0.9, 0.999))
    assert not optimizer.defaults["fused"]  # torch's default implementation off CUDA
    assert [len(g["params"]) for g in optimizer.param_groups] == [
        len(g["params"]) for g in parameter_groups(network)
    ]
    if torch.cuda.is_available():
        assert build_optimizer(network.cuda(), (0.9, 0.999)).defaults["fused"]


def test_augment_on_accepts_cpu_or_gpu():
    assert load_config("cpu_smoke").data.augment_on == "cpu" and not load_config("cpu_smoke").run.compile
    assert load_config("cpu_smoke", ["data.augment_on=gpu"]).data.augment_on == "gpu"
    with pytest.raises(ValueError, match="augment_on"):
        load_config("cpu_smoke", ["data.augment_on=tpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: host syncs exist only with a device")
def test_loss_and_center_update_never_wait_for_the_device():
    loss_fn = DINOLoss(16, 4).cuda()
    student, teacher = torch.randn(8, 16, device="cuda"), torch.randn(4, 16, device="cuda")
    loss_fn(student, teacher, 0.04)  # first call: library set-up may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn(student, teacher, 0.04)
    finally:
        torch.cuda.set_sync_debug_mode("default")
