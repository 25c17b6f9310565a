"""histotoken export: every family exports to ONNX, TorchScript and a timm folder that reproduce PyTorch.

Tiny models at 32 px (patch 8 where the family has a patch size; DeiT-Tiny cut to 2 blocks). The reference is the PyTorch
model itself; the exported model runs in onnxruntime, in a reloaded TorchScript file, or as a timm
model rebuilt from the folder, so a wrong export shows up as a logit difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import histotoken  # noqa: F401  (registers our families)
from histotoken.engine.export import ExportError, ExportInfo, export_model, export_run
from histotoken.formats import EXPORT_MANIFEST, ONNX_FILE, TIMM_CONFIG_FILE, TIMM_WEIGHTS_FILE
from tests.run_fixture import make_run, write_image

IMG = 32
CLASSES = ("benign", "malignant", "other")
TOLERANCE = 1e-4

# (label, timm name, model kwargs)
FAMILIES = [
    ("resnet18", "resnet18", {}),
    ("deit_tiny", "deit_tiny_patch16_224", {"patch_size": 8, "depth": 2}),
    ("tokenlearner_vit_tiny", "tokenlearner_vit_tiny", {"patch_size": 8}),
    ("tokenmixer_tiny", "tokenmixer_tiny", {}),
    ("cnnprune_vit_tiny", "cnnprune_vit_tiny", {"patch_size": 8, "keep_ratio": 0.5}),
    ("deit_tiny_merged", "deit_tiny_patch16_224", {"patch_size": 8, "depth": 2, "merge_r": 2}),
    ("mixer_tiny", "mixer_tiny", {"patch_size": 8}),
    ("convmixer_tiny", "convmixer_tiny", {}),
    ("tokenlearner_vit_mini", "tokenlearner_vit_mini", {}),
    ("vit_mini_patch4_32", "vit_mini_patch4_32", {}),
]
OUR_DONOR_FAMILIES = {
    "tokenlearner_vit_tiny", "tokenmixer_tiny", "cnnprune_vit_tiny", "tokenlearner_vit_mini", "vit_mini_patch4_32",
}


def test_every_registered_family_is_exported_here():
    modules = ("tokenlearner_vit", "tokenmixer", "cnnprune_vit", "small_baselines")
    registered = {name for module in modules for name in timm.list_models(module=module)}
    covered = {name for _, name, _ in FAMILIES}
    # _small variants are the _tiny code at another width
    assert {name for name in registered if not name.endswith("_small")} <= covered


def build(name: str, kwargs: dict) -> nn.Module:
    """A model whose logits depend on its input, so that a parity check can fail.

    Freshly built, some cannot: timm zeroes mixer_tiny's head (every logit 0), and convmixer_tiny's
    features vary by ~1e-5 across images while its BatchNorm layers hold the initial statistics
    (logits vary by 3e-6, below the tolerance). So BatchNorm statistics come from a seeded batch and
    the head gets seeded random weights; :func:`logit_spread` checks the result.
    """
    from histotoken.models.factory import ModelSpec, create_model

    torch.manual_seed(0)
    model = create_model(ModelSpec(name, tuple(sorted(kwargs.items()))), len(CLASSES), IMG)
    generator = torch.Generator().manual_seed(1)
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        if norms:
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # cumulative average over the calibration batch
            model.train()(torch.randn(16, 3, IMG, IMG, generator=generator))
        head = model.get_classifier()
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 2 / head.in_features**0.5)
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.1)
    return model.eval()


def logit_spread(model: nn.Module) -> float:
    """Largest deviation of a logit from its mean over the check images: what a parity check can see."""
    from histotoken.engine.export import normalise

    images = normalise(check_images(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        logits = model(images)
    return float((logits - logits.mean(dim=0)).abs().max())


@pytest.mark.parametrize(("name", "kwargs"), [pytest.param(name, kwargs, id=label) for label, name, kwargs in FAMILIES])
def test_every_exported_model_has_logits_that_vary_far_beyond_the_tolerance(name, kwargs):
    # otherwise a parity test on it passes whatever the export does
    assert logit_spread(build(name, kwargs)) > 100 * TOLERANCE


def info_for(name: str, kwargs: dict) -> ExportInfo:
    source = {"merge_r": kwargs.get("merge_r", 0)}
    return ExportInfo(name, CLASSES, IMG, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), kwargs, source)


def check_images(count: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, IMG, IMG), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))


def _cases(fmt: str, expected_failures: dict[str, str]):
    for label, name, kwargs in FAMILIES:
        marks = []
        if label in expected_failures:
            marks = [pytest.mark.xfail(raises=ExportError, strict=False, reason=expected_failures[label])]
        yield pytest.param(name, kwargs, id=label, marks=marks)


@pytest.mark.parametrize(("name", "kwargs"), _cases("onnx", {}))
def test_onnx_export_reproduces_pytorch_logits(name, kwargs, tmp_path):
    model = build(name, kwargs)
    assert logit_spread(model) > 100 * TOLERANCE  # the check below can fail
    result = export_model(model, "onnx", tmp_path, info_for(name, kwargs), check_images())
    assert result.max_abs_diff <= TOLERANCE
    assert (tmp_path / ONNX_FILE).is_file()


@pytest.mark.parametrize(("name", "kwargs"), _cases("torchscript", {}))
def test_torchscript_export_reproduces_pytorch_logits(name, kwargs, tmp_path):
    model = build(name, kwargs)
    assert logit_spread(model) > 100 * TOLERANCE  # the check below can fail
    result = export_model(model, "torchscript", tmp_path, info_for(name, kwargs), check_images())
    assert result.max_abs_diff <= TOLERANCE
    assert result.method in ("torch.jit.script", "torch.jit.trace")
    if name in OUR_DONOR_FAMILIES:  # our families script (no trace fallback: data-dependent paths stay intact)
        assert result.method == "torch.jit.script"
    # the reloaded file also runs at a batch size it was not traced with
    loaded = torch.jit.load(str(result.model_file))
    assert loaded(torch.zeros(5, 3, IMG, IMG)).shape == (5, len(CLASSES))


@pytest.mark.parametrize(("name", "kwargs"), _cases("timm", {}))
def test_timm_folder_loads_with_timm_create_model(name, kwargs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing may come from the network
    model = build(name, kwargs)
    assert logit_spread(model) > 100 * TOLERANCE  # the check below can fail
    result = export_model(model, "timm", tmp_path, info_for(name, kwargs), check_images())
    assert result.max_abs_diff <= TOLERANCE
    config = json.loads((tmp_path / TIMM_CONFIG_FILE).read_text())
    assert config["architecture"] == name
    assert config["num_classes"] == len(CLASSES)
    assert config["label_names"] == list(CLASSES)
    assert config["pretrained_cfg"]["input_size"] == [3, IMG, IMG]
    # loaded the way a user would, from the folder alone
    args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    loaded = timm.create_model(
        name, pretrained=True, num_classes=len(CLASSES),
        pretrained_cfg_overlay=dict(file=str(tmp_path / TIMM_WEIGHTS_FILE), num_classes=len(CLASSES)), **args,
    ).eval()
    own = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(own[k], v) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("label", sorted(OUR_DONOR_FAMILIES))
def test_timm_folder_of_our_family_loads_through_local_dir_without_donors(label, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a donor fetch would fail
    _, name, kwargs = next(family for family in FAMILIES if family[0] == label)
    model = build(name, kwargs)
    export_model(model, "timm", tmp_path, info_for(name, kwargs), check_images())
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["tokenlearner_vit_mini", "vit_mini_patch4_32"])
def test_mini_families_without_a_weights_file_still_refuse_pretrained(name):
    with pytest.raises(ValueError, match="no published pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_timm_folder_loads_through_local_dir(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = build("resnet18", {})
    export_model(model, "timm", tmp_path, info_for("resnet18", {}), check_images())
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.pretrained_cfg["label_names"] == list(CLASSES)


class _SearchSorted(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        edges = torch.tensor([-1.0, 0.0, 1.0])
        return torch.searchsorted(edges, x.flatten(1)[:, :3].contiguous()).float()


class _RepeatedIndexAdd(nn.Module):
    """index_add onto one row twice: PyTorch sums both, torch's ONNX symbolic keeps only one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(1)[:, :3]  # (B, 3)
        return rows.new_zeros(rows.shape).index_add(1, torch.tensor([0, 0, 1]), rows)


