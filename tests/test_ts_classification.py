"""UCR/UEA classification: the .ts loader, train-only normalisation, readouts and scores, a training step."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import aaren_classification
from nbp import tasks
from nbp.data import ucr
from nbp.tasks import ts_classification
from nbp.training import loop as train
from tests.conftest import apply_overrides, set_tiny_budget

# Two channels, unequal lengths, one missing value ("?"), string labels. The test split holds the longest
# series (T = 5 comes from both splits) and values far from the train split's (its own statistics differ).
TRAIN = [([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], "dog"),
         ([1.0, None, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0], "cat"),
         ([2.0, 3.0], [1.0, 1.0], "dog"),
         ([0.0, 1.0, 0.0], [2.0, 0.0, 2.0], "cat")]
TEST = [([10.0, 11.0, 12.0, 13.0, 14.0], [0.0, 0.0, 0.0, 0.0, 0.0], "cat"),
        ([3.0], [3.0], "dog")]


def write_ts(path, cases, *, equal_length=False, header_label="@classLabel true"):
  """Writes a .ts file of cases (channel lists..., label); None is a missing value ("?")."""
  dims = len(cases[0]) - 1
  lines = ["# a test fixture", "@problemName Tiny", "@timeStamps false", "@missing true",
           f"@univariate {'true' if dims == 1 else 'false'}", f"@dimensions {dims}",
           f"@equalLength {'true' if equal_length else 'false'}",
           f"{header_label} {' '.join(sorted({c[-1] for c in cases}))}", "@data"]
  for *channels, label in cases:
    lines.append(":".join(",".join("?" if v is None else repr(v) for v in ch) for ch in channels) + f":{label}")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


def data_config(**keys):
  section = dict(name="ucr", dir="data", worker_count=0, dataset="", train_path="", test_path="", max_len=0)
  return ml_collections.ConfigDict(dict(section, **keys))


@pytest.fixture
def tiny_pair(tmp_path):
  return write_ts(tmp_path / "Tiny_TRAIN.ts", TRAIN), write_ts(tmp_path / "Tiny_TEST.ts", TEST)


def raw(cases, channel, length):
  """float64 [N, length] of one channel, NaN where missing or padded."""
  out = np.full((len(cases), length), np.nan)
  for n, case in enumerate(cases):
    values = [np.nan if v is None else v for v in case[channel]][:length]
    out[n, :len(values)] = values
  return out


def test_loader_pads_masks_normalises_on_train_only_and_marks_missing(tiny_pair):
  data = ucr.load(data_config(train_path=tiny_pair[0], test_path=tiny_pair[1]))
  assert data.class_names == ("cat", "dog") and data.num_classes == 2 and data.name == "Tiny"
  assert data.channels == 2 and data.missing_indicators and data.input_dim == 4 and data.max_len == 5
  train, test = data.splits["train"], data.splits["test"]
  np.testing.assert_array_equal(train["label"], [1, 0, 1, 0])
  np.testing.assert_array_equal(test["label"], [0, 1])
  np.testing.assert_array_equal(train["valid"].sum(1), [3, 4, 2, 3])
  np.testing.assert_array_equal(test["valid"].sum(1), [5, 1])
  assert train["x"].shape == (4, 5, 4) and train["x"].dtype == np.float32 and test["x"].shape == (2, 5, 4)
  for c in range(2):  # statistics of the train split's observed values, by hand
    observed = [v for case in TRAIN for v in case[c] if v is not None]
    mean, std = np.mean(observed), np.std(observed)
    for split, cases in (("train", TRAIN), ("test", TEST)):
      values = raw(cases, c, 5)
      x = data.splits[split]["x"]
      expected = np.where(np.isnan(values), 0.0, (values - mean) / std)
      np.testing.assert_allclose(x[..., c], expected, rtol=1e-6, atol=1e-6)
      missing = np.isnan(values) & data.splits[split]["valid"]
      np.testing.assert_array_equal(x[..., 2 + c], missing.astype(np.float32))
  assert train["x"][1, 1, 2] == 1.0 and train["x"][1, 1, 0] == 0.0  # the "?"
  # The test split is not standardised by its own statistics.
  assert abs(test["x"][0, :, 0].mean()) > 2.0
  batch = ucr.source(data_config(train_path=tiny_pair[0], test_path=tiny_pair[1]), "test")[1]
  assert set(batch) == {"x", "valid", "label"} and batch["x"].shape == (5, 4) and int(batch["label"]) == 1


def test_equal_length_without_missing_values_numeric_labels_and_max_len(tmp_path):
  cases = [([1.0, 2.0, 3.0], "10"), ([2.0, 2.0, 5.0], "9"), ([0.0, 4.0, 1.0], "2")]
  train = write_ts(tmp_path / "a_TRAIN.ts", cases, equal_length=True)
  test = write_ts(tmp_path / "a_TEST.ts", cases[:2], equal_length=True)
  data = ucr.load(data_config(train_path=train, test_path=test, max_len=2))
  assert data.class_names == ("2", "9", "10")  # numeric order, not "10" < "2"
  np.testing.assert_array_equal(data.splits["train"]["label"], [2, 1, 0])
  assert not data.missing_indicators and data.input_dim == 1 and data.max_len == 2
  assert data.splits["train"]["valid"].all()
  observed = np.array([[1.0, 2.0], [2.0, 2.0], [0.0, 4.0]])  # the first max_len steps
  np.testing.assert_allclose(data.splits["train"]["x"][..., 0], (observed - observed.mean()) / observed.std(),
                             rtol=1e-6)


def test_sktime_set_by_name():
  assert {"BasicMotions", "JapaneseVowels", "GunPoint"} <= set(ucr.dataset_names())
  assert "Tecator" not in ucr.dataset_names()  # a regression set (@targetLabel)
  data = ucr.load(data_config(dataset="BasicMotions"))
  assert data.splits["train"]["x"].shape == (40, 100, 6) and data.splits["test"]["x"].shape == (40, 100, 6)
  assert data.num_classes == 4 and data.input_dim == 6
  with pytest.raises(ValueError, match="config.data.dataset='Nope'"):
    ucr.load(data_config(dataset="Nope"))


def test_bad_files_raise_errors_naming_the_file(tmp_path, tiny_pair):
  damaged = tmp_path / "damaged_TRAIN.ts"
  damaged.write_text(open(tiny_pair[0]).read().replace("4.0,5.0,6.0", "4.0,xx,6.0"))
  with pytest.raises(ucr.UCRFileError, match=str(damaged)):
    ucr.load(data_config(train_path=str(damaged), test_path=tiny_pair[1]))
  unseen = write_ts(tmp_path / "unseen_TEST.ts", [TEST[0][:2] + ("cat",), TEST[1][:2] + ("bird",)])
  with pytest.raises(ucr.UCRFileError, match=rf"{unseen}: example 1 has label 'bird'"):
    ucr.load(data_config(train_path=tiny_pair[0], test_path=unseen))
  regression = write_ts(tmp_path / "r_TRAIN.ts", TRAIN, header_label="@targetLabel true")
  with pytest.raises(ucr.UCRFileError, match=str(regression)):
    ucr.read_ts(regression)
  with pytest.raises(ValueError, match="config.data.test_path"):
    ucr.load(data_config(train_path=tiny_pair[0]))


def test_readouts_by_hand():
  y = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  valid = jnp.array([[True, True, False, False], [True, True, True, True]])
  mean = ts_classification.readout(y, valid, "mean")
  last = ts_classification.readout(y, valid, "last")
  np.testing.assert_allclose(mean, [np.asarray(y)[0, :2].mean(0), np.asarray(y)[1].mean(0)])
  np.testing.assert_allclose(last, [np.asarray(y)[0, 1], np.asarray(y)[1, 3]])
  with pytest.raises(ValueError, match="config.loss.pooling"):
    ts_classification.readout(y, valid, "max")


def tiny_config(tiny_pair, attention="aaren"):
  c = aaren_classification.get_config(f"{attention},local")
  set_tiny_budget(c, num_steps=2, checkpoint_every=2)
  return apply_overrides(c, {"data.train_path": tiny_pair[0], "data.test_path": tiny_pair[1],
                             "model.num_layers": 1, "model.width": 16,
                             "model.num_heads": 2, "batch_size": 4})


@pytest.mark.parametrize("attention", ["aaren", "softmax"])
def test_a_training_step_lowers_the_loss_and_score_matches_a_hand_count(tiny_pair, attention):
  config = tiny_config(tiny_pair, attention)
  tasks.check_config(config)
  task = ts_classification.make_task(config)
  assert (task.model.input_dim, task.model.output_dim, task.model.attention) == (4, 2, attention)
  # An rbg key: XLA compiles threefry's initialisers for seconds on CPU; the values do not matter here.
  params = jax.jit(task.model.init)(jax.random.key(0, impl="rbg"), **task.init_inputs())["params"]
  batch = {k: jnp.asarray(v) for k, v in task.examples("train").items()}
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    """One Adam step, with the loss, score and outputs before it."""
    (value, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, None)
    updates, opt_state = tx.update(grads, opt_state, params)
    y = task.model.apply({"params": params}, batch["x"], valid=batch["valid"])
    return optax.apply_updates(params, updates), opt_state, (value, metrics, grads, task.score(params, batch), y)

  params, opt_state, (value, metrics, grads, scores, y) = jax.device_get(step(params, tx.init(params)))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  _, _, (after, *_) = step(params, opt_state)
  assert float(after) < float(value)

  valid, labels = np.asarray(batch["valid"]), np.asarray(batch["label"])
  logits = np.stack([y[n, valid[n]].mean(0) for n in range(len(y))])  # mean over each series' valid steps
  correct = (logits.argmax(-1) == labels).astype(np.float32)
  np.testing.assert_array_equal(scores["accuracy"][0], correct)
  np.testing.assert_array_equal(scores["accuracy"][1], np.ones(4))
  np.testing.assert_allclose(metrics["accuracy"], correct.mean(), rtol=1e-6)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(scores["loss"][0], -log_probs[np.arange(4), labels], rtol=1e-4)
  np.testing.assert_allclose(value, scores["loss"][0].mean(), rtol=1e-4)  # no label smoothing: the same


@pytest.mark.slow
def test_train_and_evaluate_reports_test_accuracy(tmp_path, tiny_pair):
  config = tiny_config(tiny_pair)
  with config.unlocked():
    del config.evals["eval"]  # the loss evaluator is the shared loop's; one compile less
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["status"] == "done" and result["step"] == 2
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    final = [json.loads(line) for line in f][-1]
  assert final["test/num_examples"] == len(TEST) and final["test/accuracy"] in (0.0, 0.5, 1.0)
  assert np.isfinite(final["test/loss"])
