"""The end-to-end benchmark harness (bench/e2e.py) and ``svdquant bench`` in --tiny mode on
the CPU: JSON schema, plot, skipped rows with reasons, failing rows recorded, the budget."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from svdquant.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """Import ``bench/<name>.py`` by path (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"_test_bench_{name}", ROOT / "bench" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


e2e = _load("e2e")

TOP_KEYS = {
    "bench", "device", "device_type", "date", "commit", "versions", "config", "model_config",
    "image_tokens", "text_tokens", "batches", "steps", "warmup", "timer", "budget_s",
    "compile", "rows", "wall_s", "plot",
}  # fmt: skip
ROW_KEYS = {
    "name", "method", "label", "library", "weights", "activations", "mode", "compiled",
    "compile_mode", "cuda_graphs", "status", "reason", "error", "latency_ms", "latency",
    "step_peak_bytes",
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check_schema(res: dict, out: Path) -> None:
    assert set(res) >= TOP_KEYS
    assert res["bench"] == "e2e" and res["config"] == "tiny"
    assert {"torch", "diffusers", "triton", "bitsandbytes", "torchao"} <= set(res["versions"])
    assert res["versions"]["torch"] == torch.__version__
    on_disk = json.loads(Path(res["json"]).read_text())
    assert on_disk["rows"] == res["rows"]
    assert Path(res["json"]).parent == out
    png = out / res["plot"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in res["rows"]:
        assert set(r) >= ROW_KEYS, r["name"]
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] == "skipped":
            assert r["reason"], r["name"]
        if r["status"] == "error":
            assert r["error"], r["name"]


def test_state_bytes_counts_gpu_tensors_only_when_asked():
    """``state_bytes(cuda_only=True)`` (the e2e table's "weights GiB" on a GPU) leaves out
    tensors in host memory: the codes ``keep_fp8_weights(codes_on_host=True)`` moved."""
    lin = torch.nn.Linear(4, 3)
    assert e2e.state_bytes(lin) == (4 * 3 + 3) * 4
    assert e2e.state_bytes(lin, cuda_only=True) == 0


def test_tiny_rows_schema_plot_and_reasons(tmp_path, monkeypatch, capsys):
    def boom(model, ctx):
        raise RuntimeError("planted failure")

    # a row that fails is recorded and the run goes on to the next row
    monkeypatch.setattr(e2e.METHODS["svdq-w4a16"], "apply", boom)
    rows = "bf16,svdq-int4,nf4,svdq-w4a16,ao-int8wo,ao-fp8dq"
    res = e2e.main(["--tiny", "--out", str(tmp_path), "--rows", rows, "--batches", "1,2"])
    _check_schema(res, tmp_path)
    by = {r["name"]: r for r in res["rows"]}
    assert [r["method"] for r in res["rows"]] == rows.split(",")  # the importance order
    for name in ("bf16", "svdq-int4"):
        r = by[name]
        assert r["status"] == "ok", r
        assert set(r["latency_ms"]) == {"b1", "b2"} and min(r["latency_ms"].values()) > 0
        assert len(r["latency"]["b1"]["times_ms"]) == 2  # --tiny: 2 timed steps
        assert r["mode"] == "eager" and r["compiled"] is False
        assert r["state_bytes"] > 0
    assert by["bf16"]["speedup_vs_bf16"] == {"b1": 1.0, "b2": 1.0}
    prof = by["svdq-int4"]["profile_b1"]  # where one step's time goes, per op
    assert (
        prof["ops"] and prof["total_ms"] > 0 and {"name", "calls", "self_ms"} <= set(prof["ops"][0])
    )
    assert by["svdq-int4"]["svdq_backend"] == "reference"
    assert by["svdq-int4"]["state_bytes"] < by["bf16"]["state_bytes"]
    assert by["svdq-w4a16"]["status"] == "error"
    assert "planted failure" in by["svdq-w4a16"]["error"]
    # without CUDA, torchao's float8 row is skipped with the reason
    assert by["ao-fp8dq"]["status"] == "skipped" and by["ao-fp8dq"]["reason"]
    for lib, name in (("bitsandbytes", "nf4"), ("torchao", "ao-int8wo")):
        if importlib.util.find_spec(lib) is None:
            assert by[name]["status"] == "skipped" and lib in by[name]["reason"]
        else:
            assert by[name]["status"] in ("ok", "error")
    if by["nf4"]["status"] == "ok":
        assert by["nf4"]["speedup_vs_nf4"]["b1"] == 1.0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-len(rows.split(",")) - 2].startswith("| row | mode | ms/step b1")
    assert "planted failure" in table[-3]


def test_missing_library_gives_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("bitsandbytes", "torchao") else real(name, *a),
    )
    ctx = e2e.Ctx("cpu", True, e2e.TINY, 64, 16, (1,), 2, 1)
    assert "bitsandbytes is not installed" in e2e.METHODS["nf4"].missing(ctx)
    assert "torchao is not installed" in e2e.METHODS["ao-int8dq"].missing(ctx)


