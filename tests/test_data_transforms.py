"""numpy transforms (SPEC 10.3): each one on crafted images and labels."""

import colorsys

import numpy as np
import pytest

from cffm_jax.data import transforms as T


def _float_bilinear(image, out_w, out_h):
    """Float reference: half-pixel centres, clamped borders, no antialiasing."""
    h, w = image.shape[:2]

    def taps(src, dst):
        x = (np.arange(dst) + 0.5) * src / dst - 0.5
        x = np.clip(x, 0, src - 1)
        x0 = np.floor(x).astype(int)
        x1 = np.minimum(x0 + 1, src - 1)
        return x0, x1, x - x0

    y0, y1, fy = taps(h, out_h)
    x0, x1, fx = taps(w, out_w)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def _opencv_linear_reference(image, out_w, out_h):
    """OpenCV INTER_LINEAR's uint8 integer arithmetic written plainly: both passes with their 11-bit taps for every
    output pixel, no shortcut for unchanged axes, channels broadcast (the shape of the first implementation, checked
    bit-exact against opencv-python-headless 5.0.0)."""
    h, w = image.shape[:2]
    sy0, sy1, b0, b1 = T._linear_taps(h, out_h, 0, out_h, clamp_weights=False)
    sx0, sx1, a0, a1 = T._linear_taps(w, out_w, 0, out_w, clamp_weights=True)
    src = image.astype(np.int64)
    horiz = (src[:, sx0] * a0[None, :, None] + src[:, sx1] * a1[None, :, None]) >> 4
    out = ((horiz[sy0] * b0[:, None, None]) >> 16) + ((horiz[sy1] * b1[:, None, None]) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def test_resize_bilinear_equals_the_plain_integer_reference():
    """The row-wise implementation (and its shift for an axis whose size does not change, as 853 -> 864 x 480)
    gives the plain reference's integers, for whole images and windows, 1, 3 or 4 channels."""
    rng = np.random.default_rng(4)
    for _ in range(60):
        h, w, out_h, out_w = (int(x) for x in rng.integers(2, 90, 4))
        out_h, out_w = [(out_h, out_w), (h, out_w), (out_h, w)][int(rng.integers(3))]
        if (out_h, out_w) == (h, w):
            continue
        img = rng.integers(0, 256, (h, w, int(rng.choice([1, 3, 4]))), dtype=np.uint8)
        ref = _opencv_linear_reference(img, out_w, out_h)
        np.testing.assert_array_equal(T.resize_bilinear(img, (out_w, out_h)), ref, err_msg=f"{img.shape} {out_w=}")
        y0, x0 = int(rng.integers(out_h)), int(rng.integers(out_w))
        y1, x1 = int(rng.integers(y0 + 1, out_h + 1)), int(rng.integers(x0 + 1, out_w + 1))
        window = T.resize_bilinear(img, (out_w, out_h), (y0, y1, x0, x1))
        np.testing.assert_array_equal(window, ref[y0:y1, x0:x1], err_msg=f"{img.shape} window {(y0, y1, x0, x1)}")
    frame = rng.integers(0, 256, (48, 85, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.resize_bilinear(frame, (96, 48)), _opencv_linear_reference(frame, 96, 48))


def test_normalize_is_the_per_channel_formula():
    image = np.random.default_rng(5).integers(0, 256, (2, 7, 11, 3), dtype=np.uint8)
    expected = (image.astype(np.float32) - T.MEAN) / T.STD
    np.testing.assert_array_equal(T.normalize(image), expected)
    np.testing.assert_array_equal(T.normalize(image[0, 0]), expected[0, 0])
    np.testing.assert_array_equal(T.normalize(image[0, 0, 0]), expected[0, 0, 0])


@pytest.mark.parametrize(
    "size, scale, expected",
    [
        ((853, 480), (853, 480), (853, 480)),
        ((853, 480), (1706, 960), (1706, 960)),
        ((853, 480), (426, 240), (426, 240)),
        ((200, 120), (853, 480), (800, 480)),  # the short edge binds: s = 4
        ((480, 853), (853, 480), (480, 853)),  # portrait: long edge bound applies to H
        ((1000, 400), (853, 480), (853, 341)),  # s = 0.853, 341.2 -> 341
    ],
)
def test_rescale_size(size, scale, expected):
    assert T.rescale_size(size, scale) == expected


def test_resize_bilinear_matches_opencv_values():
    # OpenCV INTER_LINEAR on a 1x2 row upsampled to 1x4 gives [0, 64, 191, 255] (63.75 and 191.25 rounded).
    row = np.array([[[0], [255]]], np.uint8)
    np.testing.assert_array_equal(T.resize_bilinear(row, (4, 1))[0, :, 0], [0, 64, 191, 255])


def test_resize_bilinear_identity_constant_and_float_reference():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.resize_bilinear(img, (53, 37)), img)
    const = np.full((10, 14, 3), 77, np.uint8)
    assert (T.resize_bilinear(const, (31, 9)) == 77).all()
    for out_w, out_h in [(106, 74), (20, 15), (61, 29), (53, 80)]:
        out = T.resize_bilinear(img, (out_w, out_h))
        assert out.shape == (out_h, out_w, 3) and out.dtype == np.uint8
        ref = _float_bilinear(img, out_w, out_h)
        assert np.abs(out.astype(float) - ref).max() <= 1.0


def test_resize_window_equals_full_then_crop():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    lab = rng.integers(0, 5, (30, 41), dtype=np.uint8)
    window = (7, 40, 3, 29)
    np.testing.assert_array_equal(
        T.resize_bilinear(img, (67, 52), window), T.resize_bilinear(img, (67, 52))[7:40, 3:29]
    )
    np.testing.assert_array_equal(T.resize_nearest(lab, (67, 52), window), T.resize_nearest(lab, (67, 52))[7:40, 3:29])


def test_resize_nearest_preserves_values():
    lab = np.array([[1, 2], [3, 255]], np.uint8)
    np.testing.assert_array_equal(
        T.resize_nearest(lab, (4, 4)),
        [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 255, 255], [3, 3, 255, 255]],
    )
    big = np.random.default_rng(2).choice(np.array([0, 5, 17, 123, 255], np.uint8), (40, 60))
    for size in [(91, 61), (23, 17), (60, 40)]:
        out = T.resize_nearest(big, size)
        assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 5, 17, 123, 255}
    # Downsampling picks source index floor(d * src / dst) (OpenCV INTER_NEAREST).
    line = np.arange(10, dtype=np.uint8)[None]
    np.testing.assert_array_equal(T.resize_nearest(line, (4, 1))[0], [0, 2, 5, 7])


