"""Tests of the evaluation metrics (SPEC.md section 11) on hand-computed, crafted predictions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cffm_jax import metrics
from cffm_jax.metrics import MetricsAccumulator, VideoConsistency, confusion_matrix, vc_window_accuracies


def _video(num_frames: int, pred_pixels, gt_pixels) -> tuple[np.ndarray, np.ndarray]:
    """A (F, 1, P) video whose pixel values over time are given by callables of the frame index."""
    preds = np.array([[pred_pixels(f)] for f in range(num_frames)], np.int32)
    gts = np.array([[gt_pixels(f)] for f in range(num_frames)], np.int32)
    return preds, gts


def _numpy_confusion(pred: np.ndarray, label: np.ndarray, k: int, ignore: int = 255) -> np.ndarray:
    cm = np.zeros((k, k), np.int64)
    keep = label != ignore
    np.add.at(cm, (label[keep], pred[keep]), 1)
    return cm


# ---------------------------------------------------------------------------------------------------------
# Confusion matrix and scores.


def test_jitted_confusion_matrix_matches_numpy():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, size=(2, 3, 17, 23))
    label = rng.integers(0, 5, size=(2, 3, 17, 23))
    label[rng.random(label.shape) < 0.2] = 255
    cm = confusion_matrix(jnp.asarray(pred, jnp.int32), jnp.asarray(label, jnp.uint8), num_classes=5)
    assert cm.shape == (5, 5) and cm.dtype == jnp.int32
    np.testing.assert_array_equal(cm, _numpy_confusion(pred, label, 5))
    assert int(cm.sum()) == int((label != 255).sum())


def test_confusion_matrix_shape_mismatch():
    with pytest.raises(ValueError, match="prediction shape"):
        confusion_matrix(jnp.zeros((4, 5), jnp.int32), jnp.zeros((5, 4), jnp.int32), num_classes=3)


def test_scores_with_predicted_but_absent_class():
    # GT classes 0 and 1 (4 pixels each); class 2 only predicted (false positive), never in the GT.
    cm = np.array([[3, 0, 1], [2, 2, 0], [0, 0, 0]])
    # I = (3, 2, 0), GT = (4, 4, 0), P = (5, 2, 1), U = (6, 4, 1) -> IoU = (1/2, 1/2, 0).
    np.testing.assert_allclose(metrics.per_class_iou(cm), [50.0, 50.0, 0.0])
    assert metrics.miou(cm) == pytest.approx(100.0 / 3.0)  # the false-positive class counts as 0
    assert metrics.miou_gt_present(cm) == pytest.approx(50.0)  # ... but not over GT-present classes
    assert metrics.aacc(cm) == pytest.approx(62.5)
    acc = metrics.per_class_acc(cm)
    np.testing.assert_allclose(acc[:2], [75.0, 50.0])
    assert math.isnan(acc[2])


def test_scores_on_crafted_matrix():
    # Four classes; class 3 occurs neither in the GT nor in the prediction (NaN, skipped everywhere).
    cm = np.array([[6, 2, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    # I = (6, 1, 0), GT = (8, 2, 1), P = (7, 4, 0), U = (9, 5, 1) -> IoU = (2/3, 1/5, 0); 11 labelled pixels.
    iou = metrics.per_class_iou(cm)
    np.testing.assert_allclose(iou[:3], [200.0 / 3.0, 20.0, 0.0])
    assert math.isnan(iou[3])
    summary = metrics.summarize_confusion(cm)
    assert summary["miou"] == pytest.approx(100.0 * 13.0 / 45.0)  # (2/3 + 1/5 + 0) / 3
    assert summary["miou_gt_present"] == pytest.approx(100.0 * 13.0 / 45.0)
    assert summary["aacc"] == pytest.approx(100.0 * 7.0 / 11.0)
    assert summary["macc"] == pytest.approx(100.0 * (6 / 8 + 1 / 2 + 0) / 3)
    # fwIoU = 8/11 * 2/3 + 2/11 * 1/5 + 1/11 * 0 = 86/165.
    assert summary["fwiou"] == pytest.approx(100.0 * 86.0 / 165.0)


def test_empty_matrix_gives_nan():
    summary = metrics.summarize_confusion(np.zeros((3, 3), np.int64))
    for key in ("miou", "miou_gt_present", "aacc", "macc", "fwiou"):
        assert math.isnan(summary[key]), key


# ---------------------------------------------------------------------------------------------------------
# Video consistency.


def test_constant_wrong_prediction_gives_mvc_100_and_miou_0():
    rng = np.random.default_rng(1)
    gts = np.repeat(rng.integers(0, 2, size=(1, 6, 7)), 20, axis=0)
    gts[::3, 0, :] = 1 - gts[::3, 0, :]  # some pixels change over time
    preds = np.full_like(gts, 2)  # constant in time, never right
    acc = MetricsAccumulator(num_classes=3)
    for f in range(len(gts)):
        acc.update("v", f, preds[f], gts[f])
    scores = acc.compute()
    assert scores["mvc8"] == pytest.approx(100.0)
    assert scores["mvc16"] == pytest.approx(100.0)
    assert scores["miou"] == 0.0
    assert scores["aacc"] == 0.0


def test_short_videos_skipped_and_window_count_off_by_one():
    preds, gts = _video(17, lambda f: [0, 0], lambda f: [0, 0])
    vc = VideoConsistency()
    vc.add_video(preds[:16], gts[:16])  # 16 frames: skipped for both n
    assert vc.num_windows() == {8: 0, 16: 0}
    assert vc.num_skipped_videos == 1
    assert all(math.isnan(v) for v in vc.result().values())
    vc.add_video(preds, gts)  # 17 frames: range(17 - n) -> 9 windows for n=8, 1 for n=16
    assert vc.num_windows() == {8: 9, 16: 1}
    assert vc.result() == {"mvc8": 100.0, "mvc16": 100.0}
    assert len(vc_window_accuracies(preds, gts, 8)) == 9
    assert len(vc_window_accuracies(preds, gts, 16)) == 1


def test_windows_are_pooled_over_videos_not_averaged_per_video():
    # GT constant. Video A (17 frames): prediction constant -> every window 1.0.
    # Video B (20 frames): pixel 1 of the prediction flickers -> every window 1/2.
    a_preds, a_gts = _video(17, lambda f: [0, 0], lambda f: [0, 0])
    b_preds, b_gts = _video(20, lambda f: [0, f % 2], lambda f: [0, 0])
    vc = VideoConsistency()
    vc.add_video(a_preds, a_gts)
    vc.add_video(b_preds, b_gts)
    assert vc.num_windows() == {8: 9 + 12, 16: 1 + 4}
    result = vc.result()
    assert result["mvc8"] == pytest.approx(100.0 * (9 * 1.0 + 12 * 0.5) / 21)  # 71.43, not 75
    assert result["mvc16"] == pytest.approx(100.0 * (1 * 1.0 + 4 * 0.5) / 5)  # 60, not 75
    assert result["mvc8"] != pytest.approx(75.0)


def test_windows_without_constant_gt_are_nan_and_skipped():
    # The GT flips everywhere at frame 11: the 8-windows starting at 4..8 and the 16-window have sum(G) = 0.
    preds, gts = _video(17, lambda f: [5, 5], lambda f: [0, 1] if f < 11 else [1, 0])
    accs = vc_window_accuracies(preds, gts, 8)
    assert np.isnan(accs[4:]).all() and (accs[:4] == 1.0).all()
    vc = VideoConsistency()
    vc.add_video(preds, gts)
    result = vc.result()
    assert result["mvc8"] == pytest.approx(100.0)  # nanmean: 4 windows of 1.0, not 4/9
    assert math.isnan(result["mvc16"])
    assert vc.num_windows() == {8: 9, 16: 1}


def test_ignore_label_is_a_label_for_vc_but_dropped_from_confusion():
    # Pixel 0 is labelled 255 throughout and its prediction flickers; pixel 1 is class 0, predicted right.
    preds, gts = _video(17, lambda f: [1 + f % 2, 0], lambda f: [255, 0])
    acc = MetricsAccumulator(num_classes=3)
    for f in range(17):
        acc.update("v", f, preds[f], gts[f])
    scores = acc.compute()
    assert scores["mvc8"] == pytest.approx(50.0)  # 255 pixel is in G but not in G & P
    cm = acc.confusion_matrix()
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[17, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert scores["miou"] == 100.0 and scores["aacc"] == 100.0


@pytest.mark.parametrize("batch_frames", [1, 3, 4])
def test_streaming_accumulator_equals_whole_video_computation(batch_frames):
    """Frames scored in groups of 1, 3 or 4 (the last group of a video padded with ignored frames) give the whole-
    video numpy computation's scores."""
    rng = np.random.default_rng(2)
    k, lengths = 4, (17, 10, 23, 30)
    videos = []
    for n_frames in lengths:
        size = (int(rng.integers(5, 9)), int(rng.integers(5, 9)))
        gt = np.repeat(rng.integers(0, k, size=(1, *size)), n_frames, axis=0)
        gt[rng.random(gt.shape) < 0.02] = 255
        gt[rng.random(gt.shape) < 0.01] = 1
        pred = np.where(rng.random(gt.shape) < 0.03, rng.integers(0, k, gt.shape), np.minimum(gt, k - 1))
        videos.append((pred.astype(np.uint8), gt.astype(np.uint8)))

    acc = MetricsAccumulator(num_classes=k, batch_frames=batch_frames)
    for v, (pred, gt) in enumerate(videos):
        for f in range(len(pred)):
            acc.update(f"video{v}", f, pred[f], gt[f])
    scores = acc.compute()

    for n in (8, 16):
        pooled = np.concatenate([vc_window_accuracies(p, g, n) for p, g in videos if len(p) > 16])
        assert len(pooled) == sum(max(len(p) - n, 0) for p, _ in videos if len(p) > 16)
        assert scores[f"mvc{n}"] == pytest.approx(100.0 * np.nanmean(pooled), rel=1e-12)
    cm = sum(_numpy_confusion(p.astype(np.int64), g.astype(np.int64), k) for p, g in videos)
    np.testing.assert_array_equal(acc.confusion_matrix(), cm)
    assert scores["miou"] == pytest.approx(metrics.miou(cm))
    assert scores["num_frames"] == sum(lengths) and scores["num_videos"] == len(lengths)
    assert len(scores["per_class_iou"]) == k

    # several processes, each with some of the videos, pool their states into the same scores
    parts = [MetricsAccumulator(num_classes=k) for _ in range(2)]
    for v, (pred, gt) in enumerate(videos):
        for f in range(len(pred)):
            parts[v % 2].update(f"video{v}", f, pred[f], gt[f])
    pooled = MetricsAccumulator(num_classes=k)
    for part in parts:
        pooled.merge_state(part.state())
    merged = pooled.compute()
    assert merged.keys() == scores.keys()
    for key, value in scores.items():
        np.testing.assert_allclose(merged[key], value, rtol=1e-12, err_msg=key)
    with pytest.raises(ValueError, match="K=5"):
        MetricsAccumulator(num_classes=5).merge_state(parts[0].state())