def test_lora_rows_load_a_lora_and_fuse_with_it(tmp_path, monkeypatch):
    """``svdq-int4-lora`` / ``svdq-int4-fused-lora``: a random LoRA of ``--lora-rank`` on
    every quantized layer, loaded with ``svdquant.load_lora``; the fused row fuses after
    it (the LoRAs stacked into the fused layers)."""
    import svdquant

    seen = []
    real = svdquant.fuse_projections

    def fuse(model):
        layers = [m for m in model.modules() if isinstance(m, svdquant.SVDQLinear)]
        seen.append((len(svdquant.list_loras(model)), svdquant.lora.lora_rows(layers[0])))
        return real(model)

    monkeypatch.setattr(svdquant, "fuse_projections", fuse)
    rows = "svdq-int4-lora,svdq-int4-fused-lora"
    res = e2e.main(["--tiny", "--out", str(tmp_path), "--rows", rows, "--batches", "1",
                    "--lora-rank", "3", "--no-isolate"])  # fmt: skip
    _check_schema(res, tmp_path)
    assert [r["status"] for r in res["rows"]] == ["ok"] * len(res["rows"])
    assert res["lora_rank"] == 3
    # the fused row: one LoRA loaded, then fused; each layer's branch: base rank + 3 rows
    assert seen == [(1, 3)]


def test_budget_skips_rows_with_reason(tmp_path):
    res = e2e.main(
        ["--tiny", "--out", str(tmp_path), "--rows", "bf16,svdq-int4", "--budget-s", "0"]
    )
    _check_schema(res, tmp_path)
    assert [r["status"] for r in res["rows"]] == ["skipped", "skipped"]
    assert all("budget" in r["reason"] for r in res["rows"])


def test_ab_times_a_row_both_ways_in_one_process(tmp_path, capsys):
    """``--ab``: the row timed again with an engine constant set, alternated with the
    default on the same model (the constant restored after), recorded and printed."""
    from svdquant.kernels import rope

    res = e2e.main(["--tiny", "--out", str(tmp_path), "--rows", "svdq-int4-fused",
                    "--batches", "1", "--ab", "rope.ENABLED=False"])  # fmt: skip
    _check_schema(res, tmp_path)
    (row,) = res["rows"]
    assert row["status"] == "ok", row.get("error")
    ab = row["ab"]
    assert ab["set"] == ["rope.ENABLED=False"]
    assert len(ab["b1"]["default_ms"]) == 3 and len(ab["b1"]["set_ms"]) == 2
    assert ab["b1"]["set_vs_default"] > 0
    assert rope.ENABLED is True
    assert "A/B svdq-int4-fused eager b1 (rope.ENABLED=False)" in capsys.readouterr().out
    # a constant that does not exist is refused before any model is built
    with pytest.raises(SystemExit, match="no constant 'ENABLD'"):
        e2e.main(["--tiny", "--out", str(tmp_path), "--rows", "svdq-int4-fused",
                  "--ab", "rope.ENABLD=False"])  # fmt: skip


def test_ab_of_a_lora_constant_stacks_the_loras_again(tmp_path, monkeypatch):
    """``--ab lora.RANK_MULTIPLE=1``: a constant read where a LoRA's rows are stacked —
    the loaded LoRA is stacked again each way (unpadded, then padded), and as it was after."""
    from svdquant import lora

    widths = []
    real = lora._rebuild

    def rebuild(layer):
        real(layer)
        widths.append((lora.RANK_MULTIPLE, layer.lowrank_down.shape[0] - layer.rank))

    monkeypatch.setattr(lora, "_rebuild", rebuild)
    res = e2e.main(["--tiny", "--out", str(tmp_path), "--rows", "svdq-int4-fused-lora",
                    "--batches", "1", "--lora-rank", "3", "--no-isolate",
                    "--ab", "lora.RANK_MULTIPLE=1"])  # fmt: skip
    (row,) = [r for r in res["rows"] if r["mode"] == "eager"]
    assert row["status"] == "ok", row.get("error")
    assert len(row["ab"]["b1"]["set_ms"]) == 2 and lora.RANK_MULTIPLE == 16
    assert {w for m, w in widths if m == 1} == {3} and {w for m, w in widths if m == 16} == {16}


