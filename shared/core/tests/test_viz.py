"""Tests for medsynth_core.viz: uint8 mapping, grid layout/pixels, atomic writes, volume views, overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medsynth_core import viz


def _load(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_to_uint8_minmax_range_and_edge_cases():
    img = np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(viz.to_uint8(img), [[0, 64], [128, 255]])
    np.testing.assert_array_equal(viz.to_uint8(img, (0.0, 1.0)), [[0, 128], [255, 255]])  # clipped
    np.testing.assert_array_equal(viz.to_uint8(torch.tensor([[-1.0, 1.0]]), (-1, 1)), [[0, 255]])
    assert viz.to_uint8(np.full((3, 3), 7.0)).max() == 0  # constant -> 0
    out = viz.to_uint8(np.array([np.nan, 0.0, 1.0]))
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 255]
    assert viz.to_uint8(torch.ones(2, 2, dtype=torch.float16) * 3).shape == (2, 2)


def test_save_grid_layout_and_pixels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.random((16, 16)).astype(np.float32) for _ in range(3)]
    path = viz.save_grid(
        tmp_path / "sub" / "dir" / "grid.png", imgs, titles=["a", "b", "c"], ncols=2, scale=2
    )
    assert path.exists() and path.parent.name == "dir"
    arr = _load(path)
    band, gap = viz.title_band_height(), viz.GAP
    assert band > 0
    # 2 columns x 2 rows of 32x32 cells, a title band above each row, GAP pixels between cells
    assert arr.shape == (2 * (band + 32) + gap, 2 * 32 + gap, 3)
    assert viz.grid_size((32, 32), 2, 2, True) == (arr.shape[1], arr.shape[0])
    expected = np.repeat(np.repeat(viz.to_uint8(imgs[1]), 2, 0), 2, 1)  # row 0, column 1
    cell = arr[band : band + 32, 32 + gap : 64 + gap]
    for ch in range(3):
        np.testing.assert_array_equal(cell[..., ch], expected)
    expected2 = np.repeat(np.repeat(viz.to_uint8(imgs[2]), 2, 0), 2, 1)  # row 1, column 0
    y0 = band + 32 + gap + band
    np.testing.assert_array_equal(arr[y0 : y0 + 32, 0:32, 0], expected2)
    # the missing fourth cell is background, the title band holds some text pixels
    assert (arr[y0 : y0 + 32, 32 + gap :] == viz.BACKGROUND).all()
    assert (arr[:band, :32] != viz.BACKGROUND).any()


def test_save_grid_padding_value_range_inputs(tmp_path):
    small = np.linspace(0, 1, 8 * 8, dtype=np.float32).reshape(8, 8)
    big = torch.zeros(1, 12, 16)  # (1, H, W) tensor
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 1] = 200  # uint8 RGB is shown unchanged
    path = viz.save_grid(tmp_path / "g.png", [small, big, rgb], value_range=(0.0, 2.0), scale=3, ncols=3)
    arr = _load(path)
    cell_h, cell_w = 12 * 3, 16 * 3
    assert arr.shape == (cell_h, 3 * cell_w + 2 * viz.GAP, 3)  # no titles -> no band
    oy, ox = (cell_h - 24) // 2, (cell_w - 24) // 2  # small image centred in its cell
    got = arr[oy : oy + 24, ox : ox + 24, 0]
    np.testing.assert_array_equal(got, np.repeat(np.repeat(viz.to_uint8(small, (0, 2)), 3, 0), 3, 1))
    assert (arr[:oy, :cell_w] == 0).all()  # padding is black
    x0 = 2 * (cell_w + viz.GAP) + (cell_w - 12) // 2
    y0 = (cell_h - 12) // 2
    assert (arr[y0 : y0 + 12, x0 : x0 + 12] == [0, 200, 0]).all()
    # "shared" scaling maps the global max to 255 only in the image holding it
    p2 = viz.save_grid(tmp_path / "s.png", [np.full((4, 4), 1.0), np.full((4, 4), 3.0)], value_range="shared")
    a2 = _load(p2)
    assert a2[2, 2, 0] == 0 and a2[2, 8 + viz.GAP + 2, 0] == 255
    with pytest.raises(ValueError):
        viz.save_grid(tmp_path / "bad.png", [np.zeros((2, 3, 4, 5))])


def test_save_grid_rows_and_row_titles(tmp_path):
    rows = [[np.zeros((10, 10)), np.ones((10, 10))], [np.eye(10)]]
    plain = _load(viz.save_grid(tmp_path / "r0.png", rows, scale=1))
    assert plain.shape == (2 * 10 + viz.GAP, 2 * 10 + viz.GAP, 3)
    titled = _load(
        viz.save_grid(tmp_path / "r1.png", rows, titles=[["x", None], [None]], row_titles=["A", "B"], scale=1)
    )
    band = viz.title_band_height()
    assert titled.shape[0] == 2 * 10 + viz.GAP + band  # only the first row has titles
    left = titled.shape[1] - (2 * 10 + viz.GAP)
    assert left > 0
    np.testing.assert_array_equal(
        titled[band + 10 + viz.GAP :, left : left + 10, 0], viz.to_uint8(np.eye(10))
    )


def test_save_grid_atomic_no_temp_files(tmp_path, monkeypatch):
    path = viz.save_grid(tmp_path / "a.png", [np.zeros((4, 4))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        viz.save_grid(path, [np.ones((4, 4))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # temp removed, original intact
    assert path.read_bytes() == before


def test_orthogonal_views_pick_right_slices():
    vol = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    ax, co, sa = viz.orthogonal_views(vol)
    np.testing.assert_array_equal(ax, vol[3])
    np.testing.assert_array_equal(co, vol[:, 3])
    np.testing.assert_array_equal(sa, vol[:, :, 4])
    ax, co, sa = viz.orthogonal_views(torch.from_numpy(vol)[None], index=(1, 2, -1))
    assert isinstance(ax, np.ndarray)
    np.testing.assert_array_equal(ax, vol[1])
    np.testing.assert_array_equal(co, vol[:, 2])
    np.testing.assert_array_equal(sa, vol[:, :, -1])
    with pytest.raises(ValueError):
        viz.orthogonal_views(np.zeros((2, 3, 4, 5)))


def test_save_volume_views(tmp_path):
    vols = [np.random.default_rng(i).random((6, 8, 10)) for i in range(2)]
    arr = _load(viz.save_volume_views(tmp_path / "v.png", vols, titles=["first", "second"], scale=2))
    band, gap = viz.title_band_height(), viz.GAP
    cell_h, cell_w = 2 * 8, 2 * 10  # largest view is (H, W) = (8, 10); (D, H) and (D, W) are padded
    assert arr.shape[0] == 2 * cell_h + gap + band
    left = arr.shape[1] - (3 * cell_w + 2 * gap)
    assert left > 0
    v = vols[1]
    lo, hi = float(v.min()), float(v.max())
    y0 = band + cell_h + gap  # second row, axial view, fills its cell exactly
    np.testing.assert_array_equal(
        arr[y0 : y0 + cell_h, left : left + cell_w, 0],
        np.repeat(np.repeat(viz.to_uint8(v[3], (lo, hi)), 2, 0), 2, 1),
    )


def test_label_overlay_colours():
    img = np.array([[0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    lab = np.array([[0, 1], [2, 13]])
    out = viz.label_overlay(img, lab, alpha=0.5)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 0]  # label 0 stays grey
    for (r, c), k in (((0, 1), 1), ((1, 0), 2), ((1, 1), 13)):
        colour = np.array(viz.LABEL_COLOURS[(k - 1) % len(viz.LABEL_COLOURS)], dtype=float)
        np.testing.assert_array_equal(out[r, c], np.rint(0.5 * 255 + 0.5 * colour).astype(np.uint8))
    full = viz.label_overlay(torch.from_numpy(img), torch.from_numpy(lab), alpha=1.0)
    assert full[0, 1].tolist() == list(viz.LABEL_COLOURS[0]) and full[1, 1].tolist() == list(
        viz.LABEL_COLOURS[0]
    )
    with pytest.raises(ValueError):
        viz.label_overlay(img, lab[:1])


def test_save_grid_nested_titles_and_tensor_batch(tmp_path):
    rows = [[np.zeros((6, 6)), np.ones((6, 6))], [np.eye(6)]]
    arr = _load(viz.save_grid(tmp_path / "n.png", rows, titles=[["x"], ["y"]], scale=1))
    assert arr.shape[0] == 2 * (6 + viz.title_band_height()) + viz.GAP  # both rows carry a title
    batch = torch.rand(5, 1, 8, 8)
    arr = _load(viz.save_grid(tmp_path / "b.png", batch, ncols=5, scale=1))
    assert arr.shape == (8, 5 * 8 + 4 * viz.GAP, 3)
    np.testing.assert_array_equal(arr[:, 8 + viz.GAP : 16 + viz.GAP, 0], viz.to_uint8(batch[1, 0]))
