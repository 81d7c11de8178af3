"""The benchmark suite runs end to end (``python -m cffm_jax.benchmark --tiny``) and writes a complete JSON.

One in-process run of every case with the tiny model at one size (the streaming case adds a second size for
its compile count). Figures are not asserted, only that they exist and are sane; the compile count is:
streaming evaluation compiles for a new frame size and not for a size it has seen.
"""

import dataclasses
import json
import math

import pytest

from cffm_jax import benchmark

RESULT_KEYS = {f.name for f in dataclasses.fields(benchmark.Result)}
TIMED = ("median_s", "min_s", "max_s", "per_item_s", "items_per_s")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--tiny", "--sizes", "64x64", "--repeats", "2", "--warmup", "1", "--stream-batch", "2", "--json", str(path)]
    returned = benchmark.main(argv)
    with open(path) as f:
        written = json.load(f)
    return argv, returned, written


def test_json_has_machine_info_and_every_case(report):
    argv, returned, written = report
    assert written == json.loads(json.dumps(returned))  # what main returns is what it wrote
    machine = written["machine"]
    for key in (
        "cpu",
        "cpu_count",
        "cores_available",
        "versions",
        "backend",
        "date",
        "command",
        "loadavg_start",
    ):
        assert machine[key], key
    assert machine["loadavg_end"] is not None
    assert machine["command"] == "python -m cffm_jax.benchmark " + " ".join(argv)
    assert {"jax", "jaxlib", "flax"} <= set(machine["versions"])
    assert written["settings"]["tiny"] is True and written["settings"]["sizes"] == [[64, 64]]
    peak = written["matmul_peak"]
    assert peak["gflops_per_s"] == max(peak["start"]["gflops_per_s"], peak["end"]["gflops_per_s"]) > 0

    results = written["results"]
    assert {r["case"] for r in results} == set(benchmark.CASES)
    cases = [r["case"] for r in results]
    for case in ("peer", "torch"):  # before the training step changes the heap
        assert cases.index(case) < cases.index("train")
    for r in results:
        assert set(r) == RESULT_KEYS, r["name"]
        if r["extra"].get("skipped"):  # only the PyTorch cases, when torch/transformers are missing
            assert r["case"] in ("peer", "torch")
            continue
        assert len(r["times_s"]) == 2, r["name"]
        for key in TIMED:
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert len(r["cpu_times_s"]) == 2 and r["cpu_median_s"] >= 0 and r["loadavg_1min"] >= 0
        assert r["host_rss_delta_mb"] is not None and r["host_maxrss_mb"] > 0
        if r["flops"]:
            assert r["gflops_per_cpu_s"] > 0 and r["cpu_peak_fraction"] > 0
    by_case = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    assert [r["model"] for r in by_case["clip"]] == ["cffm_b0", "cffmpp_b0"]
    for r in by_case["mit"] + by_case["clip"] + by_case["train"] + by_case["kmeans"]:
        assert r["compile_s"] > 0 and r["flops"] > 0 and r["gflops_per_s"] > 0 and r["peak_fraction"] > 0
    for r in by_case["mit"] + by_case["clip"] + by_case["train"]:
        assert r["flops_per_frame"] == pytest.approx(r["flops"] / 4)
        assert r["peak_target_met"] in (True, False)
    (stream,) = by_case["stream"]
    assert stream["items_per_run"] == 12 and stream["extra"]["speedup_vs_clip_mode"] > 0
    # FLOPs of the streamed video from the CFFM clip row's programs: 12 frames encoded, 9 targets decoded.
    cffm_clip = by_case["clip"][0]["extra"]
    assert cffm_clip["encode_flops"] > 0 and cffm_clip["decode_flops"] > 0
    expected = 12 * cffm_clip["encode_flops"] / 4 + 9 * cffm_clip["decode_flops"]
    assert stream["flops"] == pytest.approx(expected) and stream["flops_per_frame"] == pytest.approx(expected / 12)
    assert stream["gflops_per_s"] > 0 and stream["peak_fraction"] > 0
    assert stream["extra"]["batch_size"] == 2  # --stream-batch
    (train,) = by_case["train"]
    assert math.isfinite(train["extra"]["loss"])
    (peer,) = by_case["peer"]
    if not peer["extra"].get("skipped"):
        assert peer["extra"]["ours_over_theirs"] > 0 and len(peer["extra"]["peer_times_s"]) == 2
        assert peer["extra"]["ours_over_theirs_cpu"] > 0
    torch_rows = {r["extra"].get("compares"): r for r in by_case["torch"]}
    if not any(r["extra"].get("skipped") for r in by_case["torch"]):
        assert sorted(torch_rows) == ["clip", "train"]  # clip forward (torch case) and training step (train case)
        transcription = torch_rows["clip"]
        assert transcription["model"] == "cffm_b0" and transcription["flops"] == by_case["clip"][0]["flops"]
        theirs = transcription["extra"]["transcription_median_s"]
        assert theirs > 0 and len(transcription["extra"]["transcription_times_s"]) == 2
        assert transcription["extra"]["ours_over_transcription"] == pytest.approx(transcription["median_s"] / theirs)
        # our float32 CFFM clip and streaming rows are judged against it; CFFM++ has no transcription
        clip_cffm, clip_cffmpp = by_case["clip"]
        assert clip_cffm["extra"]["ratio_vs_transcription"] == pytest.approx(clip_cffm["median_s"] / theirs)
        assert clip_cffm["extra"]["target_met_vs_transcription"] == (clip_cffm["median_s"] / theirs <= 0.8)
        assert "transcription_s" not in clip_cffmpp["extra"]
        assert stream["extra"]["speedup_vs_transcription"] == pytest.approx(theirs / stream["per_item_s"])
        assert stream["extra"]["target_met_vs_transcription"] in (True, False)
        # the training step: ours and the transcription's on the same batch
        train_vs = torch_rows["train"]
        assert train_vs["flops"] == train["flops"] and len(train_vs["extra"]["transcription_times_s"]) == 2
        theirs_step = train_vs["extra"]["transcription_median_s"]
        assert train["extra"]["ratio_vs_transcription"] == pytest.approx(train["median_s"] / theirs_step)
        assert train["extra"]["target_met_vs_transcription"] == (train["median_s"] <= theirs_step)
    # tiny runs are not compared with the official figures (those are for the real models at 480x480)
    assert all(r["reference_s"] is None and r["target_met"] is None for r in results)


