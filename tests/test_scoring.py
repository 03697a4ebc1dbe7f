import numpy as np
import pytest
import torch

import common
import scoring


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = common.load_model(str(tiny_model_dir))
    return model, tok


LABELS = ["Good", "Standard", "Bad", "Standard deviation of loans"]  # the last one is several tokens


def test_batched_kv_shared_scores_equal_one_by_one(tiny):
    model, tok = tiny
    assert max(len(x) for x in scoring.label_token_ids(tok, LABELS)) > 1
    prompts = [common.chat_prompt(tok, "customer " + "x " * i) for i in range(5)]  # different lengths
    naive = scoring.naive_label_scores(model, tok, prompts, LABELS)
    for bs in (1, 2, 5):
        np.testing.assert_allclose(scoring.raw_label_scores(model, tok, prompts, LABELS, batch_size=bs), naive,
                                   atol=1e-4)


def test_raw_score_is_mean_token_logprob(tiny):
    """Hand computation: log-softmax of the next-token logits over the full sequence, averaged over label tokens."""
    model, tok = tiny
    prompt = common.chat_prompt(tok, "hello")
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    label = "Standard deviation"
    x = tok(label, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + x])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    hand = sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(x)) / len(x)
    got = scoring.raw_label_scores(model, tok, [prompt], [label])[0, 0]
    assert got == pytest.approx(hand, abs=1e-4)


def test_calibration_and_response_arithmetic():
    raw = np.array([[-3.0, -1.0, -2.0], [-1.0, -2.0, -4.0]])
    nulls = np.array([[-2.0, -1.0, -1.0], [-2.0, -2.0, -1.0]])
    np.testing.assert_allclose(scoring.prior_for("multi_null", raw, nulls), [-2.0, -1.5, -1.0])
    np.testing.assert_allclose(scoring.prior_for("batch", raw), [-2.0, -1.5, -3.0])
    np.testing.assert_allclose(scoring.prior_for("none", raw), [0, 0, 0])
    with pytest.raises(ValueError):
        scoring.prior_for("multi_null", raw)
    r = scoring.response("m", ["Good", "Standard", "Bad"], raw[0], np.array([-2.0, -1.5, -1.0]))
    # calibrated = raw - prior = [-1.0, 0.5, -1.0]
    assert r["scores"] == {"Good": -1.0, "Standard": 0.5, "Bad": -1.0}
    assert r["prediction"] == "Standard"
    e = np.exp([-1.0, 0.5, -1.0])
    assert r["probabilities"]["Standard"] == pytest.approx(e[1] / e.sum(), abs=1e-4)
    assert r["top2_margin"] == pytest.approx(1.5)
    assert list(r) == ["model_name", "prediction", "scores", "raw_scores", "prior", "probabilities", "top2_margin"]


@pytest.mark.real_model
def test_real_model_batched_equals_naive():
    model, tok, _ = common.load_model("smollm2-135m")
    prompts = [common.chat_prompt(tok, f"Customer {i}: Age {20 + i}") for i in range(3)]
    np.testing.assert_allclose(scoring.raw_label_scores(model, tok, prompts, ["Good", "Standard", "Bad"]),
                               scoring.naive_label_scores(model, tok, prompts, ["Good", "Standard", "Bad"]),
                               atol=1e-3)


def test_fp32_output_layer_log_probs_match_log_softmax_over_vocab_chunks(tiny, monkeypatch):
    """The scorer's own output layer (fp32, the vocabulary in chunks) equals log_softmax of the model's logits."""
    model, _ = tiny
    head = model.get_output_embeddings()
    monkeypatch.setattr(scoring, "_VOCAB_CHUNK", 7)  # not a divisor of the vocabulary: a ragged last chunk
    hidden = torch.randn(3, head.weight.shape[1])
    targets = torch.tensor([[0, 5], [11, 11], [head.weight.shape[0] - 1, 2]])
    with torch.no_grad():
        want = torch.log_softmax(head(hidden).double(), -1).gather(-1, targets)
        got = scoring._token_logprobs(head, hidden, targets)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5)


def test_temperature_scaling_recovers_an_overconfident_models_temperature():
    """Labels drawn from softmax(z / 3) but scored as softmax(z): the fitted temperature is about 3, the ECE drops,
    and the ranking (so the accuracy) is unchanged by construction."""
    from scoring import expected_calibration_error, fit_temperature, softmax
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, size=(4000, 3))
    p = softmax(z / 3)
    y = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature(z, y)
    assert t == pytest.approx(3, rel=0.15)
    before, after = expected_calibration_error(softmax(z), y), expected_calibration_error(softmax(z / t), y)
    assert before > 0.1 and after < 0.03