def test_groups_of_device_predictions_equal_frame_by_frame():
    """``update_frames`` (evaluation's path: a chunk's predictions stay on the device, a video's last chunk padded
    with rows that are not scored) gives what ``update`` per frame gives, also mixed with it; frames after a padded
    group are refused."""
    rng = np.random.default_rng(7)
    k, chunk = 5, 4
    videos = []
    for n_frames in (18, 9, 21):
        gt = np.repeat(rng.integers(0, k, size=(1, 6, 7)), n_frames, axis=0).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.05] = 255
        pred = np.where(rng.random(gt.shape) < 0.05, rng.integers(0, k, gt.shape), np.minimum(gt, k - 1))
        videos.append((pred.astype(np.uint8), gt))

    frame_by_frame, grouped = MetricsAccumulator(num_classes=k), MetricsAccumulator(num_classes=k)
    for v, (pred, gt) in enumerate(videos):
        for f in range(len(pred)):
            frame_by_frame.update(f"v{v}", f, pred[f], gt[f])
        start = 0
        if v == 1:  # the first frames one by one, then groups
            for f in range(3):
                grouped.update(f"v{v}", f, pred[f], gt[f])
            start = 3
        for first in range(start, len(pred), chunk):
            rows = pred[first : first + chunk]
            padded = np.concatenate([rows, np.repeat(rows[-1:], chunk - len(rows), axis=0)])  # as the segmenter pads
            grouped.update_frames(f"v{v}", first, jax.device_put(padded), list(gt[first : first + chunk]))
    expected, scores = frame_by_frame.compute(), grouped.compute()
    np.testing.assert_array_equal(grouped.confusion_matrix(), frame_by_frame.confusion_matrix())
    for key in ("miou", "mvc8", "mvc16", "num_frames", "num_videos"):
        assert scores[key] == expected[key], key

    acc = MetricsAccumulator(num_classes=k)
    pred, gt = videos[1]
    acc.update_frames("a", 0, jax.device_put(pred[:4]), list(gt[:3]))
    with pytest.raises(ValueError, match="frames after a padded group"):
        acc.update_frames("a", 3, jax.device_put(pred[3:7]), list(gt[3:7]))
    with pytest.raises(ValueError, match="video 'b' frame 1: prediction shape \\(6, 7\\) does not match label"):
        acc.update_frames("b", 0, jax.device_put(pred[:4]), [gt[0], gt[1][:, :5]])


