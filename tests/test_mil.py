"""Slide aggregators over tile tokens (histotoken.mil): invariants, hand-worked bags, streaming, fitting."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from histotoken.mil.aggregators import ABMIL, AGGREGATORS, MaxPoolMIL, MeanPoolMIL, create_aggregator
from histotoken.mil.data import SlideBag, iter_feature_chunks, slide_bags
from histotoken.mil.train import FitConfig, fit_aggregator, predict_bag, slide_metrics, split_by_patient

FEATURE_DIM = 8
# small widths so that every test runs in well under a second or two on one core
SMALL = {
    "abmil": {"dim": 16, "attention_dim": 8},
    "clam_sb": {"dim": 16, "attention_dim": 8, "k_sample": 3},
    "transmil": {"dim": 16, "num_heads": 2},
    "tokenlearner": {"dim": 16, "num_slots": 4, "num_heads": 2},
    "token_merging": {"dim": 16, "r": 4, "num_heads": 2},
    "topk": {"dim": 16, "k": 4, "num_heads": 2},
}
# TransMIL lays tiles on a square (PPEG) and token merging splits tokens by position: both see order
PERMUTATION_INVARIANT = ["mean", "max", "abmil", "clam_sb", "tokenlearner", "topk"]
STREAMING = ["mean", "max", "abmil", "clam_sb"]


def small(name: str, in_dim: int = FEATURE_DIM):
    torch.manual_seed(0)
    return create_aggregator(name, in_dim, 2, **SMALL.get(name, {}))


# instance max pooling and top-k pass gradient through a few tiles only: they need more epochs on 20 bags
FIT_EPOCHS = {"max": 15, "topk": 15}


def planted_bags(n_bags: int = 20, n_tiles: int = 16, seed: int = 0) -> tuple[list[torch.Tensor], list[int]]:
    """Noise bags; in positive bags 4 tiles carry +4 on feature 0 (a 'tumour' signal in a few tiles)."""
    generator = torch.Generator().manual_seed(seed)
    bags, labels = [], []
    for index in range(n_bags):
        label = index % 2
        bag = torch.randn(n_tiles, FEATURE_DIM, generator=generator)
        if label:
            bag[:4, 0] += 4.0
            bag = bag[torch.randperm(n_tiles, generator=generator)]
        bags.append(bag)
        labels.append(label)
    return bags, labels


def test_abmil_attention_weights_sum_to_one():
    model = small("abmil").eval()
    with torch.no_grad():
        output = model(torch.randn(1, 57, FEATURE_DIM))
    assert output.importance.shape == (57,)
    assert (output.importance > 0).all()
    assert float(output.importance.sum()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
def test_slide_score_is_invariant_to_permuting_tiles(name):
    model = small(name).eval()
    bag = torch.randn(40, FEATURE_DIM, generator=torch.Generator().manual_seed(1))
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        original, permuted = model(bag), model(bag[permutation])
    torch.testing.assert_close(permuted.logits, original.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted.importance, original.importance[permutation], atol=1e-5, rtol=1e-5)


def test_mean_pooling_hand_worked_bag():
    model = MeanPoolMIL(2, 2)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(2))
        model.head.bias.copy_(torch.tensor([0.0, 1.0]))
    bag = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean (2, 3) -> logits (2, 3 + 1)
    torch.testing.assert_close(model(bag).logits, torch.tensor([[2.0, 4.0]]))


def test_max_pooling_hand_worked_bag():
    model = MaxPoolMIL(2, 2)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        model.head.bias.zero_()
    bag = torch.tensor([[1.0, 2.0], [3.0, 0.0], [-1.0, 1.0]])  # tile logits (1,4) (3,0) (-1,2): max per class (3, 4)
    output = model(bag)
    torch.testing.assert_close(output.logits, torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(output.importance, torch.tensor([3.0, -3.0, 3.0]))  # logit 1 - logit 0 per tile


def test_abmil_hand_worked_bag():
    """Two tiles, identity embedding, gate 1/2: scores tanh(1) * 2 * 1/2 and 0, so a_1 = sigmoid(tanh(1))."""
    model = ABMIL(2, 2, dim=2, attention_dim=1)
    with torch.no_grad():
        model.embed[0].weight.copy_(torch.eye(2))
        model.embed[0].bias.zero_()
        model.attention.V.weight.copy_(torch.tensor([[1.0, 0.0]]))
        model.attention.V.bias.zero_()
        model.attention.U.weight.zero_()  # sigmoid(0) = 1/2 for every tile
        model.attention.U.bias.zero_()
        model.attention.w.weight.fill_(2.0)
        model.attention.w.bias.zero_()
        model.head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
        model.head.bias.zero_()
    output = model(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    first = 1 / (1 + math.exp(-math.tanh(1.0)))  # softmax of (tanh 1, 0) = 0.6817
    torch.testing.assert_close(output.importance, torch.tensor([first, 1 - first]))
    torch.testing.assert_close(output.logits, torch.tensor([[0.0, 2 * first - 1]]))  # z = (a1, a2), logit a1 - a2


def test_topk_keeps_exactly_k_tokens_and_the_scorer_gets_gradient():
    model = small("topk").train()
    output = model(torch.randn(30, FEATURE_DIM))
    assert (output.tokens_in, output.tokens_kept) == (30, 4)
    assert output.tokens_per_block == [1 + 4]  # class token + k kept tiles
    output.logits[0, 1].backward()
    assert model.scorer.weight.grad is not None and model.scorer.weight.grad.abs().sum() > 0
    assert model.scorer.bias.grad.abs() > 0


def test_tokenlearner_aggregator_keeps_its_slots():
    model = small("tokenlearner").eval()
    with torch.no_grad():
        output = model(torch.randn(50, FEATURE_DIM))
    assert (output.tokens_in, output.tokens_kept) == (50, 4)
    assert output.tokens_per_block == [1 + 4]
    assert float(output.importance.sum()) == pytest.approx(1.0, abs=1e-5)  # mean of 4 maps that each sum to 1


def test_token_merging_aggregator_removes_r_tokens_per_block():
    model = create_aggregator("token_merging", FEATURE_DIM, dim=16, num_heads=2, depth=3, r=5).eval()
    output = model(torch.randn(40, FEATURE_DIM))
    assert output.tokens_per_block == [35, 30, 25]
    assert (output.tokens_in, output.tokens_kept) == (40, 25)


def test_transmil_reads_at_most_max_tokens_tiles():
    model = small("transmil").eval()
    model.max_tokens = 16
    output = model(torch.randn(50, FEATURE_DIM))
    assert (output.tokens_in, output.tokens_kept) == (50, 16)
    assert int(torch.isfinite(output.importance).sum()) == 16  # tiles not read: NaN


@pytest.mark.parametrize("name", STREAMING)
def test_chunked_bag_equals_whole_bag(name):
    model = small(name).eval()
    bag = torch.randn(103, FEATURE_DIM, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        whole = model(bag)
        chunked = model.forward_chunks(bag.split(10))
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.importance, whole.importance, atol=1e-5, rtol=1e-5)
    assert chunked.tokens_in == 103


def test_unknown_aggregator_names_the_choices():
    with pytest.raises(ValueError, match="abmil"):
        create_aggregator("attention", FEATURE_DIM)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_every_aggregator_learns_a_planted_signal(name):
    bags, labels = planted_bags()
    model = small(name)
    fit_aggregator(model, bags, labels, FitConfig(epochs=FIT_EPOCHS.get(name, 6), lr=1e-2, seed=0))
    with torch.no_grad():
        scores = [float(model(bag).logits.softmax(-1)[0, 1]) for bag in bags]
    assert roc_auc_score(labels, scores) > 0.8


def write_feature_file(path, features: np.ndarray, patient_id: str | None = None) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features.astype(np.float32))
        coords = np.stack([np.arange(len(features)) * 256, np.zeros(len(features))], 1).astype(np.int64)
        handle.create_dataset("coords", data=coords)
        handle.attrs["slide"] = path.stem
        handle.attrs["backbone"] = "fake"
        if patient_id is not None:
            handle.attrs["patient_id"] = patient_id


def test_feature_file_streams_in_chunks_with_the_same_slide_score(tmp_path):
    features = np.random.default_rng(0).normal(size=(1000, FEATURE_DIM)).astype(np.float32)
    write_feature_file(tmp_path / "slide_a.h5", features)
    chunks = list(iter_feature_chunks(tmp_path / "slide_a.h5", 300))
    assert [len(chunk) for chunk in chunks] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate(chunks), features)
    model = small("abmil").eval()
    streamed, coords = predict_bag(model, SlideBag("slide_a", tmp_path / "slide_a.h5", 1, "p"), chunk_size=128)
    with torch.no_grad():
        whole = model(torch.from_numpy(features))
    torch.testing.assert_close(streamed.logits, whole.logits, atol=1e-5, rtol=1e-5)
    assert coords.shape == (1000, 2) and coords[3, 0] == 768


def test_patients_come_from_csv_then_file_attribute_then_camelyon17_name(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    for slide, patient in [("patient_004_node_1", None), ("patient_004_node_2", None), ("b1", "px"), ("b2", None)]:
        write_feature_file(features / f"{slide}.h5", np.zeros((3, FEATURE_DIM)), patient)
    (tmp_path / "labels.csv").write_text("slide,label\npatient_004_node_1,negative\npatient_004_node_2,micro\n"
                                         "b1,Tumor\nb2,Normal\n")
    bags = {bag.slide: bag for bag in slide_bags(features, tmp_path / "labels.csv")}
    assert {slide: bag.patient_id for slide, bag in bags.items()} == {
        "patient_004_node_1": "patient_004", "patient_004_node_2": "patient_004", "b1": "px", "b2": "b2"}
    assert bags["patient_004_node_2"].label == 1 and bags["b2"].label == 0
    (tmp_path / "with_patients.csv").write_text("slide,label,patient_id\npatient_004_node_1,0,q\n"
                                                "patient_004_node_2,1,q\nb1,1,r\nb2,0,s\n")
    from_csv = {bag.slide: bag.patient_id for bag in slide_bags(features, tmp_path / "with_patients.csv")}
    assert from_csv["b1"] == "r"  # the CSV column wins over the file attribute


def test_split_keeps_each_patient_on_one_side():
    bags = [SlideBag(f"patient_{p:03d}_node_{n}", None, (p + n) % 2, f"patient_{p:03d}")
            for p in range(8) for n in range(3)]
    train, test = split_by_patient(bags, test_fraction=0.25, seed=0)
    assert len(train) + len(test) == 24 and test
    assert not {bag.patient_id for bag in train} & {bag.patient_id for bag in test}


def test_slide_metrics_agree_with_scikit_learn():
    labels = [0, 0, 0, 1, 1, 1, 0, 1, 1, 0]
    probabilities = [0.1, 0.6, 0.3, 0.8, 0.4, 0.9, 0.2, 0.7, 0.55, 0.45]
    patients = ["a", "a", "b", "c", "c", "d", "e", "f", "g", "h"]
    predictions = [int(p >= 0.5) for p in probabilities]
    result = slide_metrics(labels, probabilities, patients, n_resamples=200)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, probabilities))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert result["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    low, high = result["auroc_ci95"]
    assert low <= result["auroc"] <= high and low < high
    assert result["interval_unit"] == "patients" and result["n_patients"] == 8
    assert any("fewer than 5 test patients" in note for note in result["notes"])


def test_a_slide_larger_than_max_tokens_is_read_as_an_evenly_spaced_subset(tmp_path):
    write_feature_file(tmp_path / "big.h5", np.random.default_rng(1).normal(size=(50, FEATURE_DIM)))
    model = small("transmil").eval()
    model.max_tokens = 16
    output, coords = predict_bag(model, SlideBag("big", tmp_path / "big.h5", 0, "p"))
    assert (output.tokens_in, output.tokens_kept) == (50, 16)
    assert len(output.importance) == len(coords) == 50
    read = torch.isfinite(output.importance).nonzero()[:, 0]
    assert len(read) == 16 and read[0] == 0 and read[-1] == 49  # evenly spaced over the slide, ends included


def test_clam_instance_loss_only_in_training_with_a_label_and_log2_for_a_blind_classifier():
    model = small("clam_sb")
    with torch.no_grad():
        for classifier in model.instance_classifiers:  # equal logits for every tile: cross-entropy log 2
            classifier.weight.zero_()
            classifier.bias.zero_()
    bag = torch.randn(20, FEATURE_DIM)
    assert model.eval()(bag, label=1).aux_loss is None
    assert model.train()(bag).aux_loss is None
    loss = model.train()(bag, label=1).aux_loss
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert model.instance_classifiers[1].weight.grad.abs().sum() > 0  # the slide class's classifier learns
    assert model.instance_classifiers[0].weight.grad is None