def test_unsupported_operator_error_names_the_operator(tmp_path):
    with pytest.raises(ExportError, match=r"aten::searchsorted"):
        export_model(_SearchSorted(), "onnx", tmp_path, info_for("toy", {}), check_images())
    assert not (tmp_path / ONNX_FILE).exists()


def test_export_that_changes_the_logits_is_refused_and_removed(tmp_path):
    with pytest.raises(ExportError, match="does not reproduce PyTorch"):
        export_model(_RepeatedIndexAdd(), "onnx", tmp_path, info_for("toy", {}), check_images())
    assert not (tmp_path / ONNX_FILE).exists() and not (tmp_path / EXPORT_MANIFEST).exists()


def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="onnx, torchscript, timm"):
        export_model(build("resnet18", {}), "pdf", tmp_path, info_for("resnet18", {}), check_images())


def test_cli_rejects_an_unknown_format(tmp_path, capsys):
    from histotoken.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path), "--format", "pdf"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_export_run_checks_on_test_images_and_records_the_run(tmp_path, capsys):
    from histotoken.cli.main import main

    images = [write_image(tmp_path / "data" / f"img{i}.png", seed=i) for i in range(3)]
    run = make_run(tmp_path / "run", "resnet18", CLASSES, IMG, test_images=images)
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "max |logit difference|" in out and "3 test images" in out
    manifest = json.loads((run / "export" / "onnx" / EXPORT_MANIFEST).read_text())
    assert manifest["class_names"] == list(CLASSES)
    assert manifest["img_size"] == IMG
    assert manifest["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert manifest["source"]["run_dir"] == str(run.resolve())
    assert manifest["check"]["source"] == "test images" and manifest["check"]["max_abs_diff"] <= TOLERANCE


def test_export_run_falls_back_to_random_images_without_the_data(tmp_path):
    run = make_run(tmp_path / "run", "resnet18", CLASSES, IMG, test_images=[tmp_path / "gone.png"])
    result = export_run(run, "torchscript", tmp_path / "out")
    assert result.check_source == "random images"
    assert (tmp_path / "out" / EXPORT_MANIFEST).is_file()


def test_timm_export_of_a_merged_model_keeps_merging_out_of_the_model_args(tmp_path):
    kwargs = {"patch_size": 8, "depth": 2, "merge_r": 2, "merge_mode": "pre_attention"}
    info = ExportInfo(
        "deit_tiny_patch16_224", CLASSES, IMG, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), kwargs,
        {"merge_r": 2, "merge_mode": "pre_attention"},
    )
    export_model(build("deit_tiny_patch16_224", kwargs), "timm", tmp_path, info, check_images())
    model_args = json.loads((tmp_path / TIMM_CONFIG_FILE).read_text())["model_args"]
    assert "merge_r" not in model_args and "merge_mode" not in model_args
    note = json.loads((tmp_path / EXPORT_MANIFEST).read_text())["token_merging"]
    assert note["in_file"] is False
    assert note["apply"] == "histotoken.models.apply_token_merging(model, 2, mode='pre_attention')"


