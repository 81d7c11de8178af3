"""Tests for cffm_jax.prototype_store: frame-index rule, store round trip and errors, official import."""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import pytest

from cffm_jax import prototype_store as ps
from cffm_jax.prototype_store import PrototypeStore, import_official, prototype_frame_indices

KP, E = 6, 4


def test_frame_indices_short_video_uses_frame_zero():
    assert prototype_frame_indices(1) == [0] * 10
    assert prototype_frame_indices(9) == [0] * 10


def test_frame_indices_ten_and_thirty_seven_frames():
    assert prototype_frame_indices(10) == list(range(10))
    # interval 37 // 10 = 3 -> int(1.5), int(4.5), ... int(28.5)
    assert prototype_frame_indices(37) == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]
    assert prototype_frame_indices(37, num=3) == [6, 18, 30]
    with pytest.raises(ValueError, match="at least one frame"):
        prototype_frame_indices(0)


def _protos(seed: int, kp: int = KP, e: int = E) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(kp, e)).astype(np.float32)


@pytest.fixture
def store(tmp_path):
    return PrototypeStore(
        tmp_path / "store",
        embed_dim=E,
        num_prototypes=KP,
        source="generated",
        info={"seed": 3, "model": "b1"},
    )


def test_round_trip_and_reopen(store):
    a, b = _protos(0), _protos(1)
    store.put("video_b", b)
    store.put("video_a", a.astype(np.float64))  # stored as float32
    assert store.has("video_a") and "video_b" in store and not store.has("video_c")
    assert store.videos() == ["video_a", "video_b"] and len(store) == 2
    got = store.get("video_a")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(store("video_b"), b)  # usable as prototype_lookup

    reopened = PrototypeStore(store.root)
    assert (reopened.embed_dim, reopened.num_prototypes, reopened.source) == (E, KP, "generated")
    assert reopened.info == {"seed": 3, "model": "b1"}
    np.testing.assert_array_equal(reopened.get("video_b"), b)
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert manifest["embed_dim"] == E and manifest["num_prototypes"] == KP and manifest["version"] == 1
    # Reopening with matching settings is fine (a resumed generator); overwriting a video replaces it.
    PrototypeStore(store.root, embed_dim=E, num_prototypes=KP, source="generated").put("video_a", b)
    np.testing.assert_array_equal(store.get("video_a"), b)


def test_atomic_write_leaves_no_partial_files(store):
    store.put("v1", _protos(0))
    assert sorted(p.name for p in store.root.iterdir()) == ["manifest.json", "v1.npy"]
    # A writer killed mid-write leaves only a hidden temp file, which is neither listed nor readable.
    (store.root / ".v2.npy.abc123.tmp").write_bytes(b"\x93NUMPY partial")
    assert store.videos() == ["v1"] and not store.has("v2")

    def failing_write(f):
        f.write(b"half of an array")
        raise OSError("disk full")

    target = store.root / "v3.npy"
    with pytest.raises(OSError, match="disk full"):
        ps._atomic_write(target, failing_write)
    assert not target.exists()
    assert sorted(p.name for p in store.root.iterdir()) == [".v2.npy.abc123.tmp", "manifest.json", "v1.npy"]


def test_store_errors(store, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"'missing_video'.*{store.root}"):
        store.get("missing_video")
    with pytest.raises(ValueError, match=r"shape \(6, 5\).*\(6, 4\)"):
        store.put("v", _protos(0, e=E + 1))
    with pytest.raises(ValueError, match=r"shape \(7, 4\)"):
        store.put("v", _protos(0, kp=KP + 1))
    bad = _protos(0)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        store.put("v", bad)
    with pytest.raises(ValueError, match="dtype int64"):
        store.put("v", np.zeros((KP, E), np.int64))
    assert not store.has("v")
    with pytest.raises(ValueError, match="invalid video name"):
        store.put("../escape", _protos(0))
    # Files damaged outside the store's control are caught on read.
    np.save(store.root / "wrong_e.npy", _protos(0, e=E + 2))
    with pytest.raises(ValueError, match=r"wrong_e\.npy: shape \(6, 6\)"):
        store.get("wrong_e")
    inf = _protos(0)
    inf[0, 0] = np.inf
    np.save(store.root / "inf.npy", inf)
    with pytest.raises(ValueError, match="non-finite"):
        store.get("inf")
    # Opening / creating.
    with pytest.raises(FileNotFoundError, match="no prototype store"):
        PrototypeStore(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="embed_dim=4, but 8 was requested"):
        PrototypeStore(store.root, embed_dim=8)
    with pytest.raises(ValueError, match="unknown source"):
        PrototypeStore(tmp_path / "other", embed_dim=E, num_prototypes=KP, source="mine")


