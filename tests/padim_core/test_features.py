"""Patch embedding: per-layer channel selection equals anomalib's concatenate-then-select."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from padim_core.backbones import FeatureExtractor
from padim_core.features import PatchEmbedder, random_channel_index


def test_channel_index_is_sorted_seeded_and_within_range():
    first = random_channel_index(448, 100, seed=3)
    assert torch.equal(first, random_channel_index(448, 100, seed=3))
    assert not torch.equal(first, random_channel_index(448, 100, seed=4))
    assert torch.equal(first, first.sort().values) and len(set(first.tolist())) == 100
    assert 0 <= int(first.min()) and int(first.max()) < 448


@pytest.mark.parametrize("n_features", [0, 449])
def test_channel_count_outside_the_embedding_is_rejected(n_features):
    with pytest.raises(ValueError, match="between 1 and the embedding size 448"):
        random_channel_index(448, n_features, seed=0)


def test_selection_before_upsampling_equals_concatenate_then_select():
    index = random_channel_index(448, 50, seed=0)
    embedder = PatchEmbedder(FeatureExtractor("resnet18", ["layer1", "layer2", "layer3"], pretrained=False), index)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = embedder.extractor(images)
        grid = features[0].shape[-2:]
        full = torch.cat([features[0]] + [F.interpolate(f, size=grid, mode="nearest") for f in features[1:]], 1)
        expected = full.index_select(1, index).permute(2, 3, 0, 1)  # [h, w, B, C]
        assert torch.equal(embedder(images), expected)


@pytest.mark.parametrize(("source", "target"), [(16, 64), (7, 25), (13, 25), (25, 25)])
def test_nearest_index_matches_interpolate(source, target):
    from padim_core.features import nearest_index

    rows = torch.arange(source, dtype=torch.float32).view(1, 1, source, 1)
    expected = F.interpolate(rows, size=(target, 1), mode="nearest").flatten().long()
    assert torch.equal(nearest_index(source, target), expected)


def test_unsorted_or_out_of_range_index_is_rejected():
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], pretrained=False)
    with pytest.raises(ValueError, match="sorted"):
        PatchEmbedder(extractor, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 192\)"):
        PatchEmbedder(extractor, torch.tensor([1, 192]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 192\)"):
        PatchEmbedder(extractor, torch.tensor([], dtype=torch.long))


def test_a_layer_without_chosen_channels_is_left_out():
    """Channels only from layer2 (indices 64 and up): the embedding is layer2's, on layer1's grid."""
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], pretrained=False)
    embedder = PatchEmbedder(extractor, torch.tensor([64, 70, 191]))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        layer2 = extractor(images)[1]
        expected = F.interpolate(layer2, size=(16, 16), mode="nearest").index_select(1, torch.tensor([0, 6, 127]))
        assert torch.equal(embedder(images), expected.permute(2, 3, 0, 1))


def test_semi_orthogonal_matrix_has_orthonormal_columns_and_is_seeded():
    from padim_core.features import semi_orthogonal_matrix

    matrix = semi_orthogonal_matrix(176, 100, seed=0)
    assert matrix.shape == (176, 100) and matrix.dtype == torch.float32
    torch.testing.assert_close(matrix.T @ matrix, torch.eye(100), rtol=0, atol=1e-5)
    assert torch.equal(matrix, semi_orthogonal_matrix(176, 100, seed=0))
    assert not torch.equal(matrix, semi_orthogonal_matrix(176, 100, seed=1))
    with pytest.raises(ValueError, match="between 1 and the embedding size 176"):
        semi_orthogonal_matrix(176, 177, seed=0)


def test_projected_embedding_is_the_full_embedding_times_the_matrix():
    from padim_core.features import semi_orthogonal_matrix

    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], pretrained=False)
    every = torch.arange(192)
    matrix = semi_orthogonal_matrix(192, 30, seed=2)
    projected, full = PatchEmbedder(extractor, every, matrix), PatchEmbedder(extractor, every)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(projected(images), full(images) @ matrix, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"projection must be \[192, n_features\]"):
        PatchEmbedder(extractor, every, matrix[:100])
