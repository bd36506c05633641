"""The domain shifts: each changes images the way its name says, masks move with geometric ones,
and the same seeds give the same images."""

from __future__ import annotations

import pytest
import torch

from padim_core.shifts import SHIFTS, apply_shift, image_seed, kelvin_to_rgb


def textured_images(count: int = 3, side: int = 48) -> torch.Tensor:
    """Smooth gradients plus a checkerboard: something for every shift to change."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    checker = ((x // 6 + y // 6) % 2) * 60
    base = torch.stack([40 + 2 * x + checker, 60 + 2 * y + checker, 100 + x + y]).clamp(0, 255)
    return torch.stack([(base + 5 * i).clamp(0, 255) for i in range(count)]).to(torch.uint8)


def square_masks(count: int = 3, side: int = 48) -> torch.Tensor:
    masks = torch.zeros(count, side, side, dtype=torch.bool)
    masks[:, 10:20, 14:24] = True
    return masks


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_shift_changes_the_images_and_keeps_their_form(name: str) -> None:
    images, masks = textured_images(), square_masks()
    level = SHIFTS[name].default_levels[-1]
    shifted, moved = apply_shift(name, level, images, masks, [1, 2, 3])
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    assert not torch.equal(shifted, images)
    if SHIFTS[name].motion is None:
        assert moved is masks
    else:
        assert moved.dtype == torch.bool and moved.shape == masks.shape and not torch.equal(moved, masks)


@pytest.mark.parametrize("name", ["noise", "rotation", "translation"])
def test_random_shifts_repeat_with_the_same_seeds_and_differ_with_others(name: str) -> None:
    images, masks = textured_images(), square_masks()
    first = apply_shift(name, SHIFTS[name].default_levels[-1], images, masks, [7, 8, 9])
    again = apply_shift(name, SHIFTS[name].default_levels[-1], images, masks, [7, 8, 9])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = apply_shift(name, SHIFTS[name].default_levels[-1], images, masks, [10, 11, 12])
    assert not torch.equal(first[0], other[0])


def test_an_image_gets_the_same_shift_in_any_batch() -> None:
    images = textured_images(4)
    seeds = [image_seed(0, "noise", 2, index) for index in range(4)]
    whole, _ = apply_shift("noise", 0.1, images, None, seeds)
    halves = [apply_shift("noise", 0.1, images[i : i + 2], None, seeds[i : i + 2])[0] for i in (0, 2)]
    assert torch.equal(whole, torch.cat(halves))
    assert len(set(seeds)) == 4 and image_seed(0, "noise", 2, 0) != image_seed(1, "noise", 2, 0)


def test_translation_moves_the_mask_exactly_with_the_defect() -> None:
    images = torch.zeros(1, 3, 48, 48, dtype=torch.uint8)
    images[:, :, 10:20, 14:24] = 255  # the "defect" is the bright square, which the mask covers
    shifted, moved = apply_shift("translation", 0.1, images, square_masks(1), [5])
    assert moved.sum() == 100  # 10x10 square, whole pixels: nothing lost, nothing added
    assert torch.equal(shifted[0, 0] > 127, moved[0])


def test_rotation_moves_the_mask_with_the_defect() -> None:
    images = torch.zeros(1, 3, 48, 48, dtype=torch.uint8)
    images[:, :, 10:20, 14:24] = 255
    shifted, moved = apply_shift("rotation", 10.0, images, square_masks(1), [5])
    bright = shifted[0, 0] > 127
    overlap = (bright & moved[0]).sum() / (bright | moved[0]).sum()
    assert overlap > 0.8 and not torch.equal(moved[0], square_masks(1)[0])


def test_photometric_shifts_move_the_image_the_expected_way() -> None:
    images = textured_images().float()

    def shifted(name: str, level: float) -> torch.Tensor:
        return apply_shift(name, level, textured_images(), None, [0, 1, 2])[0].float()

    assert shifted("brightness", 0.5).mean() < 0.6 * images.mean()
    assert shifted("contrast", 0.3).std() < 0.5 * images.std()
    assert torch.equal(shifted("brightness", 1.0), images)

    def roughness(batch: torch.Tensor) -> float:
        return float((batch[..., 1:] - batch[..., :-1]).abs().mean())

    assert roughness(shifted("blur", 4.0)) < 0.5 * roughness(images)
    assert roughness(shifted("noise", 0.2)) > 2 * roughness(images)
    assert (shifted("jpeg", 5) - images).abs().mean() > (shifted("jpeg", 95) - images).abs().mean()
    warm = shifted("colour_temperature", 2500)
    assert warm[:, 2].mean() < 0.5 * images[:, 2].mean() and warm[:, 0].mean() > 0.95 * images[:, 0].mean()


def test_black_body_colours_are_neutral_at_daylight_and_warm_below() -> None:
    red, green, blue = kelvin_to_rgb(6500)
    assert min(red, green, blue) > 245
    red, green, blue = kelvin_to_rgb(2500)
    assert red == 255 and blue < green < red


def test_bad_calls_name_what_was_expected() -> None:
    images = textured_images(1)
    with pytest.raises(ValueError, match=r"unknown shift 'fog'; known shifts: \['brightness'"):
        apply_shift("fog", 1.0, images, None, [0])
    with pytest.raises(ValueError, match=r"jpeg level 0 is out of range; allowed: an integer from 1 to 100"):
        apply_shift("jpeg", 0, images, None, [0])
    with pytest.raises(ValueError, match=r"uint8 \[B, 3, H, W\]"):
        apply_shift("blur", 1.0, images.float(), None, [0])
    with pytest.raises(ValueError, match="1 images but 2 seeds"):
        apply_shift("blur", 1.0, images, None, [0, 1])


@pytest.mark.parametrize(("name", "level"), [("rotation", 10.0), ("translation", 0.2)])
def test_geometric_shifts_bring_no_black_corners_into_view(name: str, level: float) -> None:
    grey = torch.full((1, 3, 40, 40), 128, dtype=torch.uint8)
    shifted, _ = apply_shift(name, level, grey, None, [3])
    assert torch.equal(shifted, grey)  # the mirrored scene, not a black fill