def _heldout_ece(z, y):
    from scoring import _temperature_only, cross_fitted, expected_calibration_error
    return expected_calibration_error(cross_fitted(z, y, _temperature_only), y)


def test_cross_fitted_temperatures_come_from_the_other_rows():
    """An overconfident model (labels from softmax(z / 3)): each half's temperature from the other half still
    calibrates it; when the halves disagree (the second half's labels drawn at another temperature) the held-out ECE
    is worse than the ECE on the rows the single temperature was fitted to."""
    from scoring import expected_calibration_error, fit_temperature, softmax
    rng = np.random.default_rng(1)
    z = rng.normal(0, 4, size=(4000, 3))
    y = np.array([rng.choice(3, p=row) for row in softmax(z / 3)])
    assert expected_calibration_error(softmax(z), y) > 0.1 and _heldout_ece(z, y) < 0.03
    t_half = np.where(np.arange(4000) % 2 == 0, 1.0, 6.0)  # even rows sharp, odd rows flat
    y2 = np.array([rng.choice(3, p=row) for row in softmax(z / t_half[:, None])])
    in_sample = expected_calibration_error(softmax(z / fit_temperature(z, y2)), y2)
    assert _heldout_ece(z, y2) > in_sample + 0.05


def test_a_fitted_prior_gives_an_under_predicted_label_its_share_back():
    """Scores biased against the second label (as the six-feature CreditMix student, which almost never says
    Standard) and overconfident: the fitted calibration's cross-fitted accuracy beats the three fixed ones (batch's
    mean comes close on such a constant bias), it is chosen, its prior undoes the bias, and its held-out
    probabilities are calibrated."""
    from scoring import FITTED, choose_calibration, softmax
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1.5, size=(3000, 3))
    y = np.array([rng.choice(3, p=row) for row in softmax(z)])
    raw = 2.5 * z - np.array([0.0, 3.0, 0.0])  # overconfident, and Standard pushed down
    nulls = np.zeros((4, 3))
    chosen = choose_calibration(raw, nulls, y)
    assert chosen["calibration"] == FITTED
    acc = chosen["accuracy"]
    assert acc[FITTED] > max(acc["multi_null"], acc["batch"], acc["none"]) and acc[FITTED] > acc["none"] + 0.05
    prior = np.array(chosen["prior"])
    assert prior[1] - prior[0] == pytest.approx(-3.0, abs=0.4) and chosen["temperature"] == pytest.approx(2.5, rel=0.15)
    assert chosen["ece_after_heldout"] < 0.03 < chosen["ece_before"]


def test_ece_floor_is_what_calibrated_probabilities_score_on_a_finite_split():
    """Labels drawn from the probabilities themselves (perfect calibration) score about the floor, not 0; the floor
    shrinks with the number of rows, and a miscalibrated model (its scores twice too sharp) scores well above it."""
    from scoring import ece_floor, expected_calibration_error, softmax
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1.5, size=(20000, 3))
    p = softmax(z)
    y = np.array([rng.choice(3, p=row) for row in p])
    small = ece_floor(p[:1000])
    assert 0.01 < small < 0.06 and ece_floor(p) < small / 2
    assert expected_calibration_error(p[:1000], y[:1000]) == pytest.approx(small, abs=0.02)
    assert expected_calibration_error(softmax(2 * z[:1000]), y[:1000]) > small + 0.05


def test_expected_calibration_error_of_known_cases():
    from scoring import expected_calibration_error
    y = np.array([0, 0, 1, 1])
    sure_right = np.eye(3)[y]
    assert expected_calibration_error(sure_right, y) == pytest.approx(0)
    sure_wrong = np.eye(3)[[1, 1, 0, 0]]
    assert expected_calibration_error(sure_wrong, y) == pytest.approx(1)
    half = np.array([[0.6, 0.4, 0.0]] * 4)  # confidence 0.6, right half the time
    assert expected_calibration_error(half, y) == pytest.approx(0.1)


def test_choose_calibration_picks_the_most_accurate_prior_ties_to_multi_null():
    from scoring import choose_calibration
    y = np.array([0, 1, 2, 0, 1, 2])
    raw = np.eye(3)[y] + np.array([0.0, 0.0, 5.0])  # a constant bias towards label 2: the batch mean removes it
    nulls = np.zeros((4, 3))                          # content-free prompts that show no bias
    c = choose_calibration(raw, nulls, y)
    assert c["calibration"] == "batch" and c["accuracy"]["batch"] == 1 and c["accuracy"]["multi_null"] < 1
    assert c["prior"] == pytest.approx(list(raw.mean(0)))
    tie = choose_calibration(np.eye(3)[y], nulls, y)  # every prior is perfect: the README's multi_null
    assert tie["calibration"] == "multi_null" and tie["temperature"] > 0