def test_onnx_export_of_a_merged_vit_runs_at_other_batch_sizes(tmp_path):
    import onnxruntime

    kwargs = {"patch_size": 8, "depth": 2, "merge_r": 4}  # 16 patches: 4 merged per block, into shared targets
    model = build("deit_tiny_patch16_224", kwargs)
    export_model(model, "onnx", tmp_path, info_for("deit_tiny_patch16_224", kwargs), check_images())
    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))  # exported at batch 2
    from histotoken.models.records import record_tokens

    with torch.no_grad(), record_tokens(model) as record:
        expected = model(images)
    assert record.tokens_per_block == [17, 13]  # tokens were merged in the PyTorch reference
    exported = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    torch.testing.assert_close(exported, expected, atol=TOLERANCE, rtol=0)


class _Merge(nn.Module):
    """One bipartite matching step on the tokens themselves (1 prefix token): merged tokens and sizes."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from histotoken.layers.token_merging import bipartite_soft_matching

        return bipartite_soft_matching(x, 3, num_prefix_tokens=1)(x)


def test_onnx_token_merge_sums_several_tokens_into_one_at_any_batch_size(tmp_path):
    import onnxruntime

    def tokens(batch: int, seed: int) -> torch.Tensor:
        # B tokens (odd positions 1, 3, 5, 7) are the unit vectors; every A token lies near the first of them
        x = torch.zeros(batch, 9, 4)
        x[:, 1::2] = torch.eye(4)
        x[:, 2::2] = torch.tensor([1.0, 0, 0, 0]) + 0.1 * torch.rand(batch, 4, 4, generator=torch.Generator().manual_seed(seed))
        return x

    path = tmp_path / "merge.onnx"
    torch.onnx.export(
        _Merge(), (tokens(2, 0),), str(path), dynamo=False, opset_version=17, input_names=["x"],
        output_names=["merged", "size"], dynamic_axes={"x": {0: "batch"}, "merged": {0: "batch"}, "size": {0: "batch"}},
    )
    x = tokens(3, 1)
    merged, size = _Merge()(x)
    assert size[:, :, 0].max(dim=1).values.tolist() == [4.0, 4.0, 4.0]  # three A tokens joined one B token
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_merged, onnx_size = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_size), size, atol=0, rtol=0)
    torch.testing.assert_close(torch.from_numpy(onnx_merged), merged, atol=1e-6, rtol=0)


def test_export_out_with_the_format_suffix_writes_that_file_and_a_manifest_named_after_it(tmp_path, capsys):
    from histotoken.cli.main import main

    run = make_run(tmp_path / "run", "resnet18", CLASSES, IMG, test_images=[tmp_path / "gone.png"])
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "out" / "r18.onnx")]) == 0
    assert (tmp_path / "out" / "r18.onnx").is_file()  # a file, not a folder named r18.onnx
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["r18.export.json", "r18.onnx"]
    assert json.loads((tmp_path / "out" / "r18.export.json").read_text())["file"] == "r18.onnx"
    assert "r18.onnx" in capsys.readouterr().out

    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "ts" / "model.pt")]) == 0
    loaded = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    assert loaded(torch.zeros(2, 3, IMG, IMG)).shape == (2, len(CLASSES))
    assert (tmp_path / "ts" / "model.export.json").is_file()


def test_export_out_without_a_suffix_is_a_folder(tmp_path):
    run = make_run(tmp_path / "run", "resnet18", CLASSES, IMG, test_images=[tmp_path / "gone.png"])
    result = export_run(run, "onnx", tmp_path / "exported")
    assert result.model_file == tmp_path / "exported" / ONNX_FILE
    assert sorted(path.name for path in (tmp_path / "exported").iterdir()) == [EXPORT_MANIFEST, ONNX_FILE]


def test_export_out_with_another_formats_suffix_is_refused(tmp_path, capsys):
    from histotoken.cli.main import main

    run = make_run(tmp_path / "run", "resnet18", CLASSES, IMG, test_images=[tmp_path / "gone.png"])
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--format onnx" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "model.onnx").exists()


def _export_onnx_once(tmp_path) -> tuple[bytes, bytes]:
    model = build("resnet18", {})
    export_model(model, "onnx", tmp_path, info_for("resnet18", {}), check_images())
    return (tmp_path / ONNX_FILE).read_bytes(), (tmp_path / EXPORT_MANIFEST).read_bytes()


def test_a_failed_re_export_leaves_the_previous_export_whole(tmp_path):
    model_bytes, manifest_bytes = _export_onnx_once(tmp_path)
    with pytest.raises(ExportError, match="does not reproduce PyTorch"):
        export_model(_RepeatedIndexAdd(), "onnx", tmp_path, info_for("toy", {}), check_images())
    assert (tmp_path / ONNX_FILE).read_bytes() == model_bytes
    assert (tmp_path / EXPORT_MANIFEST).read_bytes() == manifest_bytes
    assert sorted(path.name for path in tmp_path.iterdir()) == [EXPORT_MANIFEST, ONNX_FILE]  # no temporary left


def test_an_export_killed_while_writing_never_tears_the_model_beside_its_manifest(tmp_path, monkeypatch):
    import histotoken.engine.export as export_module

    model_bytes, manifest_bytes = _export_onnx_once(tmp_path)

    def killed_mid_write(model, path, example, exporter="torchscript"):
        Path(path).write_bytes(b"\x08\x07half an onnx")  # torn bytes, then the process stops
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "export_onnx", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        export_model(build("resnet18", {}), "onnx", tmp_path, info_for("resnet18", {}), check_images())
    assert (tmp_path / ONNX_FILE).read_bytes() == model_bytes
    assert (tmp_path / EXPORT_MANIFEST).read_bytes() == manifest_bytes


def test_a_full_disk_during_a_torchscript_export_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    def disk_full(module, path):
        Path(path).write_bytes(b"PK\x03\x04 eight megabytes of zip, cut short")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch.jit, "save", disk_full)
    with pytest.raises(ExportError):
        export_model(build("resnet18", {}), "torchscript", tmp_path, info_for("resnet18", {}), check_images())
    assert list(tmp_path.iterdir()) == []
