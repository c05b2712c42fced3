"""MIL heads: the masked mean and the gated attention against hand-computed values, padding that changes
nothing, the collate, and a planted-signal bag task the attention head must learn and localise."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exaonepath_hf.eval.slide.mil import BagCollator, GatedAttentionHead, MeanPoolingHead, build_head

PADDING_GARBAGE = 1e3  # padded rows hold garbage: a head that reads them gives visibly wrong numbers


def padded(bags: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(b) for b in bags)
    features = np.full((len(bags), longest, bags[0].shape[1]), PADDING_GARBAGE, dtype=np.float32)
    mask = np.zeros((len(bags), longest), dtype=bool)
    for i, bag in enumerate(bags):
        features[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return torch.from_numpy(features), torch.from_numpy(mask)


def test_mean_pooling_is_the_hand_computed_masked_mean():
    bags = [
        np.array([[1.0, 2.0, 3.0], [3.0, 6.0, -3.0]], dtype=np.float32),
        np.array([[0.5, 0.0, 1.0], [1.5, 1.0, 1.0], [4.0, -1.0, 1.0]], dtype=np.float32),
        np.array([[-2.0, 7.0, 0.25]], dtype=np.float32),
    ]
    features, mask = padded(bags)
    head = MeanPoolingHead(3, 2).eval()
    out = head(features, mask)
    expected = np.array([[2.0, 4.0, 0.0], [2.0, 0.0, 1.0], [-2.0, 7.0, 0.25]], dtype=np.float32)
    np.testing.assert_allclose(out.embedding.detach().numpy(), expected, rtol=1e-6)
    weight, bias = head.classifier.weight.detach().numpy(), head.classifier.bias.detach().numpy()
    np.testing.assert_allclose(out.logits.detach().numpy(), expected @ weight.T + bias, rtol=1e-5, atol=1e-6)
    assert out.attention is None


def test_gated_attention_matches_the_formula_and_ignores_padding():
    generator = np.random.default_rng(0)
    bags = [generator.normal(size=(n, 5)).astype(np.float32) for n in (4, 7, 1)]
    features, mask = padded(bags)
    torch.manual_seed(0)
    head = GatedAttentionHead(5, 3, hidden_dim=6).eval()
    out = head(features, mask)

    v_w, v_b = head.attention_v.weight.detach().numpy(), head.attention_v.bias.detach().numpy()
    u_w, u_b = head.attention_u.weight.detach().numpy(), head.attention_u.bias.detach().numpy()
    w_w, w_b = head.attention_w.weight.detach().numpy(), head.attention_w.bias.detach().numpy()
    c_w, c_b = head.classifier.weight.detach().numpy(), head.classifier.bias.detach().numpy()
    attention = out.attention.detach().numpy()
    for i, h in enumerate(bags):
        gated = np.tanh(h @ v_w.T + v_b) * (1 / (1 + np.exp(-(h @ u_w.T + u_b))))
        scores = (gated @ w_w.T + w_b)[:, 0]
        a = np.exp(scores - scores.max())
        a /= a.sum()
        np.testing.assert_allclose(attention[i, : len(h)], a, rtol=1e-5, atol=1e-7)
        assert np.all(attention[i, len(h) :] == 0.0)  # exactly zero on padding
        z = a @ h
        np.testing.assert_allclose(out.embedding[i].detach().numpy(), z, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.logits[i].detach().numpy(), z @ c_w.T + c_b, rtol=1e-5, atol=1e-5)

    # a bag alone (no padding) gets the same output as inside the padded batch
    alone = head(torch.from_numpy(bags[0])[None], torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(alone.logits[0], out.logits[0])


def test_heads_reject_malformed_batches():
    head = build_head("abmil", 4, 2)
    with pytest.raises(ValueError, match="no patches"):
        head(torch.zeros(2, 3, 4), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="boolean mask"):
        head(torch.zeros(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown head"):
        build_head("transmil", 4, 2)


def test_collate_pads_and_samples_a_fixed_number_of_patches():
    items = [
        {"features": torch.arange(12.0).reshape(6, 2).half(), "label": 1, "index": 7},
        {"features": torch.ones(2, 2), "label": 0, "index": 3},
    ]
    batch = BagCollator()(items)
    assert batch["features"].dtype == torch.float32 and batch["features"].shape == (2, 6, 2)
    assert batch["mask"].sum(dim=1).tolist() == [6, 2]
    assert batch["labels"].tolist() == [1, 0] and batch["indices"].tolist() == [7, 3]
    assert batch["patch_indices"][1].tolist() == [0, 1, -1, -1, -1, -1]
    assert torch.equal(batch["features"][1, 2:], torch.zeros(4, 2))

    sampled = BagCollator(max_patches=3, generator=torch.Generator().manual_seed(0))(items)
    assert sampled["features"].shape == (2, 3, 2) and sampled["mask"].sum(dim=1).tolist() == [3, 2]
    kept = sampled["patch_indices"][0]
    assert kept.tolist() == sorted(set(kept.tolist())) and all(0 <= k < 6 for k in kept.tolist())
    # the kept rows are the bag's rows at those indices
    torch.testing.assert_close(sampled["features"][0], items[0]["features"][kept].float())

    with pytest.raises(ValueError, match="different feature shapes"):
        BagCollator()([items[0], {"features": torch.ones(2, 3), "label": 0, "index": 0}])


def planted_bags(count: int, dim: int, generator: np.random.Generator):
    """Bags of 20-40 noise patches; a positive bag has 3 patches shifted along one direction (the signal)."""
    signal = np.zeros(dim, dtype=np.float32)
    signal[0] = 4.0
    bags, labels, planted = [], [], []
    for i in range(count):
        n = int(generator.integers(20, 41))
        bag = generator.normal(size=(n, dim)).astype(np.float32)
        label = i % 2
        where = generator.choice(n, size=3, replace=False) if label else np.array([], dtype=int)
        bag[where] += signal
        bags.append(bag)
        labels.append(label)
        planted.append(set(where.tolist()))
    return bags, labels, planted


@pytest.fixture
def one_thread():
    """Tiny steps run faster on one thread than on threads that wait for each other on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_attention_head_learns_and_localises_a_planted_signal(one_thread):
    generator = np.random.default_rng(0)
    dim = 8
    train_bags, train_labels, _ = planted_bags(160, dim, generator)
    test_bags, test_labels, test_planted = planted_bags(60, dim, generator)
    torch.manual_seed(0)
    head = GatedAttentionHead(dim, 2, hidden_dim=16)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    collate = BagCollator()
    items = [
        {"features": b, "label": y, "index": i}
        for i, (b, y) in enumerate(zip(train_bags, train_labels, strict=True))
    ]
    order = torch.Generator().manual_seed(0)
    for _ in range(15):
        for start in range(0, len(items), 16):
            batch = collate(
                [items[i] for i in torch.randperm(len(items), generator=order)[start : start + 16].tolist()]
            )
            loss = F.cross_entropy(head(batch["features"], batch["mask"]).logits, batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    head.eval()
    batch = collate(
        [
            {"features": b, "label": y, "index": i}
            for i, (b, y) in enumerate(zip(test_bags, test_labels, strict=True))
        ]
    )
    with torch.no_grad():
        out = head(batch["features"], batch["mask"])
    accuracy = (out.logits.argmax(dim=1) == batch["labels"]).float().mean().item()
    assert accuracy >= 0.9  # chance is 0.5
    top = out.attention.argmax(dim=1).tolist()
    positives = [i for i, y in enumerate(test_labels) if y == 1]
    on_planted = np.mean([top[i] in test_planted[i] for i in positives])
    assert on_planted >= 0.9
    # the three planted patches hold most of a positive bag's attention (uniform would give 3/20..3/40)
    mass = np.mean([out.attention[i, sorted(test_planted[i])].sum().item() for i in positives])
    assert mass > 0.5
