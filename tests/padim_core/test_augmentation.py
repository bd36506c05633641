"""Fit-time photometric augmentation: what the fit sees, seeded per image, and the values it refuses."""

from __future__ import annotations

import pytest
import torch

from padim_core.augmentation import PhotometricAugmentation

from support.models import pixels


def test_no_copies_pass_the_batches_through_untouched():
    batches = [pixels(3), pixels(2, seed=1)]
    assert list(PhotometricAugmentation(copies=0).expand(batches)) == batches
    # Normalised float batches are fine when nothing is augmented.
    floats = [torch.randn(2, 3, 8, 8)]
    assert list(PhotometricAugmentation().expand(floats)) == floats


def smooth(count: int, size: int = 32) -> torch.Tensor:
    """uint8 photos-like images: smooth gradients (JPEG keeps them; it would wreck uniform noise)."""
    ramp = torch.linspace(40, 200, size)
    image = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), ramp.flip(0)[None, :].expand(size, size)])
    return torch.stack([image + 5 * i for i in range(count)]).round().to(torch.uint8)


def test_each_batch_is_followed_by_its_copies_small_changes_of_the_same_images():
    batch = smooth(4)
    out = list(PhotometricAugmentation(copies=3).expand([batch]))
    assert len(out) == 4 and out[0] is batch
    for copy in out[1:]:
        assert copy.shape == batch.shape and copy.dtype == torch.uint8
        difference = (copy.float() - batch.float()).abs().mean(dim=(1, 2, 3))
        assert (difference > 0).all()  # every image changed...
        assert (difference < 25).all()  # ...by small changes, not into another picture
    assert not torch.equal(out[1], out[2])  # the copies differ from each other


def test_strengths_stay_within_their_ranges():
    """A flat grey image: brightness alone scales it within [1 - x, 1 + x]."""
    grey = torch.full((8, 3, 16, 16), 100, dtype=torch.uint8)
    only_brightness = PhotometricAugmentation(copies=1, brightness=0.1, contrast=0, colour_temperature=(6500, 6500),
                                              noise=0, jpeg_quality=100)
    _, copy = only_brightness.expand([grey])
    values = copy.float().mean(dim=(1, 2, 3))
    assert values.min() >= 90 - 0.5 and values.max() <= 110 + 0.5 and values.std() > 1


def test_draws_are_seeded_per_image_whatever_the_batch_size():
    images = pixels(6, size=32)
    augmentation = PhotometricAugmentation(copies=2, seed=5)
    whole = list(augmentation.expand([images]))
    split = list(augmentation.expand([images[:4], images[4:]]))
    for copy in (1, 2):
        torch.testing.assert_close(torch.cat([split[copy], split[3 + copy]]), whole[copy], rtol=0, atol=0)
    other = list(PhotometricAugmentation(copies=2, seed=6).expand([images]))
    assert not torch.equal(other[1], whole[1])


def test_float_batches_are_refused_when_augmenting():
    with pytest.raises(ValueError, match="augmentation works on uint8 pixels"):
        list(PhotometricAugmentation(copies=1).expand([torch.randn(2, 3, 8, 8)]))


@pytest.mark.parametrize(("values", "message"), [
    ({"copies": -1}, "copies must be an integer from 0 to 64"),
    ({"copies": 1.5}, "copies must be an integer"),
    ({"brightness": 1.0}, r"brightness must be in \[0, 1\)"),
    ({"colour_temperature": (8000, 5000)}, "colour_temperature must be"),
    ({"noise": -0.1}, r"noise must be in \[0, 1\]"),
    ({"jpeg_quality": 0}, "jpeg_quality must be an integer from 1 to 100"),
])
def test_bad_values_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        PhotometricAugmentation(**values)


def test_the_mapping_round_trips():
    augmentation = PhotometricAugmentation(copies=3, colour_temperature=(5000, 7000), jpeg_quality=80, seed=2)
    assert PhotometricAugmentation.from_dict(augmentation.to_dict()) == augmentation
    assert PhotometricAugmentation.from_dict(None) == PhotometricAugmentation()