def test_windows_by_run_length_equal_the_official_loop_in_any_grouping():
    """The VC counts windows from per-pixel run lengths of equal values (no buffer of n frames): equal to the
    official loop for frames added one by one or in groups, over runs longer than the uint8 run counter's 255, and
    when a video's label maps widen from uint8 to int32 midway."""
    rng = np.random.default_rng(5)
    gts = np.repeat(rng.integers(0, 3, size=(1, 4, 5)), 300, axis=0)
    gts[100:110, 0, 0] = 255
    gts[rng.random(gts.shape) < 0.01] = 2
    preds = np.where(rng.random(gts.shape) < 0.005, 1, gts).astype(np.int32)
    expected = {n: vc_window_accuracies(preds, gts, n) for n in (8, 16)}
    for group in (1, 5, 16):
        vc = VideoConsistency()
        for start in range(0, len(gts), group):
            cast = np.uint8 if start < 150 else np.int32
            vc.add_frames(preds[start : start + group].astype(cast), gts[start : start + group].astype(cast))
        vc.end_video()
        for n in (8, 16):
            assert vc.num_windows()[n] == len(expected[n]) == 300 - n
            assert vc.result()[f"mvc{n}"] == pytest.approx(100 * np.nanmean(expected[n]), rel=1e-12), (group, n)