def test_report_reprints_a_saved_run(report, capsys):
    argv, _, written = report
    path = argv[argv.index("--json") + 1]
    assert benchmark.main(["--report", path]) == written
    table = capsys.readouterr().out
    assert table.count("\n| ") == len(written["results"]) + 1  # header + one line per result
    assert written["machine"]["command"] in table


def test_streaming_compiles_once_per_size(report):
    (counts,) = report[2]["compile_counts"]
    assert counts["videos"] == [[64, 64], [64, 96], [64, 64], [64, 64]] and counts["distinct_sizes"] == 2
    assert counts["original_sizes"] == [[64, 64], [64, 96], [64, 64], [32, 32]]
    first, second, repeat, other_original = counts["backend_compiles_per_video"]
    assert first > 0 and second > 0  # a new size compiles...
    assert repeat == 0  # ...a size seen before does not
    by_function = counts["compiles_by_function"]
    assert by_function["jit(_encode)"] == counts["encode_cache_growth"] > 0
    # per (network input size, original size) on CPU, where the labels are computed in the decode step
    # (fuse_labels), with and without per-frame logits (chunk [2, 3] of 2 frames mixes both)
    assert counts["fuse_labels"] is True
    assert by_function["jit(_decode_step)"] == counts["decode_step_cache_growth"] == 6
    # another original size at a known input size: no encoder; the decode step's two variants and the early
    # frames' labels program (one per (input, original) pair); test_streaming checks the unfused case
    assert other_original == 3 and by_function["jit(_labels_step)"] == counts["labels_step_cache_growth"] == 3
    assert counts["backend_compiles"] == sum(by_function.values()) == first + second + other_original
    per_video_s = counts["backend_compile_s_per_video"]
    assert len(per_video_s) == 4 and per_video_s[2] == 0 < per_video_s[3] < per_video_s[0]
    assert sum(per_video_s) == pytest.approx(counts["backend_compile_s"])


