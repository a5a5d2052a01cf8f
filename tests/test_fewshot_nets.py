"""Data-free family networks: backbones' shapes, the meta-model's two training outputs and its eval scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metadiff.nets.backbones import build_backbone
from metadiff.nets.heads import MLPHead
from metadiff.nets.meta_model import MetaModel, class_means, spatial_episodic_loss


def test_backbones_give_the_spec_feature_maps() -> None:
    x = torch.rand(2, 3, 64, 64)
    conv4 = build_backbone("conv4", in_channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    assert conv4(x).shape == (2, 64, 4, 4)
    resnet = build_backbone("resnet12", in_channels=3, mean=[0.5] * 3, std=[0.25] * 3).eval()
    assert resnet(x).shape == (2, 512, 4, 4)
    emb = conv4.embed(x)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_time_conditioned_head_depends_on_t_and_batch_stats_head_mixes_samples() -> None:
    torch.manual_seed(0)
    head = MLPHead(8, 4, norm="layernorm", time_conditioned=True)
    f = torch.randn(3, 8)
    assert not torch.allclose(head(f, torch.tensor([0, 0, 0])), head(f, torch.tensor([500, 500, 500])))
    mixing = MLPHead(8, 4, norm="batch_stats").eval()  # the original's: batch statistics even in eval mode
    alone = mixing(f)[0]
    assert not torch.allclose(alone, mixing(torch.cat([f, 5 * torch.randn(3, 8)]))[0])
    independent = MLPHead(8, 4, norm="layernorm").eval()
    assert torch.allclose(independent(f)[0], independent(torch.cat([f, 5 * torch.randn(3, 8)]))[0], atol=1e-6)


def test_class_means_average_each_ways_support() -> None:
    values = torch.arange(12.0).view(1, 4, 3)
    labels = torch.tensor([[1, 0, 1, 0]])
    means = class_means(values, labels, 2)
    assert torch.equal(means[0, 0], (values[0, 1] + values[0, 3]) / 2)
    assert torch.equal(means[0, 1], (values[0, 0] + values[0, 2]) / 2)


def test_meta_model_outputs_and_the_spatial_loss() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("conv4", in_channels=1, mean=[0.2], std=[0.3])
    model = MetaModel(backbone, n_classes=10, head_norm="batchnorm", scale_cls=7.0)
    support, query = torch.rand(2, 5, 1, 32, 32), torch.rand(2, 6, 1, 32, 32)
    labels = torch.arange(5).expand(2, -1)
    global_logits, spatial = model.train_forward(support, labels, query, n_way=5)
    assert global_logits.shape == (12, 10) and spatial.shape == (12, 5, 2, 2)
    assert spatial.abs().max() <= 7.0 + 1e-4
    scores = model.eval().episode_scores(support, labels, query, n_way=5)
    assert scores.shape == (2, 6, 5)
    # a query identical to a support image scores highest on that image's way
    same = model.episode_scores(support, labels, support, n_way=5)
    assert (same.argmax(-1) == labels).all()
    q_labels = torch.randint(0, 5, (12,))
    loss = spatial_episodic_loss(spatial, q_labels)
    manual = torch.stack([F.cross_entropy(spatial[:, :, i, j], q_labels) for i in range(2) for j in range(2)]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
