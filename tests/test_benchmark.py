"""Benchmark engine and CLI: row schema, counted figures (params, FLOPs, tokens), files, command.

Models are tiny (32-64 px, batch 2, one or two rounds). Wall-clock figures are only checked for
being positive numbers, never compared: they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math

import pytest
import timm
import torch

import histotoken  # noqa: F401  (registers our model families into timm)
from histotoken.engine.benchmark import (
    ROW_FIELDS,
    PeakMemorySampler,
    _with_merge_r,
    benchmark_models,
    read_benchmark,
    write_benchmark,
)
from histotoken.models.factory import create_model, parse_model_spec

FAST = dict(batch_size=2, precision="32-true", warmup_iters=1, latency_iters=2, throughput_iters=1)


def _token_merging_available() -> bool:
    from histotoken.models import apply_token_merging

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=2)
    try:
        apply_token_merging(model, 1)
    except NotImplementedError:
        return False
    return True


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a busy machine two OpenMP threads can
    # wait on each other for 10x the work itself. No figure checked here depends on threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows(one_thread):
    # a small ViT first (the reference), a CNN, and a bigger ViT of the same layout
    specs = ["vit_tiny_patch16_224", "resnet18", "vit_small_patch16_224"]
    return benchmark_models(specs, img_size=32, num_classes=3, rounds=2, **FAST)


def test_rows_have_the_documented_columns_in_order_and_types(rows):
    assert len(rows) == 3
    for row in rows:
        assert tuple(row) == ROW_FIELDS
        assert isinstance(row["model"], str) and isinstance(row["model_name"], str)
        assert isinstance(row["model_kwargs"], dict)
        assert row["img_size"] == 32 and row["batch_size"] == 2
        assert row["precision"] == "32-true" and row["device"] == "cpu"
        assert all(isinstance(n, int) for n in row["tokens_per_block"])
        assert row["tokens_final"] is None or isinstance(row["tokens_final"], int)
        for field in ("params_m", "gflops", "latency_ms_median", "latency_ms_p90", "throughput_img_s",
                      "peak_memory_mb", "throughput_ratio"):
            assert isinstance(row[field], float) and math.isfinite(row[field]) and row[field] > 0, field
        assert row["latency_ms_p90"] >= row["latency_ms_median"]


def test_throughput_ratio_is_relative_to_the_first_model(rows):
    assert rows[0]["throughput_ratio"] == 1.0
    for row in rows[1:]:
        expected = row["throughput_img_s"] / rows[0]["throughput_img_s"]
        assert row["throughput_ratio"] == pytest.approx(expected, rel=1e-2)


def test_params_equal_the_models_parameter_count(rows):
    for row in rows:
        model = create_model(row["model_name"], num_classes=3, img_size=32)
        assert row["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=1e-3)


def test_gflops_are_positive_and_larger_for_the_bigger_vit(rows):
    tiny, cnn, small = rows
    assert min(tiny["gflops"], cnn["gflops"], small["gflops"]) > 0
    assert small["gflops"] > 2 * tiny["gflops"]  # width 384 vs 192: about 4x the matmul work


def test_tokens_per_block_of_a_timm_vit_are_prefix_plus_patches(rows):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32)
    expected = vit.num_prefix_tokens + vit.patch_embed.num_patches  # 1 + (32 / 16) ** 2 = 5
    assert rows[0]["tokens_per_block"] == [expected] * len(vit.blocks)
    assert rows[0]["tokens_final"] == expected


def test_a_cnn_has_no_token_counts(rows):
    assert rows[1]["tokens_per_block"] == [] and rows[1]["tokens_final"] is None


@pytest.mark.skipif(not timm.is_model("cnnprune_vit_tiny"), reason="cnnprune_vit_tiny not registered yet")
def test_gflops_and_tokens_fall_as_keep_ratio_falls():
    specs = [f"cnnprune_vit_tiny:keep_ratio={ratio}" for ratio in (1.0, 0.5, 0.25)]
    rows = benchmark_models(specs, img_size=64, rounds=1, **FAST)
    assert [row["model_kwargs"] for row in rows] == [{"keep_ratio": r} for r in (1.0, 0.5, 0.25)]
    gflops = [row["gflops"] for row in rows]
    tokens = [row["tokens_final"] for row in rows]
    assert gflops[0] > gflops[1] > gflops[2] > 0
    assert tokens[0] > tokens[1] > tokens[2]


@pytest.mark.skipif(not _token_merging_available(), reason="apply_token_merging not written yet")
def test_gflops_and_tokens_fall_as_merge_r_rises():
    specs = ["vit_tiny_patch16_224", "vit_tiny_patch16_224:merge_r=1", "vit_tiny_patch16_224:merge_r=2"]
    rows = benchmark_models(specs, img_size=64, rounds=1, **FAST)
    gflops = [row["gflops"] for row in rows]
    assert gflops[0] > gflops[1] > gflops[2] > 0
    assert rows[0]["tokens_per_block"] == [17] * 12  # 1 class token + (64 / 16) ** 2 patches
    assert sum(rows[1]["tokens_per_block"]) > sum(rows[2]["tokens_per_block"])
    assert rows[2]["tokens_final"] < rows[0]["tokens_final"]


def test_a_global_merge_r_shows_in_label_and_kwargs_unless_the_spec_sets_its_own():
    plain = _with_merge_r(parse_model_spec("deit_small_patch16_224"), 13)
    assert plain.label == "deit_small_patch16_224@merge_r=13" and plain.kwargs_dict == {"merge_r": 13}
    own = _with_merge_r(parse_model_spec("deit_small_patch16_224:merge_r=4"), 13)
    assert own.kwargs_dict == {"merge_r": 4}
    assert _with_merge_r(parse_model_spec("resnet18"), 0).label == "resnet18"


def test_written_csv_and_json_hold_the_same_rows(rows, tmp_path):
    csv_path, json_path = write_benchmark(rows, tmp_path / "sub" / "bench.csv")
    assert csv_path == tmp_path / "sub" / "bench.csv" and json_path == tmp_path / "sub" / "bench.json"
    with csv_path.open(newline="") as handle:
        records = list(csv.DictReader(handle))
    assert tuple(records[0]) == ROW_FIELDS
    assert [r["model"] for r in records] == [row["model"] for row in rows]
    assert json.loads(records[0]["tokens_per_block"]) == rows[0]["tokens_per_block"]
    assert json.loads(records[1]["model_kwargs"]) == {} and records[1]["tokens_final"] == ""
    document = json.loads(json_path.read_text())
    assert {"cpu", "cores_logical", "torch", "device_name"} <= set(document["machine"])
    assert document["rows"] == rows
    assert read_benchmark(csv_path) == rows
    assert not list(csv_path.parent.glob("*.tmp"))  # temp files were renamed, not left behind
    plain_file = tmp_path / "plain.txt"
    plain_file.write_text("")  # the mode any new file gets here (not the temp file's owner-only 0600)
    assert csv_path.stat().st_mode & 0o777 == json_path.stat().st_mode & 0o777 == plain_file.stat().st_mode & 0o777


def test_peak_memory_sampler_sees_a_64_mb_allocation():
    with PeakMemorySampler("cpu") as sampler:
        block = torch.ones(16 * 2**20)  # 64 MiB of float32, pages touched by the fill
        del block
    assert sampler.growth_bytes > 48 * 2**20


def test_unknown_model_is_a_clear_value_error():
    with pytest.raises(ValueError, match="unknown model"):
        benchmark_models(["no_such_model_xyz"], img_size=32, rounds=1, **FAST)


def _benchmark_args(tmp_path) -> list[str]:
    return ["benchmark", "--model", "vit_tiny_patch16_224", "--model", "resnet18", "--img-size", "32",
            "--batch-size", "2", "--rounds", "1", "--precision", "32-true", "--out", str(tmp_path / "b.csv")]


def _all_commands_exist() -> bool:
    from histotoken.cli.main import COMMANDS

    return all(importlib.util.find_spec(f"histotoken.cli.{name}") is not None for name in COMMANDS)


def _run_command(argv: list[str]) -> int:
    """``histotoken.cli.main.main`` once every command exists; until then this command alone."""
    if _all_commands_exist():
        from histotoken.cli.main import main

        return main(argv)
    from histotoken.cli import benchmark as command

    parser = argparse.ArgumentParser(prog="histotoken")
    command.add_parser(parser.add_subparsers(dest="command"))
    return command.run(parser.parse_args(argv))


def test_benchmark_command_prints_a_table_and_writes_csv_and_json(tmp_path, capsys):
    assert _run_command(_benchmark_args(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "speed vs first" in printed and "resnet18" in printed and str(tmp_path / "b.csv") in printed
    written = read_benchmark(tmp_path / "b.csv")
    assert [row["model"] for row in written] == ["vit_tiny_patch16_224", "resnet18"]
    assert (tmp_path / "b.json").is_file()


def test_benchmark_command_explains_its_figures_with_an_example(capsys):
    with pytest.raises(SystemExit):
        _run_command(["benchmark", "--help"])
    text = capsys.readouterr().out
    assert "histotoken benchmark --model deit_small_patch16_224" in text
    for figure in ("GFLOPs/img", "latency ms", "img/s", "peak MB", "speed vs first", "tokens_per_block"):
        assert figure in text


def test_deit_small_counts_attention_on_every_machine():
    # 9.2 GFLOPs at 224 px (multiply-add = 2), attention matmuls included, whichever fused kernel runs
    import timm

    from histotoken.engine.benchmark import count_flops_and_tokens

    model = timm.create_model("deit_small_patch16_224").eval()
    gflops, tokens, _ = count_flops_and_tokens(model, torch.randn(1, 3, 224, 224))
    assert 9.1 <= gflops <= 9.3
    assert tokens == [197] * 12