def test_training_step_on_a_batch_of_clips(report, tmp_path, capsys):
    """--train-batch B times one step on B clips: B x 4 frames, clips/s, no comparison with the 1-clip reference."""
    _, _, one = report
    (single,) = [r for r in one["results"] if r["case"] == "train"]
    path = tmp_path / "train2.json"
    benchmark.main(["--tiny", "--cases", "train", "--sizes", "64x64", "--repeats", "1", "--train-batch", "2",
                    "--json", str(path)])  # fmt: skip
    with open(path) as f:
        (r,) = json.load(f)["results"]
    assert r["name"].startswith("CFFM-B0 train step 2x4") and single["name"].startswith("CFFM-B0 train step 1x4")
    assert r["items_per_run"] == 2 and r["item"] == "clip" and r["frames_per_run"] == 8
    assert r["items_per_s"] == pytest.approx(2 / r["median_s"])
    assert r["flops_per_frame"] == pytest.approx(r["flops"] / 8)
    assert r["flops"] > 1.8 * single["flops"]  # the program really runs on two clips
    assert r["reference_s"] is None and r["target_met"] is None
    out = capsys.readouterr().out
    assert "| 2x4x64x64 |" in out and f"{r['items_per_s']:.2f} clips/s" in out


def test_bad_arguments_are_rejected():
    for argv in (
        ["--cases", "mit,bogus"],
        ["--sizes", "480x470"],
        ["--models", "b9"],
        ["--dtype", "float16"],
        ["--train-batch", "0"],
        ["--stream-batch", "0"],
    ):
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)


def test_profile_is_refused_off_the_cpu(monkeypatch, capsys):
    """``--profile`` reads XLA:CPU's trace events; elsewhere it says so instead of printing unchecked figures."""
    assert benchmark.parse_args(["--profile"])[0].profile
    monkeypatch.setattr(benchmark.jax, "default_backend", lambda: "gpu")
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--profile"])
    assert "--profile reads XLA:CPU's trace" in capsys.readouterr().err


def test_rows_are_saved_as_they_finish_and_bfloat16_has_its_own_peak(tmp_path):
    """Each row calls ``on_row`` (the command line rewrites the JSON there, 'complete' false until the end); a
    bfloat16 row's peak fraction is against the bfloat16 matmul peak."""
    argv = ["--tiny", "--cases", "mit", "--sizes", "64x64", "--dtype", "float32,bfloat16", "--repeats", "1"]
    settings, _, _ = benchmark.parse_args(argv)
    saved = []
    suite = benchmark.Suite(settings)
    suite.on_row = lambda: saved.append(json.loads(json.dumps(benchmark.to_json(suite, {}))))
    suite.run()
    assert [len(s["results"]) for s in saved] == [1, 2]
    assert "end" not in saved[0]["matmul_peak"]  # saved before the suite's end
    bf16_peak = suite.matmul_peak["by_dtype"]["bfloat16"]
    assert bf16_peak["gflops_per_s"] == max(bf16_peak["start"]["gflops_per_s"], bf16_peak["end"]["gflops_per_s"]) > 0
    f32_row, bf16_row = suite.results
    assert f32_row.peak_fraction == pytest.approx(f32_row.gflops_per_s / suite.matmul_peak["gflops_per_s"])
    assert bf16_row.peak_fraction == pytest.approx(bf16_row.gflops_per_s / bf16_peak["gflops_per_s"])

    path = tmp_path / "mit.json"
    written = benchmark.main(["--tiny", "--cases", "mit", "--sizes", "64x64", "--repeats", "1", "--json", str(path)])
    assert written["complete"] is True and json.loads(path.read_text())["complete"] is True