def _draw_box(rng, h, w, ch, cw):
    oy = int(rng.integers(0, max(h - ch, 0) + 1))
    ox = int(rng.integers(0, max(w - cw, 0) + 1))
    return oy, min(oy + ch, h), ox, min(ox + cw, w)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])  # uint8 labels are counted by bincount
def test_crop_rule_takes_first_acceptable_draw(dtype):
    lab = np.zeros((60, 90), dtype)
    lab[:, 45:] = 1
    lab[:5] = 255
    lab[50:, :30] = 7
    for seed in range(30):
        box = T.random_crop_box(lab, (20, 20), np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        draws = [_draw_box(rng, 60, 90, 20, 20) for _ in range(11)]

        def ok(b):
            v, c = np.unique(lab[b[0] : b[1], b[2] : b[3]], return_counts=True)
            c = c[v != 255]
            return len(c) > 1 and c.max() / c.sum() < 0.75

        expected = next((b for b in draws[:10] if ok(b)), draws[10])
        assert box == expected


def test_crop_rule_gives_up_after_ten_redraws():
    lab = np.full((50, 50), 3, np.uint8)  # a single class never passes the rule
    rng = np.random.default_rng(5)
    box = T.random_crop_box(lab, (10, 10), rng)
    ref = np.random.default_rng(5)
    draws = [_draw_box(ref, 50, 50, 10, 10) for _ in range(11)]
    assert box == draws[-1]
    assert rng.random() == ref.random()  # exactly 11 boxes (22 integers) were drawn


def test_crop_larger_than_image_is_clipped():
    lab = np.zeros((8, 12), np.uint8)
    assert T.random_crop_box(lab, (20, 20), np.random.default_rng(0), cat_max_ratio=1.0) == (0, 8, 0, 12)


def test_hsv_conversions():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (500, 3), dtype=np.uint8)
    hsv = T.rgb_to_hsv(rgb)
    for (r, g, b), (h, s, v) in zip(rgb[:100], hsv[:100], strict=True):
        rh, rs, rv = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        assert v == max(r, g, b)
        assert abs(int(s) - rs * 255) <= 1
        dh = abs(int(h) - rh * 180)
        assert min(dh, 180 - dh) <= 1
    back = T.hsv_to_rgb(hsv)
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 3  # uint8 HSV quantisation
    primaries = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    np.testing.assert_array_equal(T.rgb_to_hsv(primaries)[:, 0], [0, 60, 120])