def test_compiled_row_is_marked(tmp_path):
    # the eager backend exercises the compile path quickly; inductor is what the GPU runs
    res = e2e.main(
        ["--tiny", "--out", str(tmp_path), "--rows", "bf16", "--compile", "--batches", "1",
         "--compile-backend", "eager"]
    )  # fmt: skip
    _check_schema(res, tmp_path)
    eager, compiled = res["rows"]
    assert eager["mode"] == "eager" and compiled["mode"] == "compile"
    assert compiled["compiled"] is True and compiled["compile_mode"] == "default"
    assert compiled["status"] == "ok", compiled.get("error")
    assert "b1" in compiled["compile_s"]
    assert compiled["speedup_vs_bf16"]["b1"] > 0


def test_cli_bench_tiny(tmp_path, capsys):
    assert cli_main(["bench", "--tiny", "--out", str(tmp_path), "--rows", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "| row | mode |" in out and "diffusers BF16" in out
    if not torch.cuda.is_available():
        assert "layer benchmark skipped" in out
    assert len(list(tmp_path.glob("e2e-*.json"))) == 1
    assert len(list(tmp_path.glob("e2e-*.png"))) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cli_bench_full_size_needs_cuda(capsys):
    assert cli_main(["bench", "--e2e"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_isolated_rows_run_in_their_own_process(tmp_path, monkeypatch):
    """On the GPU each row runs in a child process (a failed CUDA-graph capture must not
    poison later rows); the rows come back through the child's JSON. ``--set`` reaches the
    child and the JSON."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "WS_SPLIT", gemm.WS_SPLIT)  # restored after (set here too)
    args = ["--tiny", "--isolate", "--rows", "bf16", "--out", str(tmp_path)]
    res = e2e.main([*args, "--set", "gemm.WS_SPLIT=False"])
    assert res["sets"] == ["gemm.WS_SPLIT=False"]
    (row,) = res["rows"]
    assert row["status"] == "ok" and row["latency_ms"]["b1"] > 0
    assert len(list(tmp_path.glob("*.json"))) == 1  # the child wrote to its own folder


def test_sass_report_guards_the_gemv_layout(tmp_path):
    """bench/sass_report.py compiles the GEMV for sm_90 on the CPU: 16-byte loads of the
    codes and x̂, no spills, and at most one layout conversion in the main loop (the group
    scales) — the design that keeps the decoded weights out of shared memory; the GEMM's
    split output (fused projections) and the gated sum + norm keep their 16-byte
    accesses."""
    import os
    import subprocess

    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("this triton wheel ships no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels
    out = tmp_path / "report.json"
    script = str(ROOT / "bench" / "sass_report.py")
    kernels = "gemv_fma,gemm_split,gate_residual_modulate"
    cmd = [sys.executable, script, "--kernels", kernels, "--json", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    r = report["gemv_fma"]
    assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 128
    assert r["memory"].get("LDG.E.128", 0) >= 8
    assert r["loop_layout_conversions"] <= 1
    split = report["gemm_split"]["memory"]
    assert split.get("STG.E.128", 0) > 0 and not split.get("STG.E.U16")
    fused = report["gate_residual_modulate"]
    assert fused["spill_bytes"] == 0 and set(fused["memory"]) <= {"LDG.E.128", "STG.E.128",
                                                                  "LDS", "STS"}  # fmt: skip


def test_probe_layer_reads_its_overrides():
    """bench/probe_layer.py's ``--set module.NAME=VALUE``: a constant of a kernels module
    (or of ``svdquant``'s own) and a Python literal; anything else stops with a message
    naming what is wrong."""
    probe = _load("probe_layer")
    module, name, value = probe.parse_set("widen.TILE=(32, 512, 4)")
    assert module.__name__ == "svdquant.kernels.widen" and name == "TILE"
    assert value == (32, 512, 4)
    module, name, value = probe.parse_set("fuse.GENERIC_CONTIGUOUS=True")  # svdquant.fuse
    assert module.__name__ == "svdquant.fuse" and value is True
    # one entry of a dict constant; two entries of one dict merge into one setting
    module, name, value = probe.parse_set("gemv.TILES['dp4a']=(16, 512, 2)")
    assert name == "TILES" and value["dp4a"] == (16, 512, 2)
    assert {k: v for k, v in value.items() if k != "dp4a"} == {
        k: v for k, v in module.TILES.items() if k != "dp4a"
    }
    both = probe.merge_sets(
        [
            probe.parse_set(s)
            for s in (
                "gemv.TILES['dp4a']=(16, 512, 2)",
                "gemv.TILES['dp4a_multi']=(8, 512, 2)",
                "gemv.DP4A_MAX_M=2",
            )
        ]
    )
    assert len(both) == 2 and both[0][2]["dp4a"] == (16, 512, 2)
    assert both[0][2]["dp4a_multi"] == (8, 512, 2) and both[0][2]["fma"] == module.TILES["fma"]
    # a function run with constants set (the route a probe times), restored after
    from svdquant.kernels import gemm_gated

    before = gemm_gated.WS_GATED
    seen = probe.with_constants(lambda k: (k, gemm_gated.WS_GATED), [(gemm_gated, "WS_GATED", 7)])
    assert seen("x") == ("x", 7) and gemm_gated.WS_GATED is before
    for bad, words in [
        ("widen.TILE", "module.NAME=VALUE"),
        ("widen.NO_SUCH=1", "no constant"),
        ("widen.TILE=(1,", "not a Python literal"),
        ("gemv.TILES['nope']=(1, 2, 3)", "no entry"),
        ("nope.X=1", "no module"),
    ]:
        with pytest.raises(SystemExit, match=words):
            probe.parse_set(bad)


def test_bench_results_never_replace_an_earlier_run(tmp_path):
    """Two runs of a probe on one day (one device call) keep both JSON files, each
    written whole (temporary file, then rename)."""
    gemm = _load("gemm")
    first = gemm.write_result({"run": 1}, str(tmp_path), "probe_x")
    second = gemm.write_result({"run": 2}, str(tmp_path), "probe_x")
    third = gemm.write_result({"run": 3}, str(tmp_path), "probe_x")
    assert len({first, second, third}) == 3 and second.name.endswith("-2.json")
    assert [json.loads(p.read_text())["run"] for p in (first, second, third)] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (first, second, third)
    )


def test_read_floor_kernel_reads_every_byte():
    """``probe_read_floor``'s bare read (the floor under the W4A16 GEMV's bar) folds every
    code word and scale of each row into its output — rows past the last tile, rows
    whose words are not a whole number of steps — so it cannot be timing less than the
    GEMV reads."""
    floor = _load("probe_read_floor")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-(2**31), 2**31 - 1, (37, 384), generator=g, dtype=torch.int32)
    scales = torch.rand(37, 48, generator=g).half()
    xor = torch.zeros(37, dtype=torch.int64)
    for w in codes.T.long():
        xor ^= w
    want = xor.to(torch.int32).float() + scales.float().sum(1)
    for tile in [(1, 128, 1), (8, 256, 2), (32, 512, 4)]:
        assert tile in floor.TILES
        torch.testing.assert_close(floor.bare_read(codes, scales, tile), want, rtol=1e-6, atol=0)
    for tile in [(4, 1, 2, 4), (16, 2, 1, 4), (8, 4, 3, 4)]:  # more blocks than programs
        assert tile in floor.PERSISTENT_TILES
        got = floor.bare_read_persistent(codes, scales, tile)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert all(4 <= r * w // (32 * nw) <= 128 for r, w, nw in floor.TILES)


def test_quantize_floor_kernel_moves_the_quantize_bytes():
    """``probe_quantize_floor``'s move kernel (the floor under the quantize's bar) reads
    every bf16 element and writes one byte for each — edges that are not whole tiles
    included."""
    floor = _load("probe_quantize_floor")
    x = torch.randn(37, 333, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = (x.view(torch.int16) >> 8).to(torch.int8)
    for tile in [(4, 256, 2), (16, 512, 4), (32, 512, 8)]:
        assert tile in floor.TILES
        assert torch.equal(floor.move(x, tile), want)
    assert all(8 <= bm * bk // (32 * nw) <= 64 for bm, bk, nw in floor.TILES)


def test_probe_launch_times_the_host():
    """``probe_launch`` (host µs per eager layer call) loads and times a call on the host."""
    probe = _load("probe_launch")
    calls = []
    us = probe.host_us(lambda: calls.append(1), n=50)
    assert len(calls) == 70 and 0 < us < 1e5


def test_offload_bench_runs_each_way(tmp_path, capsys):
    """``bench/offload.py --tiny``: whole images under accelerate's offload hook, eager
    and unfused, then fused and graphed, with host copies, then resident; the JSON
    written, a table last."""
    offload = _load("offload")
    argv = ["--tiny", "--out", str(tmp_path), "--images", "2", "--steps", "3"]
    res = offload.main([*argv, "--text-encoder"])  # a T5 encoder offloaded before it
    assert res["text_encoder"] is True
    assert [r["name"] for r in res["rows"]] == [
        "offload-eager-unfused",
        "offload-fused-graphed",
        "offload-fused-graphed-host-copy",
        "resident-fused-graphed",
    ]
    for r in res["rows"]:
        assert len(r["image_s"]) == 2 and len(r["first_step_ms"]) == 2
        assert r["later_step_ms_median"] > 0
    assert res["rows"][0]["captures"] is None and res["rows"][1]["captures"] == 0  # CPU: eager
    (path,) = tmp_path.glob("offload-*.json")
    assert json.loads(path.read_text())["rows"] == res["rows"]
    assert "| offload-fused-graphed |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        offload.main(["--tiny", "--out", str(tmp_path), "--images", "0"])


def test_ws_decode_probe_arithmetic_is_the_widens():
    """``bench/probe_ws_decode.py``'s decode warpgroup computes ``fp8((code · s_group) ·
    (1 / c))`` with the row scale of ``reference.widen_row_scale``: in PyTorch, the widen
    reference's fp8 operand bit for bit (codes -8 included: saturated to -448), and the
    row scale times the tensor scale its ``s_channel``."""
    from svdquant.kernels import reference as ref

    probe = _load("probe_ws_decode")
    g = torch.Generator().manual_seed(0)
    n, k = 37, 256
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    qweight[0] = 0x88  # every code -8
    wscales = (torch.rand(n, k // 64, generator=g) * 0.02 + 1e-4).half()
    wscales[1] = 0  # an all-zero row: c = 1
    ts = torch.ones((), dtype=torch.float32)
    wq, s_channel = ref.widen_weight_ref(qweight, wscales, ts, "int4")
    c = ref.widen_row_scale(wscales, "int4")
    assert torch.equal(s_channel, c * ts)
    got = probe.decode_reference(qweight, wscales, 1.0 / c)
    assert torch.equal(got.view(torch.uint8), wq.view(torch.uint8))
    assert got[0].float().min() == -448.0  # the row's largest group: -8 / 7 · 448, saturated
    one = probe.decode_reference(qweight, wscales, 1.0 / c, one_mul=True)  # another rounding
    diff = (one.float() - wq.float()).abs()
    assert (diff <= wq.float().abs() / 8 + 2**-9).all()  # at most one fp8 step apart
    assert (diff > 0).float().mean() < 0.05


def test_models_bench_times_each_architecture_both_ways(tmp_path, capsys):
    """``bench/models.py --tiny``: PixArt-Σ, SDXL and SANA's test denoisers, BF16 and
    quantized in place (the adapter's layers swapped), unfused and fused, a ratio for each;
    the JSON and a table. Its real-size configs build the published sizes (on the meta device)."""
    models = _load("models")
    res = models.main(["--tiny", "--out", str(tmp_path), "--steps", "1"])
    rows = res["rows"]
    ways = ("bf16", "svdq-int4-unfused", "svdq-int4")
    assert [(r["model"], r["way"]) for r in rows] == [
        (a, w) for a in ("pixart", "sdxl", "sana") for w in ways
    ]
    for r in rows:
        assert r["median_ms"] > 0 and r["x_bf16"] > 0
    for bf16, unfused, fused in zip(rows[::3], rows[1::3], rows[2::3], strict=True):
        assert unfused["weights_bytes"] != bf16["weights_bytes"]  # the tiny layers: rank 32
        assert unfused["fused_modules"] == 0 < fused["fused_modules"]  # the attentions
    (path,) = tmp_path.glob("models-*.json")
    assert json.loads(path.read_text())["rows"] == rows
    assert "| sdxl | svdq-int4 | eager | 1 |" in capsys.readouterr().out
    sizes = {}
    for arch in ("pixart", "sdxl", "sana"):
        m = models.build(arch, tiny=False, device="meta")
        sizes[arch] = sum(p.numel() for p in m.parameters()) / 1e9
    assert 0.6 < sizes["pixart"] < 0.62 and 2.56 < sizes["sdxl"] < 2.57
    assert 1.6 < sizes["sana"] < 1.61
    with pytest.raises(SystemExit, match="unknown"):
        models.main(["--tiny", "--models", "dit"])
    from svdquant.kernels import ops

    ab = models.main(["--tiny", "--models", "sdxl", "--steps", "1", "--out", str(tmp_path),
                      "--ab", "ops.GEGLU_EPILOGUE=False", "--fp8-weights", "all,0.5"])  # fmt: skip
    assert [r["way"] for r in ab["rows"]][-3:] == [
        "svdq-int4 ops.GEGLU_EPILOGUE=False",
        "svdq-int4 keep_fp8_weights 0.5 GiB",
        "svdq-int4 keep_fp8_weights",
    ]
    with pytest.raises(SystemExit, match="GiB numbers"):
        models.main(["--tiny", "--fp8-weights", "lots"])
    assert ops.GEGLU_EPILOGUE is True  # set for that way only
    alternated = ab["rows"][-3]["ab"]  # both ways twice after the row, on the same model
    assert len(alternated["set_ms"]) == 2 and len(alternated["default_ms"]) == 3
    assert alternated["set_vs_default"] > 0
    # an fp16 model with a LoRA on every quantized layer (the fused model takes it)
    lo = models.main(["--tiny", "--models", "sdxl", "--steps", "1", "--out", str(tmp_path),
                      "--lora-rank", "4", "--dtype", "float16",
                      "--ab", "ops.GEGLU_EPILOGUE=False"])  # fmt: skip
    ways = [r["way"] for r in lo["rows"]]
    assert ways == [
        "fp16",
        "svdq-int4-unfused",
        "svdq-int4",
        "svdq-int4 + LoRA r4",
        "svdq-int4 + LoRA r4 ops.GEGLU_EPILOGUE=False",
    ]  # (the A/B on the LoRA'd)
    assert "ab" in lo["rows"][-1] and "ab" not in lo["rows"][-2]
    assert all(r["x_bf16"] > 0 for r in lo["rows"])  # (against the fp16 model)
    assert lo["rows"][3]["weights_bytes"] > lo["rows"][2]["weights_bytes"]
    printed = capsys.readouterr().out
    assert "| model | way | mode | batch | ms/step | × FP16 |" in printed
    assert "A/B sdxl svdq-int4 + LoRA r4 ops.GEGLU_EPILOGUE=False eager b1" in printed
    with pytest.raises(SystemExit, match="apart"):
        models.main(["--tiny", "--lora-rank", "4", "--fp8-weights", "all"])
    with pytest.raises(SystemExit, match="positive"):
        models.main(["--tiny", "--lora-rank", "-1"])


def test_probes_of_the_gpu_refuse_the_cpu_clearly(monkeypatch, tmp_path):
    """``bench/probe_pin.py``, ``probe_group_scaled.py``, ``probe_gated.py``,
    ``probe_quantize_memset.py``, ``probe_ws_tiles.py`` and ``probe_ws_decode.py`` need the
    GPU: without one a one-line reason, no traceback, nothing written; bad probe arguments
    are refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, extra in (
        ("probe_pin", []),
        ("probe_group_scaled", []),
        ("probe_gated", ["--ff"]),
        ("probe_quantize_memset", []),
        ("probe_ws_tiles", []),
    ):
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            _load(name).main(["--out", str(tmp_path), *extra])
    assert not any(tmp_path.iterdir())
    probe = _load("probe_ws_decode")
    if probe.g.HAVE_GLUON:  # the launcher checks its arguments before any descriptor
        x = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
        q = torch.zeros(8, 128, dtype=torch.uint8)
        s = torch.zeros(8, 4, dtype=torch.float16)
        with pytest.raises(ValueError, match="block_m 128 or 256"):
            probe.ws_decode_gemm(x, q, s, s[:, 0], s[:, 0], s[0, 0], block_m=64)
        with pytest.raises(ValueError, match="fp16 group scales"):
            probe.ws_decode_gemm(x, q, s.float(), s[:, 0], s[:, 0], s[0, 0])
        gs = _load("probe_group_scaled")
        for kw in ({"decode_wgs": 3}, {"decode_wgs": 2, "pipe": True}):
            with pytest.raises(ValueError, match="decode_wgs 1 or 2"):
                gs.group_scaled_gemm(x, q, s, s[0, 0], s[0, 0], **kw)


def test_fit_tile_costs_recovers_a_known_model_and_checks_picks(tmp_path):
    """``bench/fit_tile_costs.py``: timings made from known (c, a, b) per tile come back
    as those coefficients, the model's pick is the fastest at every shape, and v44's
    names (a fifth field: programs a multiprocessor) read as today's tiles."""
    from svdquant.kernels import gemm_ws

    fit = _load("fit_tile_costs")
    truth = {(128, 256, 3, 8, 1): (5.0, 4.3, 0.005), (64, 128, 6, 4, 2): (7.0, 0.4, 0.0018)}
    rows = []
    for m in (512, 1024, 4096):
        for n, k in ((640, 640), (1152, 4608), (3072, 3072), (12288, 3072)):
            us = {t: gemm_ws.tile_cost(abc, t, m, n, k, 132) for t, abc in truth.items()}
            tiles = {gemm_ws.tile_name(t): {"us": v, "err": 1e-3} for t, v in us.items()}
            rows.append({"M": m, "N": n, "K": k, "tiles": tiles})
    names = [gemm_ws.tile_name(t) for t in truth]
    costs = fit.fit(rows, names, 132)
    for t, abc in truth.items():
        assert costs[gemm_ws.tile_name(t)] == pytest.approx(abc, rel=1e-3, abs=1e-3)
    got = fit.check(rows, costs, 132)
    assert got["shapes"] == 12 and got["fastest"] == 12 and got["worst"][0] == 1.0
    # a tile that disagrees with the reference is not timed; v44's names
    rows[0]["tiles"]["64x128x6x4pp"]["err"] = 0.5
    assert fit._timings(rows[:1], names)[0][3].keys() == {"128x256x3x8"}
    assert fit.parse_tile("128x128x4x4x1") == (128, 128, 4, 4, 1)
    assert fit.parse_tile("64x128x6x4pp") == (64, 128, 6, 4, 2)
    with pytest.raises(ValueError, match="two programs"):
        fit.parse_tile("64x128x3x4x2")
    for t in gemm_ws.CANDIDATE_TILES:
        assert fit.parse_tile(gemm_ws.tile_name(t)) == t
    # too few shapes to fit, a missing or foreign file: a one-line reason
    with pytest.raises(SystemExit, match="need 3"):
        fit.fit(rows[:2], names, 132)
    with pytest.raises(SystemExit, match="no such run"):
        fit.main([str(tmp_path / "missing.json")])
    (tmp_path / "other.json").write_text('{"bench": "gemm"}')
    with pytest.raises(SystemExit, match="not a probe_ws_tiles run"):
        fit.main([str(tmp_path / "other.json")])


def test_group_scaled_reference_is_the_stored_weights_product():
    """``bench/probe_group_scaled.py``'s reference sums each group's partial product
    scaled by its group scale: the fp8 activations times the stored 4-bit weight exactly
    (codes · group scales · tensor scale, no fp8 rounding of the weight), within fp32
    summation order; the engine's widened operand is within fp8's rounding of it."""
    from svdquant import formats
    from svdquant.kernels import reference as ref

    probe = _load("probe_group_scaled")
    g = torch.Generator().manual_seed(0)
    m, n, k = 5, 24, 256
    q = formats.quantize(torch.randn(n, k, generator=g) * 0.02, "int4")
    xq = (torch.randn(m, k, generator=g) * 64).to(torch.float8_e4m3fn)
    act = torch.tensor(0.03)
    got = probe.grouped_reference(xq, q.packed, q.scales, q.tensor_scale, act, torch.float32)
    w = formats.unpack(q.packed).float() * q.scales.float().repeat_interleave(64, dim=1)
    exact = (xq.float() @ w.T) * act * q.tensor_scale.float()
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)
    wq, s_ch = ref.widen_weight_ref(q.packed, q.scales, q.tensor_scale, "int4")
    engine = (xq.float() @ wq.float().T) * s_ch * act
    assert ((engine - exact).norm() / exact.norm()).item() < 0.05  # fp8's 3 mantissa bits


def test_group_scaled_lut_decode_is_each_codes_e4m3_byte():
    """The LUT decode (``probe_group_scaled.lut_decode_word``: the inline PTX's byte
    permutations, step for step) turns a word of 8 packed int4 codes into their exact e4m3
    bytes in column order — every code value, in every position."""
    from svdquant import formats

    probe = _load("probe_group_scaled")
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (300, 4), generator=g, dtype=torch.uint8)
    packed[:16, 0] = torch.arange(16, dtype=torch.uint8) * 17  # both nibbles: every code
    want = formats.unpack(packed).float().to(torch.float8_e4m3fn).view(torch.uint8)
    for row, expect in zip(packed.tolist(), want.tolist(), strict=True):
        word = sum(b << (8 * i) for i, b in enumerate(row))
        lo, hi = probe.lut_decode_word(word)
        got = [(w >> (8 * i)) & 0xFF for w in (lo, hi) for i in range(4)]
        assert got == expect
    assert "prmt.b32" in probe._lut_ptx() and probe._lut_ptx().count("$1") == 1


def test_gemm_bench_refuses_malformed_shapes(monkeypatch):
    """bench/gemm.py --shapes NxK,...: anything else stops with the form it wants, before
    the GPU is touched."""
    bench = _load("gemm")
    for bad in ("3072", "3072x", "3072x3072x2", "ax3"):
        monkeypatch.setattr("sys.argv", ["gemm.py", "--shapes", bad])
        with pytest.raises(SystemExit, match="NxK"):
            bench.main()


def test_gemm_bench_layer_runs_every_engine_path():
    """bench/gemm.py's stand-in layer is what the engine's ops read from an SVDQLinear:
    the plain layer, its kept widened weight and the fused MLP pair (with and without kept
    weights) run on it and agree — so a new attribute the ops read fails here, not on the
    GPU halfway through the table."""
    bench = _load("gemm")
    fc1 = bench.Layer(72, 40, seed=1, device="cpu")
    fc2 = bench.Layer(24, 72, seed=2, device="cpu")
    x = torch.randn(3, 40).bfloat16()
    plain = fc1(x)
    fc1.keep_fp8_weights()
    assert torch.equal(fc1(x, kept=fc1.kept), plain)
    fused_kept = bench.svdq_mlp_triton(x, fc1, fc2)
    fc1.kept = None
    fused = bench.svdq_mlp_triton(x, fc1, fc2)
    assert torch.equal(fused_kept, fused)
    unfused = fc2(torch.nn.functional.gelu(plain, approximate="tanh"))
    assert torch.isfinite(fused).all()
    assert (fused.float() - unfused.float()).norm() <= 0.05 * unfused.float().norm()


def test_ncu_sass_stalls_groups_a_launch_by_execution_count(tmp_path, capsys):
    """``bench/ncu_sass_stalls.py``: instructions grouped by how often they ran (a loop,
    an epilogue), each group's share of the stall samples and reasons, a group's opcode
    mix; gzipped pages read as plain ones; a missing file or kernel gets one line."""
    import gzip

    tool = _load("ncu_sass_stalls")
    head = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
    head += '"stall_barrier","stall_long_sb","stall_wait (Not Issued)"'
    page = "\n".join([
        '"Kernel Name","other_kernel",', head, '"0","FADD R1, R2, R3","9","1","9","0","0"',
        '"Kernel Name","k",', head,
        '"0","QGMMA.64x256x32 R24","30","100","10","20","5"',
        '"1","@!P1 BRA 0x10","10","100","0","10","0"',
        '"2","FMUL R1, R2, R3","40","8","0","40","0"',
        '"3","@P0 FMUL R1, R1, 0.25","15","8","15","0","0"',
        '"4","MUFU.RCP R5, R6","5","8","5","0","0"',
    ])  # fmt: skip
    (tmp_path / "p.csv.gz").write_bytes(gzip.compress(page.encode()))
    ((_, rows),) = [x for x in tool.launches(tmp_path / "p.csv.gz") if x[0] == "k"]
    groups = tool.summary(rows)
    assert [(g["executed"], g["instructions"]) for g in groups] == [(8, 3), (100, 2)]
    assert groups[0]["share"] == pytest.approx(0.6) and groups[1]["share"] == pytest.approx(0.4)
    assert groups[0]["reasons"]["long_sb"] == pytest.approx(40 / 60)
    assert tool.opcodes(rows, 8) == {"FMUL": 2, "MUFU.RCP": 1}
    tool.main([str(tmp_path / "p.csv.gz"), "--kernel", "k", "--ops", "8"])
    assert "executed 8: 3 instructions — FMUL 2, MUFU.RCP 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no launch of 'nope'"):
        tool.main([str(tmp_path / "p.csv.gz"), "--kernel", "nope"])
    with pytest.raises(SystemExit, match="no such file"):
        tool.main([str(tmp_path / "missing.csv")])
