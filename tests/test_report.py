"""`histotoken report`: report.html / report.md / figures rebuilt from a study folder's files."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histotoken.reporting import build_report, pareto_front, plots, tables
from tests.study_fixture import DOMAINS, FAILED_RUN, MODELS, TWO_STAGE_RUN, run_id_of, write_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
SECTION_HEADINGS = [
    "Summary",
    "What was run",
    "In-domain performance and cost",
    "Cross-magnification generalisation",
    "Accuracy versus cost",
    "Per-run details",
    "Dataset preview",
    "Failed runs",
]
BANNER = "Every number in this report comes from procedurally generated images"


def markdown_table_after(markdown: str, heading: str) -> pd.DataFrame:
    """The first Markdown table after the line ``heading``, as text cells."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    header, _separator, *body = rows
    return pd.DataFrame(body, columns=header)


def small_study(root: Path, **overrides) -> Path:
    """One model, one domain: the cheapest study that still has every file."""
    options = dict(models=MODELS[:1], train_domains=("100",), test_domains=("100",), failed_run=None)
    options.update(overrides)
    return write_study(root, **options)


@pytest.fixture(scope="module")
def full_study(tmp_path_factory) -> tuple[Path, str, str]:
    study = write_study(tmp_path_factory.mktemp("full"))
    html_path = build_report(study)
    return study, html_path.read_text(encoding="utf-8"), (study / "report.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- the full report


def test_report_html_is_self_contained(full_study):
    study, html, _ = full_study
    assert (study / "report.html").is_file()
    assert 'src="http' not in html and "<script" not in html and "<link" not in html
    assert not re.search(r'(href|src)="(https?:)?//', html)
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(sources) == len(list((study / "figures").glob("*.*")))
    assert all(re.match(r"data:image/(png|jpeg);base64,", source) for source in sources)
    for source in sources:
        data = base64.b64decode(source.split(",", 1)[1])
        assert data[:8] == PNG_SIGNATURE if source.startswith("data:image/png") else data[:3] == JPEG_SIGNATURE


def test_report_has_every_section_and_a_how_to_read_line_per_figure(full_study):
    _, html, markdown = full_study
    for heading in SECTION_HEADINGS:
        assert f"<h2>{heading}</h2>" in html
        assert f"\n## {heading}\n" in markdown
    assert html.count("How to read this:") == html.count("<img ")
    assert markdown.count("*How to read this:*") == markdown.count("![")


def test_figures_are_png_files_referenced_by_the_markdown(full_study):
    study, _, markdown = full_study
    referenced = re.findall(r"\]\(figures/([^)]+)\)", markdown)
    written = sorted(path.name for path in (study / "figures").glob("*.*"))
    assert sorted(referenced) == written
    for name in written:
        signature = JPEG_SIGNATURE if name.endswith(".jpg") else PNG_SIGNATURE
        assert (study / "figures" / name).read_bytes()[:len(signature)] == signature
    finished_runs = len(MODELS) * len(DOMAINS) - 1
    assert len([name for name in written if name.endswith("_confusion.png")]) == finished_runs
    assert len([name for name in written if name.endswith("_curves.png")]) == finished_runs
    for expected in ("cross_domain_heatmap_subtype.png", "in_vs_cross_domain_subtype.png",
                     "f1_vs_throughput_img_s_subtype.png", "f1_vs_gflops_subtype.png", "dataset_preview.jpg"):
        assert expected in written


@pytest.mark.parametrize("model", [label for label, *_ in MODELS])
def test_cross_domain_matrix_in_markdown_equals_results_csv(full_study, model):
    study, _, markdown = full_study
    results = pd.read_csv(study / "results.csv", dtype={"train_domain": str, "test_domain": str})
    f1 = results[(results["model"] == model) & (results["metric"] == "macro_f1")]
    expected = f1.set_index(["train_domain", "test_domain"])["value"]
    # The fixture's shift is asymmetric, so a transposed matrix cannot pass.
    assert abs(expected[("100", "400")] - expected[("400", "100")]) > 0.01

    table = markdown_table_after(markdown, f"### Macro-F1 matrix: {model}")
    assert list(table.columns) == ["trained on"] + [f"tested on {d}" for d in DOMAINS]
    trained = {train for train, _ in expected.index}
    assert list(table["trained on"]) == [d for d in DOMAINS if d in trained]
    for _, row in table.iterrows():
        for test_domain in DOMAINS:
            shown = float(row[f"tested on {test_domain}"])
            assert shown == pytest.approx(expected[(row["trained on"], test_domain)], abs=5e-4)


def test_headline_table_shows_in_domain_metrics_with_intervals_and_efficiency(full_study):
    study, _, markdown = full_study
    results = pd.read_csv(study / "results.csv", dtype={"train_domain": str, "test_domain": str})
    table = markdown_table_after(markdown, "## In-domain performance and cost")
    assert len(table) == len(MODELS) * len(DOMAINS) - 1  # every finished run once, in-domain only
    row = table[(table["model"] == "deit_small_patch16_224") & (table["train = test"] == "400")].iloc[0]
    cell = results[(results["model"] == "deit_small_patch16_224") & (results["train_domain"] == "400")
                   & (results["test_domain"] == "400") & (results["metric"] == "macro_f1")].iloc[0]
    assert row["macro-F1"] == f"{cell.value:.2f} [{cell.ci_low:.2f}, {cell.ci_high:.2f}]"
    assert re.fullmatch(r"\d\.\d\d", row["patient-level accuracy"])  # no interval in the files
    assert "throughput (img/s)" not in table.columns  # cost is per model, not per model x domain
    efficiency = pd.read_csv(study / "efficiency.csv").set_index("model")
    cost = markdown_table_after(markdown, "*Cost of each model, measured once per model*").set_index("model")
    assert list(cost.index) == [label for label, *_ in MODELS]  # one row per model
    assert float(cost.at["deit_small_patch16_224", "throughput (img/s)"]) == \
        efficiency.at["deit_small_patch16_224", "throughput_img_s"]
    assert cost.at["deit_small_patch16_224", "tokens at head"] == "197"
    assert cost.at["resnet18", "tokens at head"] == "—"
    section = markdown.split("## In-domain performance and cost")[1].split("\n## ")[0]
    assert section.count("| throughput (img/s) |") == 1


def test_asymmetry_and_mixed_training_tables_pair_the_right_cells(full_study):
    study, _, markdown = full_study
    results = pd.read_csv(study / "results.csv", dtype={"train_domain": str, "test_domain": str})
    f1 = results[results["metric"] == "macro_f1"].set_index(["model", "train_domain", "test_domain"])["value"]
    asymmetry = markdown_table_after(markdown, "### Directional asymmetry").set_index("model")
    assert float(asymmetry.at["resnet18", "F1 low -> high"]) == pytest.approx(f1[("resnet18", "100", "400")], abs=5e-4)
    assert float(asymmetry.at["resnet18", "F1 high -> low"]) == pytest.approx(f1[("resnet18", "400", "100")], abs=5e-4)

    mixed = markdown_table_after(markdown, "### Training on mixed magnifications")
    failed_model = FAILED_RUN[0]
    assert failed_model not in set(mixed["model"])  # its mixed run failed
    row = mixed[(mixed["model"] == "resnet18") & (mixed["test domain"] == "400")].iloc[0]
    assert float(row["F1 mixed"]) == pytest.approx(f1[("resnet18", "100+400", "400")], abs=5e-4)
    assert float(row["F1 train 400"]) == pytest.approx(f1[("resnet18", "400", "400")], abs=5e-4)
    best_single = max(f1[("resnet18", "100", "400")], f1[("resnet18", "400", "400")])
    assert float(row["mixed - best single"]) == pytest.approx(f1[("resnet18", "100+400", "400")] - best_single, abs=1e-3)


def test_failed_run_is_listed_with_its_error_and_left_out_of_per_run_figures(full_study):
    study, html, markdown = full_study
    failed_id = run_id_of(*FAILED_RUN)
    failed = markdown_table_after(markdown, "## Failed runs")
    assert list(failed["run_id"]) == [failed_id]
    assert "loss is NaN" in failed["error"].iloc[0]
    assert f"{failed_id}: " not in markdown.split("## Per-run details")[1].split("\n## ")[0]


def test_two_stage_run_curves_mark_the_stage_boundary():
    metrics = pd.DataFrame({
        "stage": ["head", "full", "full"], "epoch": [0, 1, 2],
        "train/loss": [2.0, 1.5, 1.0], "val/loss": [2.1, 1.6, 1.2], "val/macro_f1": [0.3, 0.5, 0.6],
    })
    figure = plots.training_curves_figure(metrics, "two stages")
    for ax in figure.axes[:2]:
        vertical = [line.get_xdata()[0] for line in ax.get_lines() if len(set(line.get_xdata())) == 1
                    and len(line.get_xdata()) == 2]
        assert vertical == [1.5]  # between epoch 1 (head) and epoch 2 (full)
    single = plots.training_curves_figure(metrics.assign(stage="train"), "one stage")
    assert not any(len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2
                   for ax in single.axes for line in ax.get_lines())


# ----------------------------------------------------------------------------- table functions


def test_pareto_front_keeps_only_undominated_models():
    table = pd.DataFrame({
        "model": ["a", "b", "c", "d", "e", "f"],
        "macro_f1": [0.90, 0.80, 0.70, 0.85, 0.85, 0.95],
        "throughput_img_s": [10.0, 50.0, 40.0, 50.0, 50.0, np.nan],
        "gflops": [4.0, 1.0, 0.5, 2.0, 2.0, 0.1],
    })
    # b is dominated by d (same speed, more accurate); c by b; d and e tie, so neither dominates;
    # f has no throughput, so it is not on the throughput front and dominates nobody there.
    front = pareto_front(table, maximize=["macro_f1", "throughput_img_s"])
    assert list(table["model"][front]) == ["a", "d", "e"]
    # Cheaper is better for GFLOPs: f (most accurate and cheapest) dominates everyone.
    front = pareto_front(table, maximize=["macro_f1"], minimize=["gflops"])
    assert list(table["model"][front]) == ["f"]
    assert front.index.equals(table.index)


def test_cross_domain_matrix_rows_are_train_and_columns_test_domains():
    results = pd.DataFrame({
        "run_id": ["r1", "r1", "r2", "r2", "r1b"], "model": ["m"] * 5, "task": ["subtype"] * 5,
        "train_domain": ["100", "100", "400", "400", "100"], "test_domain": ["100", "400", "100", "400", "400"],
        "seed": ["0", "0", "0", "0", "1"], "metric": ["macro_f1"] * 5,
        "value": [0.9, 0.5, 0.6, 0.8, 0.7], "ci_low": [np.nan] * 5, "ci_high": [np.nan] * 5,
    })
    matrix = tables.cross_domain_matrix(tables.mean_over_seeds(results), "m", "subtype")
    assert list(matrix.index) == ["100", "400"] and list(matrix.columns) == ["100", "400"]
    assert matrix.at["100", "400"] == pytest.approx(0.6)  # mean of seeds 0 and 1 for 100 -> 400
    assert matrix.at["400", "100"] == pytest.approx(0.6)
    assert matrix.at["400", "400"] == pytest.approx(0.8)


def test_domains_sort_by_magnification_then_mixed():
    assert tables.sort_domains(["400", "all", "100+400", "40", "100", "200"]) == [
        "40", "100", "200", "400", "100+400", "all"
    ]


# ----------------------------------------------------------------------------- degraded studies


@pytest.mark.parametrize("synthetic", [True, False])
def test_synthetic_banner_appears_iff_dataset_json_says_synthetic(tmp_path, synthetic):
    study = small_study(tmp_path, synthetic=synthetic)
    html = build_report(study).read_text(encoding="utf-8")
    markdown = (study / "report.md").read_text(encoding="utf-8")
    assert (BANNER in html) is synthetic
    assert (BANNER in markdown) is synthetic
    assert ("Kind: synthetic" in markdown) is synthetic


def test_missing_efficiency_csv_gives_a_note_not_a_crash(tmp_path):
    study = small_study(tmp_path, models=MODELS[:2], with_efficiency=False)
    build_report(study)
    markdown = (study / "report.md").read_text(encoding="utf-8")
    in_domain = markdown.split("## In-domain performance and cost")[1].split("## Cross-magnification")[0]
    cost = markdown.split("## Accuracy versus cost")[1].split("## Per-run details")[0]
    assert "efficiency.csv is missing" in in_domain and "efficiency.csv is missing" in cost
    assert "throughput" not in markdown_table_after(markdown, "## In-domain performance and cost").columns
    assert not list((study / "figures").glob("f1_vs_*.png"))


def test_single_model_single_domain_study_renders_with_notes(tmp_path):
    study = small_study(tmp_path)
    build_report(study)
    markdown = (study / "report.md").read_text(encoding="utf-8")
    for note in ("single train/test cell", "this study has none", "No mixed train domain",
                 "Fewer than two models"):
        assert note in markdown
    run_id = run_id_of("resnet18", "100")
    assert {path.name for path in (study / "figures").glob("*.png")} == {
        f"run_{run_id}_confusion.png", f"run_{run_id}_curves.png",
    }
    assert (study / "figures" / "dataset_preview.jpg").read_bytes()[:3] == JPEG_SIGNATURE


def test_missing_images_and_run_files_degrade_to_notes(tmp_path):
    study = small_study(tmp_path, with_images=False)
    run_dir = study / "runs" / run_id_of("resnet18", "100")
    (run_dir / "eval" / "100.json").unlink()
    (run_dir / "metrics.csv").unlink()
    (study / "runs.csv").unlink()
    (study / "dataset.json").unlink()
    build_report(study)
    markdown = (study / "report.md").read_text(encoding="utf-8")
    assert "were not found" in markdown.split("## Dataset preview")[1]
    assert "no confusion matrix for this run" in markdown
    assert "no training curves for this run" in markdown
    assert "runs.csv is missing" in markdown.split("## Failed runs")[1]
    assert "dataset.json is missing" in markdown
    assert not list((study / "figures").glob("*.png"))


def test_folder_without_results_csv_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="histotoken grid") as raised:
        build_report(tmp_path)
    assert str(tmp_path) in str(raised.value) and "results.csv" in str(raised.value)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_report(tmp_path / "missing")