def _hsv_to_rgb_formula(hsv):
    """OpenCV's float HSV2RGB for uint8 written directly (np.choose over the sector table; the first
    implementation)."""
    hsv = hsv.astype(np.float32)
    h = np.mod(hsv[..., 0] * np.float32(6.0 / 180.0), np.float32(6.0))
    s = hsv[..., 1] * np.float32(1.0 / 255.0)
    v = hsv[..., 2] * np.float32(1.0 / 255.0)
    sector = np.floor(h)
    frac = h - sector
    sector = sector.astype(np.intp) % 6
    tab = [v, v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))]
    rgb = np.stack([np.choose(T._SECTOR_RGB[:, c][sector], tab) for c in range(3)], -1)
    rgb = np.where((s == 0)[..., None], v[..., None], rgb)
    return np.clip(np.rint(rgb * np.float32(255.0)), 0, 255).astype(np.uint8)


def test_hsv_to_rgb_equals_the_direct_formula():
    """Every H (0..255, the mod path for H >= 180 included) and S with a sample of V, and random pixels in (H, W, 3)
    and (N, 3) layouts."""
    h, s, v = np.meshgrid(np.arange(256), np.arange(256), np.arange(0, 256, 17), indexing="ij")
    grid = np.stack([h, s, v], -1).astype(np.uint8)
    np.testing.assert_array_equal(T.hsv_to_rgb(grid), _hsv_to_rgb_formula(grid))
    below = grid[:180]  # the usual input (H < 180): no mod
    np.testing.assert_array_equal(T.hsv_to_rgb(below), _hsv_to_rgb_formula(below))
    pixels = np.random.default_rng(6).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    pixels[..., 0] %= 180
    np.testing.assert_array_equal(T.hsv_to_rgb(pixels), _hsv_to_rgb_formula(pixels))
    np.testing.assert_array_equal(T.hsv_to_rgb(pixels[0]), _hsv_to_rgb_formula(pixels[0]))


def _reference_photometric(img, rng):
    """The reference's draw order, written out step by step (independent of the library's control flow)."""

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = T.rgb_to_hsv(img)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        img = T.hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = T.rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.integers(-18, 18)) % 180
        img = T.hsv_to_rgb(hsv)
    if mode == 0 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    return img


def test_photometric_distortion_draws():
    img = np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    changed = 0
    for seed in range(12):
        out = T.photometric_distortion(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, _reference_photometric(img, np.random.default_rng(seed)))
        changed += not np.array_equal(out, img)
    assert changed >= 8