def test_on_an_accelerator_the_peak_is_measured_at_the_end(capsys):
    """Off CPU the peak matmul runs after the cases (its operands would set the device's lifetime peak memory
    that the rows report): rows saved before it carry no peak fractions, the final ones do, judged on wall time.
    The backend is only a label here (the suite runs on this machine's CPU)."""
    settings, _, _ = benchmark.parse_args(["--tiny", "--cases", "mit", "--sizes", "64x64", "--repeats", "1"])
    saved = []
    suite = benchmark.Suite(settings, backend="gpu")
    suite.on_row = lambda: saved.append((dict(suite.matmul_peak), suite.results[-1].peak_fraction))
    suite.run()
    assert saved == [({}, None)]
    assert "start" not in suite.matmul_peak and suite.matmul_peak["gflops_per_s"] > 0
    (row,) = suite.results
    assert row.peak_fraction > 0 and row.peak_target_met == (row.peak_fraction >= benchmark.PEAK_TARGET)
    machine = benchmark.machine_info([])
    print(benchmark.format_table(suite, machine))
    assert "judged on the wall fraction" in capsys.readouterr().out


def test_official_figures_are_scaled_by_the_peer(report, tmp_path, capsys):
    """On a CPU where the PyTorch peer runs k times as long as where the official figures were measured, the
    official figures are scaled by k and the targets judged against the scaled figures (the raw verdict kept)."""
    _, _, saved = report
    saved = json.loads(json.dumps(saved))
    saved["settings"].update(tiny=False, sizes=[[480, 480]], models=["b1"])
    peak = saved["matmul_peak"]["gflops_per_s"]
    row = dict(size=[480, 480], dtype="float32", reference_s=[2.4, 2.7])
    clip = dict(row, case="clip", name="CFFM-B1 clip 1x4", model="cffm_b1", median_s=0.72, per_item_s=0.72,
                ratio_vs_reference=0.3, target="<= 0.8x official", target_met=True,
                flops=0.6 * 0.8 * peak * 1e9)  # at 60% of the peak in the scaled official time  # fmt: skip
    stream = dict(row, case="stream", name="CFFM-B1 streaming", model="cffm_b1", median_s=9.0, per_item_s=0.3,
                  ratio_vs_reference=0.125, target=">= 3.0x official rate", target_met=True, items_per_run=30,
                  flops=30 * 0.2 * 0.8 / 3 * peak * 1e9,  # per target: 20% of the peak in a third of 0.8 s
                  extra={"speedup_vs_official": 8.0})  # fmt: skip
    peer_s = benchmark.PEER_ON_REFERENCE_MACHINE_S["mit_b1"] / 3  # the peer runs 3x faster here
    peer_extra = {"peer_median_s": peer_s, "ours_over_theirs": 0.5 / peer_s, "ours_over_theirs_cpu": 1.0}
    peer = dict(case="peer", name="MiT-B1 4 frames: ours / HF SegFormer", model="mit_b1", size=[480, 480],
                dtype="float32", median_s=0.5, per_item_s=0.125, extra=peer_extra)  # fmt: skip
    saved["results"] = [clip, stream, peer]
    path = tmp_path / "scaled.json"
    path.write_text(json.dumps(saved))
    suite = benchmark.load_suite(json.loads(path.read_text()))
    clip_r, stream_r, peer_r = suite.results
    assert clip_r.extra["peer_scale"] == pytest.approx(1 / 3)
    assert clip_r.extra["scaled_reference_s"] == pytest.approx(0.8)
    assert clip_r.extra["ratio_vs_scaled_reference"] == pytest.approx(0.9)
    assert clip_r.target_met is False and clip_r.extra["target_met_unscaled"] is True  # 0.9 > 0.8
    assert clip_r.extra["scaled_reference_peak_fraction"] == pytest.approx(0.6)
    assert clip_r.extra["target_peak_fraction"] == pytest.approx(0.6 / benchmark.CLIP_TARGET)
    assert "scaled_reference_peak_fraction" not in stream_r.extra  # the official code does other work per target
    assert stream_r.extra["target_peak_fraction"] == pytest.approx(0.2)
    assert stream_r.extra["speedup_vs_scaled_official"] == pytest.approx(0.8 / 0.3)
    assert stream_r.target_met is False  # 2.67x < 3x
    assert "peer_scale" not in peer_r.extra
    benchmark.main(["--report", str(path)])
    table = capsys.readouterr().out
    assert "scaled official 0.8 s (peer x0.33, 60% of the matmul peak): ours/scaled 0.90" in table
    assert "the target needs 75% of the matmul peak" in table and "the target needs 20% of the matmul peak" in table
    assert "<= 0.8x official: NO" in table and "estimate for this machine" in table

    # Without a peer row nothing is scaled; a saved file that was scaled is not scaled twice.
    saved["results"] = [clip, stream]
    unscaled = benchmark.load_suite(json.loads(json.dumps(saved)))
    assert all("peer_scale" not in r.extra for r in unscaled.results) and unscaled.results[0].target_met is True
    rescaled = benchmark.load_suite(benchmark.to_json(suite, saved["machine"]))
    assert rescaled.results[0].extra["target_met_unscaled"] is True and rescaled.results[0].target_met is False
    # A file scaled before the peak fractions existed gets them when reported.
    older = benchmark.to_json(suite, saved["machine"])
    for key in ("scaled_reference_peak_fraction", "target_peak_fraction"):
        older["results"][0]["extra"].pop(key)
    reloaded = benchmark.load_suite(older).results[0]
    assert reloaded.extra["target_peak_fraction"] == pytest.approx(0.6 / benchmark.CLIP_TARGET)