def test_result_mid_video_equals_result_after_end():
    preds, gts = _video(20, lambda f: [0, f // 9], lambda f: [0, 0])
    vc = VideoConsistency()
    for f in range(20):
        vc.add_frame(preds[f], gts[f])
    mid = vc.result()
    vc.end_video()
    assert vc.result() == mid
    assert vc.num_windows() == {8: 12, 16: 4}


def test_size_mismatch_names_video_and_frame():
    acc = MetricsAccumulator(num_classes=3)
    acc.update("bike", 0, np.zeros((4, 6), np.int32), np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match="video 'bike' frame 1: prediction shape \\(4, 5\\)"):
        acc.update("bike", 1, np.zeros((4, 5), np.int32), np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match="video 'bike' frame 1 has shape \\(4, 5\\), its first frame \\(4, 6\\)"):
        acc.update("bike", 1, np.zeros((4, 5), np.int32), np.zeros((4, 5), np.uint8))


def test_frame_order_errors():
    acc = MetricsAccumulator(num_classes=3)
    frame = np.zeros((2, 2), np.int32)
    acc.update("a", 0, frame, frame)
    with pytest.raises(ValueError, match="consecutive"):
        acc.update("a", 2, frame, frame)
    acc.update("b", 0, frame, frame)
    with pytest.raises(ValueError, match="already finished"):
        acc.update("a", 1, frame, frame)