def _clip(n=4, h=40, w=60, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lab = np.zeros((h, w), np.uint8)
    lab[:, w // 3 :] = 1
    lab[h // 2 :, : w // 2] = 2
    return [img] * n, [lab] * n


def test_train_transform_same_geometry_photometry_per_frame():
    images, labels = _clip()
    kw = dict(crop_size=(32, 32), img_scale=(60, 40), ratio_range=(0.8, 1.5))
    clip, lab = T.train_transform(images, labels, np.random.default_rng(0), photometric=False, **kw)
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.float32
    assert lab.shape == (4, 32, 32) and lab.dtype == np.int32
    for t in range(1, 4):  # identical frames in -> identical frames out: one geometry for the clip
        np.testing.assert_array_equal(clip[t], clip[0])
    assert set(np.unique(lab)) <= {0, 1, 2, 255}
    distinct = 0
    for seed in range(3):
        clip, lab2 = T.train_transform(images, labels, np.random.default_rng(seed), **kw)
        distinct += len({clip[t].tobytes() for t in range(4)})
        for t in range(1, 4):
            np.testing.assert_array_equal(lab2[t], lab2[0])  # labels are not touched by photometry
    assert distinct >= 8  # photometric distortion is drawn per frame


def test_train_transform_flip_mirrors_every_frame():
    images, labels = _clip(seed=1)
    images = [images[0], np.roll(images[0], 5, axis=1), images[0][::-1], images[0] // 2]
    kw = dict(crop_size=(32, 48), img_scale=(60, 40), ratio_range=(0.9, 1.2), photometric=False)
    a, la = T.train_transform(images, labels, np.random.default_rng(3), flip_prob=0.0, **kw)
    b, lb = T.train_transform(images, labels, np.random.default_rng(3), flip_prob=1.0, **kw)
    np.testing.assert_array_equal(b, a[:, :, ::-1])
    np.testing.assert_array_equal(lb, la[:, :, ::-1])


def test_train_transform_normalise_and_pad():
    images, labels = _clip(h=20, w=30)
    clip, lab = T.train_transform(
        images,
        labels,
        np.random.default_rng(0),
        crop_size=(32, 40),
        img_scale=(30, 20),
        ratio_range=(1.0, 1.0),
        flip_prob=0.0,
        photometric=False,
    )
    expected = (images[0].astype(np.float32) - T.MEAN) / T.STD
    np.testing.assert_allclose(clip[0, :20, :30], expected, rtol=1e-6)
    assert (clip[:, 20:] == 0).all() and (clip[:, :, 30:] == 0).all()
    np.testing.assert_array_equal(lab[0, :20, :30], labels[0])
    assert (lab[:, 20:] == 255).all() and (lab[:, :, 30:] == 255).all()


def test_train_transform_ratio_resize_scale():
    # Ratio fixed at 2: a 60x40 frame with img_scale (60, 40) becomes 120x80; a 120x80 crop keeps all of it.
    images, labels = _clip(h=40, w=60)
    _, lab = T.train_transform(
        images,
        labels,
        np.random.default_rng(0),
        crop_size=(80, 120),
        img_scale=(60, 40),
        ratio_range=(2.0, 2.0),
        flip_prob=0.0,
        photometric=False,
    )
    np.testing.assert_array_equal(lab[0], T.resize_nearest(labels[0], (120, 80)))


def test_test_transform_sizes():
    frame = np.full((480, 853, 3), 100, np.uint8)
    out = T.test_transform(frame)
    assert out.shape == (480, 864, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], (100 - T.MEAN) / T.STD, rtol=1e-6)
    assert T.test_size((853, 480)) == (864, 480)
    assert T.test_transform(np.zeros((120, 200, 3), np.uint8), img_scale=(200, 120)).shape == (128, 224, 3)
    assert T.test_transform(np.zeros((120, 200, 3), np.uint8)).shape == (480, 800, 3)


def test_test_transform_is_the_normalised_test_resize():
    """Evaluation loads ``test_resize``'s uint8 frames; ``test_transform`` is the same frame normalised."""
    frame = np.random.default_rng(0).integers(0, 256, (120, 213, 3), np.uint8)
    resized = T.test_resize(frame, img_scale=(213, 120))
    assert resized.shape == (128, 224, 3) and resized.dtype == np.uint8
    np.testing.assert_array_equal(T.test_transform(frame, img_scale=(213, 120)), T.normalize(resized))


def test_resizes_match_opencv_when_installed():
    cv2 = pytest.importorskip("cv2", reason="opencv is optional; this comparison runs where it is installed")
    rng = np.random.default_rng(9)
    for _ in range(6):
        h, w, oh, ow = (int(x) for x in rng.integers(10, 300, 4))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(
            T.resize_bilinear(img, (ow, oh)), cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR)
        )
        np.testing.assert_array_equal(
            T.resize_nearest(img, (ow, oh)), cv2.resize(img, (ow, oh), interpolation=cv2.INTER_NEAREST)
        )
        np.testing.assert_array_equal(T.rgb_to_hsv(img), cv2.cvtColor(img, cv2.COLOR_RGB2HSV))


def test_a_very_narrow_frame_keeps_one_pixel():
    """mmcv's rescale rounds a 900 x 2 frame at 200x120 to a height of 0 (then the resize divided by zero); one
    pixel is kept instead, and the test transform gives a network input of multiples of 32."""
    assert T.rescale_size((900, 2), (200, 120)) == (200, 1)
    assert T.test_resize(np.zeros((2, 900, 3), np.uint8), img_scale=(200, 120)).shape == (32, 224, 3)