# ----------------------------------------------------------------------------- command line


def test_cli_writes_to_out_and_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    from histotoken.cli import main as cli_main

    monkeypatch.setattr(cli_main, "COMMANDS", ["report"])  # the other commands live in other modules
    study = small_study(tmp_path)
    out = tmp_path / "elsewhere" / "study_report.html"
    assert cli_main.main(["report", str(study), "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".md").is_file() and (out.parent / "figures").is_dir()
    assert str(out) in capsys.readouterr().out

    assert cli_main.main(["report", str(tmp_path / "elsewhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "results.csv" in error and "histotoken grid" in error


def test_two_stage_fixture_run_is_the_one_with_stages(full_study):
    study, _, markdown = full_study
    run_id = run_id_of(*TWO_STAGE_RUN)
    section = markdown.split(f"### {run_id}: ")[1].split("\n### ")[0]
    assert "stages: 1, 2" in section


def test_reporting_modules_import_neither_torch_nor_pyplot():
    # `import histotoken` registers the model families (torch, timm); the reporting code itself must
    # not need them, so load it under a bare package stub and list what got imported.
    package_dir = Path(tables.__file__).resolve().parents[1]
    code = (
        "import sys, types\n"
        f"package = types.ModuleType('histotoken'); package.__path__ = [{str(package_dir)!r}]\n"
        "sys.modules['histotoken'] = package\n"
        "import histotoken.reporting, histotoken.cli.report\n"
        "print(sorted(m for m in ('torch', 'timm', 'lightning', 'matplotlib.pyplot') if m in sys.modules))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the words of the data


def visible_text(html: str) -> str:
    """The report's text as a reader sees it: tags removed, the spec.yaml dump left out (it is the file)."""
    import html as html_module

    html = re.sub(r"<pre>.*?</pre>", " ", html, flags=re.DOTALL)
    html = re.sub(r'<img [^>]*>', " ", html)
    return html_module.unescape(re.sub(r"<[^>]+>", " ", html))


BREAKHIS_WORDS = re.compile(r"patients|patient-|tumour class|magnification", re.IGNORECASE)


@pytest.mark.parametrize("recorded_kind", ["cifar10", "auto", None])
def test_a_cifar10_report_speaks_of_images_and_classes_not_patients_or_magnifications(tmp_path, recorded_kind):
    study = write_study(tmp_path, kind="cifar10", synthetic=False, recorded_kind=recorded_kind)
    html = build_report(study).read_text(encoding="utf-8")
    text = visible_text(html)
    assert BREAKHIS_WORDS.findall(text) == []
    assert "Cross-magnification" not in html and "Mixed-magnification" not in html
    assert 'id="cross_domain"' not in html
    assert "<h2>In-domain performance and cost</h2>" in html  # the other sections are all there
    kind = re.search(r"Kind: ([^.]*)\.", text).group(1)
    assert "BreakHis" not in kind and ("CIFAR" in kind if recorded_kind == "cifar10" else True)
    assert "72 images." in text  # 4 classes x 6 images x 3 sides, and no "from N groups": images are the groups
    assert "Split scheme (spec.yaml): scheme = patient," in text  # settings are quoted as written
    # the data set table has one count per class, no magnification column "0"
    markdown = (study / "report.md").read_text(encoding="utf-8")
    counts = markdown_table_after(markdown, "### Data set")
    assert list(counts.columns) == ["class", "images"]
    assert counts.set_index("class").loc["cat", "images"] == "18"


def test_a_breakhis_report_keeps_patients_tumour_classes_and_magnifications(full_study):
    _, html, _ = full_study
    text = visible_text(html)
    assert "patients" in text and "tumour class" in text and "magnification" in text
    assert re.search(r"Kind: [^.]*BreakHis", text)
    assert 'id="cross_domain"' in html and "Cross-magnification asymmetry" in html


def test_the_kind_of_data_is_inferred_from_old_split_files(tmp_path):
    """Run folders from before the kind was recorded: BreakHis magnifications -> BreakHis words."""
    from histotoken.reporting.study import load_study

    study = write_study(tmp_path, models=MODELS[:1], train_domains=("100",), test_domains=("100",), failed_run=None)
    assert load_study(study).kind == "breakhis"
    assert load_study(write_study(tmp_path / "c", kind="cifar10", synthetic=False)).kind == "cifar10"


@pytest.mark.parametrize(("paths", "magnifications", "kind"), [
    (["/d/cifar-10-batches-bin/data_batch_1.bin#0"], [0], "cifar10"),
    (["/d é/tiles/slide 1.parquet#12"], [0], "tiles"),
    (["/d/a.b/cat/1.png"], [0], "imagefolder"),
    (["/d/x/SOB_B_A-14-22549AB-100-001.png", "/d/y.png"], [100, 400], "breakhis"),
    (["/d/x.png", "/d/y.png"], [100, 0], "imagefolder"),
])
def test_the_kind_of_data_is_inferred_from_split_keys_and_magnifications(paths, magnifications, kind):
    from histotoken.reporting.words import infer_kind

    split = pd.DataFrame({"path": paths, "magnification": (magnifications * len(paths))[: len(paths)]})
    assert infer_kind([split], []) == kind


# ----------------------------------------------------------------------------- issue 18: summary, tables, figures

DIFFERENCE = r"([+-]\d\.\d+) \[([+-]\d\.\d+), ([+-]\d\.\d+)\]"


def summary_items(markdown: str) -> list[str]:
    section = markdown.split("## Summary\n")[1].split("\n## ")[0]
    return [line[2:] for line in section.splitlines() if line.startswith("- ")]


def test_the_summary_comes_first_under_the_banner_then_the_preview(full_study):
    _, html, markdown = full_study
    banner, summary, nav = html.index('class="banner"'), html.index('<section id="summary">'), html.index("<nav>")
    assert banner < summary < nav < html.index('<section id="preview">') < html.index('<section id="setup">')
    assert re.search(r"What was run: 3 model\(s\) .*runs: 8 finished, 1 failed; data: 96 synthetic images from 24 "
                     r"patients", markdown.split("## Summary")[1].split("\n## ")[0])


def test_the_summary_names_the_best_model_of_each_domain_as_results_csv_ranks_them(full_study):
    study, _, markdown = full_study
    results = pd.read_csv(study / "results.csv", dtype={"train_domain": str, "test_domain": str})
    f1 = results[(results["metric"] == "macro_f1") & (results["train_domain"] == results["test_domain"])]
    items = summary_items(markdown)
    for domain in DOMAINS:
        ranked = f1[f1["test_domain"] == domain].sort_values("value", ascending=False)
        best, runner_up = ranked.iloc[0], ranked.iloc[1]
        item = next(i for i in items if i.startswith(f"Trained and tested on {domain}: "))
        assert item.startswith(f"Trained and tested on {domain}: {best.model} ")
        assert f"{best.value:.2f} [{best.ci_low:.2f}, {best.ci_high:.2f}]" in item
        assert runner_up.model in item
        difference = float(re.search(DIFFERENCE, item)[1])
        assert difference == pytest.approx(best.value - runner_up.value, abs=1e-3)  # one seed: the point values


def test_the_summary_states_a_direction_only_where_the_interval_excludes_zero(full_study):
    _, _, markdown = full_study
    items = summary_items(markdown)
    topics = {item.split(":")[0] for item in items}
    assert {"Cross-magnification", "Mixed-magnification training", "Token efficiency"} <= topics
    assert any(item.startswith("Cost relative to resnet18") for item in items)
    resolved = unresolved = 0
    for item in items:
        for clause in re.split(r"; |, but ", item):
            found = re.search(DIFFERENCE, clause)
            magnitude = re.search(r"(?:loses|gains) (\d\.\d+) \[(\d\.\d+), (\d\.\d+)\]", clause)
            if magnitude:  # "loses 0.206 [0.015, 0.373]": a resolved size, printed without its sign
                assert 0 < float(magnitude[2]) <= float(magnitude[1]) <= float(magnitude[3])
                resolved += 1
            elif found:
                low, high = float(found[2]), float(found[3])
                if "not resolved" in clause or "no loss is resolved" in item:
                    assert low <= 0 <= high, clause
                    unresolved += 1
                else:
                    assert low > 0 or high < 0, clause
                    resolved += 1
    assert resolved and unresolved  # the fixture has both kinds


def test_cost_sentence_divides_by_the_reference_model_s_measurement(full_study):
    study, _, markdown = full_study
    efficiency = pd.read_csv(study / "efficiency.csv").set_index("model")
    item = next(i for i in summary_items(markdown) if i.startswith("Cost relative to resnet18"))
    ratio = efficiency.at["deit_small_patch16_224", "gflops"] / efficiency.at["resnet18", "gflops"]
    assert f"deit_small_patch16_224 {ratio:.2f}x the GFLOPs" in item


def test_paired_differences_are_one_table_per_model_with_caption_above_and_a_verdict(full_study):
    _, html, markdown = full_study
    section = markdown.split("### Paired differences against resnet18")[1].split("\n### ")[0]
    assert "is better than" not in markdown and "the difference between" not in markdown  # no repeated sentences
    for model in ("deit_small_patch16_224", "cnnprune_vit_small@keep_ratio=0.5"):
        caption = f"*{model} minus resnet18: macro-F1 difference per train x test cell*"
        assert caption in section
        table = markdown_table_after(section, caption)
        assert {"trained on", "tested on", "verdict", "McNemar p (accuracy)"} <= set(table.columns)
        for cell, verdict in zip(table["difference [95% interval]"], table["verdict"]):
            _, low, high = (float(x) for x in re.fullmatch(DIFFERENCE, cell).groups())
            assert (verdict == "not resolved at this sample size") == (low <= 0 <= high)
    assert "<caption>deit_small_patch16_224 minus resnet18" in html
    for caption in ("*Mixed-magnification training against the test magnification alone, per model*",
                    "*Transfer down (A: higher to lower magnification) against transfer up (B), per model*"):
        assert "verdict" in markdown_table_after(markdown, caption).columns


def test_long_tables_fold_after_their_first_rows_and_intervals_stay_on_one_line():
    from histotoken.reporting.blocks import Table
    from histotoken.reporting.render import COLLAPSED_ROWS, _table_html

    frame = pd.DataFrame({"model": [f"m{i}" for i in range(20)], "F1": ["0.81 [0.74, 0.88]"] * 20})
    page = _table_html(Table(frame, "twenty rows"))
    shown, folded = page.split("<details>")
    assert shown.count("<tr>") == 1 + COLLAPSED_ROWS and folded.count("<tr>") == 1 + 20 - COLLAPSED_ROWS
    assert page.index("<caption>") < page.index("<thead>")
    assert '0.81 <span class="ci">[0.74, 0.88]</span>' in shown
    assert "<details>" not in _table_html(Table(frame.head(5)))


def test_best_epoch_star_sits_on_the_epoch_status_json_names_and_the_legend_hides_no_point():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # two stages, epochs counted from 1 within each (metrics.csv), a tie on val macro-F1 broken by
    # val accuracy in training: status.json's best is stage 2, epoch 2, not the first maximum
    metrics = pd.DataFrame({
        "stage": ["1", "1", "2", "2", "2"], "epoch": [1, 2, 1, 2, 3],
        "train/loss": [2.0, 1.6, 1.3, 1.1, 1.0], "val/loss": [2.1, 1.7, 1.4, 1.2, 1.3],
        "val/macro_f1": [0.30, 0.70, 0.60, 0.70, 0.65],
    })
    figure = plots.training_curves_figure(metrics, "run", best_epoch=2, best_stage="2")
    f1_ax = figure.axes[1]
    star = next(line for line in f1_ax.get_lines() if line.get_marker() == "*")
    assert list(star.get_xdata()) == [4]  # the 4th row of metrics.csv: stage 2, epoch 2
    tick = dict(zip(f1_ax.get_xticks(), (t.get_text() for t in f1_ax.get_xticklabels())))
    assert tick[4] == "2"  # the axis says "2" under the star, as the text does
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in figure.axes[:2]:
        legend, frame = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.y1 <= frame.y0  # below the plotting area
    without = plots.training_curves_figure(metrics, "run")  # no record: the highest val macro-F1 (first)
    star = next(line for line in without.axes[1].get_lines() if line.get_marker() == "*")
    assert list(star.get_xdata()) == [2]


def test_run_text_and_figure_quote_the_same_best_epoch(full_study):
    import json

    study, _, markdown = full_study
    run_id = run_id_of(*TWO_STAGE_RUN)
    status = json.loads((study / "runs" / run_id / "status.json").read_text())
    best = json.loads((study / "runs" / run_id / "checkpoints" / "best.json").read_text())
    section = markdown.split(f"### {run_id}: ")[1].split("\n### ")[0]
    assert f"best epoch: {status['best_epoch']} (stage {best['stage']})" in section


def _text_sizes_px(figure) -> list[float]:
    from matplotlib.text import Text

    return [text.get_fontsize() * plots.DPI / 72 for text in figure.findobj(Text) if text.get_text().strip()]


def test_plot_text_is_at_least_10px_and_figures_are_not_shrunk_on_a_1180px_page(full_study):
    study, _, _ = full_study
    summary = tables.mean_over_seeds(tables.read_results(study / "results.csv"))
    matrices = {m: tables.cross_domain_matrix(summary, m, "subtype") for m, *_ in MODELS}
    efficiency = tables.read_efficiency(study / "efficiency.csv")
    cost = tables.accuracy_cost_table(summary, efficiency, "subtype")
    metrics = pd.read_csv(study / "runs" / run_id_of("resnet18", "100") / "metrics.csv")
    figures = [
        plots.cross_domain_heatmaps(matrices),
        plots.in_vs_cross_bars(tables.cross_domain_summary(summary), [m for m, *_ in MODELS]),
        plots.pareto_scatter(cost, "gflops", "GFLOPs", "pareto_gflops", True),
        plots.confusion_matrix_figure(np.eye(8) * 3, [f"class {i}" for i in range(8)], "cm"),
        plots.training_curves_figure(metrics, "curves"),
    ]
    for figure in figures:
        assert min(_text_sizes_px(figure)) >= 10
        assert figure.get_figwidth() * plots.DPI <= 1140  # the page's column: shown at 100%, not shrunk


def test_plots_become_palette_pngs_and_photographs_jpeg_without_visible_change(full_study):
    import io

    from PIL import Image

    study, _, _ = full_study
    metrics = pd.read_csv(study / "runs" / run_id_of("resnet18", "100") / "metrics.csv")
    figure = plots.training_curves_figure(metrics, "curves")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=plots.DPI)
    original = buffer.getvalue()
    small = plots.compress_image(original, photographic=False)[0]  # what figure_to_png keeps
    assert Image.open(io.BytesIO(small)).mode == "P" and len(small) < 0.6 * len(original)
    before = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), dtype=float)
    after = np.asarray(Image.open(io.BytesIO(small)).convert("RGB"), dtype=float)
    assert np.abs(before - after).mean() < 1.0  # grey levels of 255

    from histotoken.data.synthetic import render_image

    tissue = render_image("ductal_carcinoma", 100, (96, 64), seed=0, patient_index=0, patient_id="14-1", seq=1)
    buffer = io.BytesIO()
    Image.fromarray(tissue).save(buffer, format="PNG")
    data, extension = plots.compress_image(buffer.getvalue(), photographic=True)
    assert extension == "jpg" and data[:3] == JPEG_SIGNATURE and len(data) < len(buffer.getvalue())
    reference = tissue.astype(float)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)
    psnr = 10 * np.log10(255**2 / np.mean((reference - decoded) ** 2))
    assert psnr > 30


def test_the_page_states_its_size_and_external_figures_sit_beside_it(tmp_path, monkeypatch, capsys):
    from histotoken.cli import main as cli_main

    study = small_study(tmp_path)
    inline = build_report(study)
    text = inline.read_text(encoding="utf-8")
    stated = re.search(r"This page: ([\d.]+) kB, with its 3 figures inline", text)
    assert stated and float(stated[1]) == pytest.approx(inline.stat().st_size / 1e3, rel=0.02)

    monkeypatch.setattr(cli_main, "COMMANDS", ["report"])
    out = tmp_path / "external" / "report.html"
    assert cli_main.main(["report", str(study), "--out", str(out), "--figures", "external", "--no-collect"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "data:image" not in page and out.stat().st_size < inline.stat().st_size / 2
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == 3 and all((out.parent / source).is_file() for source in sources)
    assert "figures (" in page and "are in figures/ beside it" in page
    printed = capsys.readouterr().out  # the command says the page needs its figures folder, and how big it is
    assert f"report: {out} (" in printed and "keep figures/ beside it" in printed
    assert "self-contained" not in printed
