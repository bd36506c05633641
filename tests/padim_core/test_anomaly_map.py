"""From patch embeddings to maps and scores: the Mahalanobis distance and the shared map resizer."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2.functional import gaussian_blur

from padim_core.anomaly_map import (
    MahalanobisScorer,
    MapResizer,
    blur_kernel_size,
    mahalanobis_distance,
    resize_and_blur_matrix,
    whitening,
)


def test_mahalanobis_distance_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(3, 5, 2, 4, generator=generator)  # [h, w, B, C]
    mean = torch.randn(15, 4, generator=generator)
    root = torch.randn(15, 4, 4, generator=generator)
    inverse = root @ root.transpose(1, 2) + torch.eye(4)
    distances = mahalanobis_distance(embedding, *whitening(mean, inverse))
    for b in range(2):
        for location in range(15):
            delta = embedding[location // 5, location % 5, b] - mean[location]
            expected = torch.sqrt(delta @ inverse[location] @ delta)
            torch.testing.assert_close(distances[b, location // 5, location % 5], expected, rtol=1e-5, atol=1e-5)


def test_an_inverse_covariance_that_is_not_positive_definite_is_refused():
    with pytest.raises(ValueError, match="not positive definite"):
        whitening(torch.zeros(1, 2), -torch.eye(2).unsqueeze(0))


@pytest.mark.parametrize("sigma", [0.0, 4.0])
def test_matrix_upsample_and_blur_equal_interpolate_then_torchvision_blur(sigma):
    distances = torch.rand(2, 1, 16, 12, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(distances, size=(64, 48), mode="bilinear", align_corners=False)
    if sigma:
        expected = gaussian_blur(expected, kernel_size=[blur_kernel_size(sigma)] * 2, sigma=[sigma] * 2)
    rows, columns = resize_and_blur_matrix(16, 64, sigma), resize_and_blur_matrix(12, 48, sigma)
    torch.testing.assert_close(rows @ distances[:, 0] @ columns.t(), expected[:, 0], rtol=1e-5, atol=1e-6)


def test_map_resizer_gives_maps_at_the_input_size_and_their_maxima_as_scores():
    distances = torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(1))
    scores, maps = MapResizer((16, 12), (64, 48), 4.0)(distances)
    assert maps.shape == (3, 64, 48) and scores.shape == (3,)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    with pytest.raises(ValueError, match="blur sigma 4.0 needs maps wider than 16 pixels, got 8"):
        MapResizer((4, 4), (8, 8), 4.0)


def test_mahalanobis_scorer_is_the_distance_then_the_resizer():
    generator = torch.Generator().manual_seed(2)
    mean = torch.randn(12, 3, generator=generator)
    inverse = torch.eye(3).repeat(12, 1, 1) * 2
    embedding = torch.randn(3, 4, 2, 3, generator=generator)
    scores, maps = MahalanobisScorer(mean, inverse, (3, 4), (24, 32), 1.0)(embedding)
    expected = MapResizer((3, 4), (24, 32), 1.0)(mahalanobis_distance(embedding, *whitening(mean, inverse)))
    torch.testing.assert_close(scores, expected[0])
    torch.testing.assert_close(maps, expected[1])