def test_streaming_at_another_original_size(tmp_path):
    """--original-sizes: the stream case predicts at the frames' size (VSPW_480p: 480x853 frames, 480x864 input)."""
    path = tmp_path / "orig.json"
    benchmark.main(["--tiny", "--cases", "stream", "--sizes", "64x96", "--original-sizes", "64x90", "--repeats", "1",
                    "--frames", "5", "--json", str(path)])  # fmt: skip
    (row,) = json.loads(path.read_text())["results"]
    assert row["name"] == "CFFM-B0 streaming to 64x90 (tiny)" and row["size"] == [64, 96]
    assert row["extra"]["original_size"] == [64, 90] and row["per_item_s"] > 0
    with pytest.raises(SystemExit):  # one original size per network size
        benchmark.main(["--tiny", "--sizes", "64x64,64x96", "--original-sizes", "64x60"])


def test_torch_case_is_skipped_off_the_cpu():
    """The PyTorch transcription runs on the host CPU: against our program on an accelerator it judges nothing."""
    settings = benchmark.parse_args(["--tiny", "--cases", "torch"])[0]
    suite = benchmark.Suite(settings, backend="gpu")
    suite.case_torch()
    (row,) = suite.results
    assert row.case == "torch" and "runs on the CPU" in row.extra["skipped"] and row.median_s is None


def test_on_an_accelerator_flops_are_counted_before_compilation(monkeypatch):
    """An accelerator's compiled cost analysis leaves out products run as library calls (cuBLAS GEMMs): there the
    FLOPs come from the module before compilation. The backend is only a label here; the two counts agree on the CPU,
    and the compiled count is used there."""
    import jax.numpy as jnp

    a, b = jnp.ones((64, 96)), jnp.ones((96, 32))
    compiled, _ = benchmark.aot_compile(jnp.matmul, a, b)
    assert compiled not in benchmark._LOWERED_FLOPS
    assert benchmark.cost_flops(compiled) == 2 * 64 * 96 * 32
    monkeypatch.setattr(benchmark.jax, "default_backend", lambda: "gpu")
    compiled, _ = benchmark.aot_compile(jnp.matmul, a, b)
    assert benchmark._LOWERED_FLOPS[compiled] == benchmark.cost_flops(compiled) == 2 * 64 * 96 * 32