def test_a_folder_without_a_store_names_the_command_that_makes_one(tmp_path):
    """Training/evaluation/prediction users get the generator's command line, not the constructor's arguments."""
    empty = tmp_path / "my prototypes"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        PrototypeStore(empty)
    lines = str(err.value).splitlines()
    assert lines[0] == (
        f"no prototype store at {empty} (the folder has no manifest.json); "
        "generate the CFFM++ prototypes there from a trained CFFM:"
    )
    assert lines[1] == (
        f"  python -m cffm_jax.prototypes --checkpoint <CFFM checkpoint> --data-root <VSPW root> --out '{empty}'"
    )
    assert lines[-1].startswith("(library: PrototypeStore(dir, embed_dim=..., num_prototypes=..., source=...)")
    assert "import" not in str(err.value)
    # A folder of the official release's files: importing them is the quicker way.
    (empty / "video_a").mkdir()
    (empty / "video_a" / "centers.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=re.escape(f"python -m cffm_jax.prototype_store import '{empty}' <")):
        PrototypeStore(empty)
    with pytest.raises(FileNotFoundError, match="the folder does not exist"):
        PrototypeStore(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------
# Official release import

torch = pytest.importorskip("torch", reason="the official-format import reads torch .pt files")


def _write_official(root, videos: dict[str, np.ndarray]) -> None:
    for video, array in videos.items():
        (root / "cluster_centers" / video).mkdir(parents=True)
        torch.save(torch.from_numpy(array)[None], root / "cluster_centers" / video / "centers.pt")


def _zip_dir(folder, zip_path) -> None:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix())


@pytest.fixture
def official(tmp_path):
    videos = {"127_-hIVCYO4C90": _protos(10), "8_DyBQc5Tpdxs": _protos(11), "1001_5z_ijQjUf_0": _protos(12)}
    src = tmp_path / "release"
    _write_official(src, videos)
    return src, videos


@pytest.mark.parametrize("as_zip", [False, True])
def test_import_official(official, tmp_path, as_zip):
    src, videos = official
    if as_zip:
        _zip_dir(src, tmp_path / "release.zip")
        src = tmp_path / "release.zip"
    summary = import_official(src, tmp_path / "imported", expected_dim=E)
    store = summary.store
    assert (store.embed_dim, store.num_prototypes, store.source) == (E, KP, "official")
    assert store.videos() == sorted(videos) and sorted(summary.imported) == sorted(videos)
    for video, array in videos.items():
        np.testing.assert_array_equal(store.get(video), array)
    assert "imported 3 videos" in str(summary)


def test_import_official_into_existing_store_with_video_list(official, tmp_path):
    src, videos = official
    store = PrototypeStore(tmp_path / "s", embed_dim=E, num_prototypes=KP, source="official")
    summary = import_official(src / "cluster_centers", store, videos=["8_DyBQc5Tpdxs"])
    assert store.videos() == ["8_DyBQc5Tpdxs"]
    assert sorted(summary.ignored) == ["1001_5z_ijQjUf_0", "127_-hIVCYO4C90"]


def test_import_official_errors(official, tmp_path):
    src, _ = official
    with pytest.raises(
        ValueError, match=r"cluster_centers/1001_5z_ijQjUf_0/centers\.pt: embedding dim E=4, expected 256"
    ):
        import_official(src, tmp_path / "a", expected_dim=256)
    with pytest.raises(FileNotFoundError, match="1 expected videos.*no_such_video"):
        import_official(src, tmp_path / "b", videos=["8_DyBQc5Tpdxs", "no_such_video"])
    assert not (tmp_path / "b").exists()  # checked before anything is written

    _write_official(tmp_path / "mixed", {"a": _protos(0), "b": _protos(1, e=E + 1)})
    with pytest.raises(ValueError, match=r"b/centers\.pt: \(Kp, E\) = \(6, 5\)"):
        import_official(tmp_path / "mixed", tmp_path / "c")

    not_tensor = tmp_path / "not_tensor" / "cluster_centers" / "v"
    not_tensor.mkdir(parents=True)
    torch.save({"centers": torch.zeros(1, KP, E)}, not_tensor / "centers.pt")
    with pytest.raises(ValueError, match="expected a tensor .* found dict"):
        import_official(tmp_path / "not_tensor", tmp_path / "d")
    _zip_dir(tmp_path / "not_tensor", tmp_path / "not_tensor.zip")
    with pytest.raises(ValueError, match=r"not_tensor\.zip:cluster_centers/v/centers\.pt: expected a tensor"):
        import_official(tmp_path / "not_tensor.zip", tmp_path / "e")
    (not_tensor / "centers.pt").write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="cannot be read as a torch file"):
        import_official(tmp_path / "not_tensor", tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no <video>/centers.pt"):
        import_official(tmp_path / "empty", tmp_path / "g")


def test_cli_import_and_info(official, tmp_path, capsys):
    src, videos = official
    (tmp_path / "list.txt").write_text("8_DyBQc5Tpdxs\n127_-hIVCYO4C90\n")
    dst = tmp_path / "cli_store"
    ps._main(["import", str(src), str(dst), "--embed-dim", str(E), "--videos-file", str(tmp_path / "list.txt")])
    out = capsys.readouterr().out
    assert "imported 2 videos" in out and "ignored 1 videos" in out
    ps._main(["info", str(dst)])
    out = capsys.readouterr().out
    assert "2 videos" in out and "official" in out
    np.testing.assert_array_equal(PrototypeStore(dst).get("8_DyBQc5Tpdxs"), videos["8_DyBQc5Tpdxs"])
    with pytest.raises(SystemExit, match="error: .*embedding dim E=4, expected 8"):
        ps._main(["import", str(src), str(tmp_path / "other"), "--embed-dim", "8"])
