"""UCR/UEA classification: the .ts loader, train-only normalisation, readouts and scores, a training step."""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import aaren_classification
from nbp import tasks
from nbp.data import splits
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
  section = dict(name="ucr", dir="data", worker_count=0, dataset="", train_path="", test_path="", max_len=0,
                 validation_fraction=0.25, validation_seed=0)
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


def test_validation_is_carved_from_train_and_everything_else_comes_from_the_train_split(tiny_pair):
  data = ucr.load(data_config(train_path=tiny_pair[0], test_path=tiny_pair[1]))
  carved = splits.carve(4, 0.25, 0)
  np.testing.assert_array_equal(data.indices["validation"], carved["validation"])
  assert list(carved["validation"]) == [2] and list(carved["train"]) == [0, 1, 3]  # seed 0 holds out TRAIN[2]
  cases = {"train": [TRAIN[i] for i in carved["train"]], "validation": [TRAIN[2]], "test": TEST}
  assert data.class_names == ("cat", "dog") and data.num_classes == 2 and data.name == "Tiny"
  # T: the longest train series (4 steps), not the test split's 5; the 5-step test series is cut.
  assert data.channels == 2 and data.max_len == 4 and data.num_cut == {"train": 0, "validation": 0, "test": 1}
  assert data.missing_indicators and data.input_dim == 4  # the train split holds the "?"
  np.testing.assert_array_equal(data.splits["train"]["label"], [1, 0, 0])
  np.testing.assert_array_equal(data.splits["validation"]["label"], [1])
  np.testing.assert_array_equal(data.splits["test"]["label"], [0, 1])
  np.testing.assert_array_equal(data.splits["train"]["valid"].sum(1), [3, 4, 3])
  np.testing.assert_array_equal(data.splits["validation"]["valid"].sum(1), [2])
  np.testing.assert_array_equal(data.splits["test"]["valid"].sum(1), [4, 1])
  for c in range(2):  # statistics of the train split's observed values, by hand (not validation's, not test's)
    observed = [v for case in cases["train"] for v in case[c] if v is not None]
    mean, std = np.mean(observed), np.std(observed)
    np.testing.assert_allclose([data.mean[c], data.std[c]], [mean, std], rtol=1e-12)
    for split, split_cases in cases.items():
      values = raw(split_cases, c, 4)
      x = data.splits[split]["x"]
      assert x.shape == (len(split_cases), 4, 4) and x.dtype == np.float32
      expected = np.where(np.isnan(values), 0.0, (values - mean) / std)
      np.testing.assert_allclose(x[..., c], expected, rtol=1e-6, atol=1e-6)
      missing = np.isnan(values) & data.splits[split]["valid"]
      np.testing.assert_array_equal(x[..., 2 + c], missing.astype(np.float32))
  assert data.splits["train"]["x"][1, 1, 2] == 1.0 and data.splits["train"]["x"][1, 1, 0] == 0.0  # the "?"
  assert abs(data.splits["test"]["x"][0, :, 0].mean()) > 2.0  # the test split keeps the train scale
  source = ucr.source(data_config(train_path=tiny_pair[0], test_path=tiny_pair[1]), "test")
  assert set(source[1]) == {"x", "valid", "label"} and source[1]["x"].shape == (4, 4) and int(source[1]["label"]) == 1
  with pytest.raises(ValueError, match="split 'dev'"):
    ucr.split_arrays(data_config(train_path=tiny_pair[0], test_path=tiny_pair[1]), "dev")


def test_missing_values_outside_the_train_split_add_no_indicator_channels(tmp_path):
  complete = [case for case in TRAIN if None not in case[0]]
  train = write_ts(tmp_path / "c_TRAIN.ts", complete + [([5.0, 6.0], [1.0, 0.0], "cat")])
  test = write_ts(tmp_path / "c_TEST.ts", [([1.0, None], [2.0, 3.0], "dog")])
  data = ucr.load(data_config(train_path=train, test_path=test))
  assert not data.missing_indicators and data.input_dim == 2
  x = data.splits["test"]["x"]
  assert x.shape[-1] == 2 and x[0, 1, 0] == 0.0  # the test gap is the train mean, no indicator says so
  np.testing.assert_allclose(x[0, 0, 0], (1.0 - data.mean[0]) / data.std[0], rtol=1e-6)


def test_equal_length_without_missing_values_numeric_labels_and_max_len(tmp_path):
  cases = [([1.0, 2.0, 3.0], "10"), ([2.0, 2.0, 5.0], "9"), ([0.0, 4.0, 1.0], "2")]
  train = write_ts(tmp_path / "a_TRAIN.ts", cases, equal_length=True)
  test = write_ts(tmp_path / "a_TEST.ts", cases[:2], equal_length=True)
  data = ucr.load(data_config(train_path=train, test_path=test, max_len=2, validation_fraction=0.0))
  assert data.class_names == ("2", "9", "10")  # numeric order, not "10" < "2"
  np.testing.assert_array_equal(data.splits["train"]["label"], [2, 1, 0])
  assert len(data.splits["validation"]["label"]) == 0  # validation_fraction 0: no validation split
  assert not data.missing_indicators and data.input_dim == 1 and data.max_len == 2
  assert data.splits["train"]["valid"].all() and data.num_cut == {"train": 3, "validation": 0, "test": 2}
  observed = np.array([[1.0, 2.0], [2.0, 2.0], [0.0, 4.0]])  # the first max_len steps
  np.testing.assert_allclose(data.splits["train"]["x"][..., 0], (observed - observed.mean()) / observed.std(),
                             rtol=1e-6)


def test_sktime_set_by_name():
  assert {"BasicMotions", "JapaneseVowels", "GunPoint"} <= set(ucr.dataset_names())
  assert "Tecator" not in ucr.dataset_names()  # a regression set (@targetLabel)
  data = ucr.load(data_config(dataset="BasicMotions", validation_fraction=0.1))
  assert data.splits["train"]["x"].shape == (36, 100, 6) and data.splits["validation"]["x"].shape == (4, 100, 6)
  assert data.splits["test"]["x"].shape == (40, 100, 6)
  assert data.num_classes == 4 and data.input_dim == 6
  with pytest.raises(ValueError, match="config.data.dataset='Nope'"):
    ucr.load(data_config(dataset="Nope"))


def test_the_papers_uea_sets_by_name_from_a_folder(tmp_path):
  assert len(ucr.PAPER_UEA_SETS) == 10
  for name in ucr.PAPER_UEA_SETS:  # the archive's layout: DIR/NAME/NAME_{TRAIN,TEST}.ts
    (tmp_path / name).mkdir()
    write_ts(tmp_path / name / f"{name}_TRAIN.ts", TRAIN)
    write_ts(tmp_path / name / f"{name}_TEST.ts", TEST)
  for name in ucr.PAPER_UEA_SETS:
    config = aaren_classification.get_config(f"aaren,{name}")
    config.data.dir = str(tmp_path)
    paths = ucr.dataset_paths(config.data)
    assert paths == (str(tmp_path / name / f"{name}_TRAIN.ts"), str(tmp_path / name / f"{name}_TEST.ts"))
  # JapaneseVowels ships with sktime too: the user's folder comes first.
  data = ucr.load(data_config(dataset="JapaneseVowels", dir=str(tmp_path)))
  assert data.paths[0] == str(tmp_path / "JapaneseVowels" / "JapaneseVowels_TRAIN.ts") and data.num_classes == 2
  # A missing file is an error naming its path.
  os.remove(tmp_path / "Heartbeat" / "Heartbeat_TEST.ts")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "Heartbeat" / "Heartbeat_TEST.ts"))):
    ucr.load(data_config(dataset="Heartbeat", dir=str(tmp_path)))
  empty = tmp_path / "empty"
  empty.mkdir()
  expected = str(empty / "PEMS-SF" / "PEMS-SF_TRAIN.ts")
  with pytest.raises(FileNotFoundError, match=re.escape(expected)):
    ucr.load(data_config(dataset="PEMS-SF", dir=str(empty)))


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
  batch = {k: jnp.asarray(v) for k, v in task.predict_fns["split_arrays"]("train").items()}
  score = task.predict_fns["score"]
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    """One Adam step, with the loss, score and outputs before it."""
    (value, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, None)
    updates, opt_state = tx.update(grads, opt_state, params)
    y = task.model.apply({"params": params}, batch["x"], valid=batch["valid"])
    return optax.apply_updates(params, updates), opt_state, (value, metrics, grads, score(params, batch), y)

  params, opt_state, (value, metrics, grads, scores, y) = jax.device_get(step(params, tx.init(params)))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  _, _, (after, *_) = step(params, opt_state)
  assert float(after) < float(value)

  valid, labels = np.asarray(batch["valid"]), np.asarray(batch["label"])
  n = len(labels)
  logits = np.stack([y[i, valid[i]].mean(0) for i in range(n)])  # mean over each series' valid steps
  correct = (logits.argmax(-1) == labels).astype(np.float32)
  np.testing.assert_array_equal(scores["accuracy"][0], correct)
  np.testing.assert_array_equal(scores["accuracy"][1], np.ones(n))
  np.testing.assert_allclose(metrics["accuracy"], correct.mean(), rtol=1e-6)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(scores["loss"][0], -log_probs[np.arange(n), labels], rtol=1e-4)
  np.testing.assert_allclose(value, scores["loss"][0].mean(), rtol=1e-4)  # no label smoothing: the same


def write_slopes(path, num, seed):
  """A learnable two-class set: rising (class "up") or falling ("down") series of 6-12 steps at random levels."""
  rng = np.random.default_rng(seed)
  cases = []
  for n in range(num):
    up = n % 2 == 0
    length = int(rng.integers(6, 13))
    level, slope = rng.normal(0.0, 2.0), (1.0 if up else -1.0) * rng.uniform(0.3, 0.6)
    values = level + slope * np.arange(length) + rng.normal(0.0, 0.1, length)
    cases.append(([round(float(v), 4) for v in values], "up" if up else "down"))
  return write_ts(path, cases)


@pytest.mark.slow
def test_a_trained_model_beats_chance_and_the_logged_accuracy_is_a_hand_count(tmp_path):
  """Trained 80 steps on rising vs falling series (chance 0.5): the test accuracy the run logs is the fraction
  of test series whose argmax of the mean-pooled outputs of the final parameters is the label, and it is high."""
  pair = write_slopes(tmp_path / "s_TRAIN.ts", 48, 0), write_slopes(tmp_path / "s_TEST.ts", 24, 1)
  config = tiny_config(pair)
  set_tiny_budget(config, num_steps=80, checkpoint_every=80)
  config.optimizer.lr = 1e-2
  config.optimizer.warmup_steps = 5
  config.log_every = 80
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["status"] == "done" and result["step"] == 80
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    final = {}
    for line in f:
      final.update(json.loads(line))
  assert final["metrics/num_examples"] == 5 and final["test/metrics/num_examples"] == 24  # 10% of 48 validate

  run = tasks.load_run(str(tmp_path / "run"))
  test = run.task.predict_fns["split_arrays"]("test")
  y = np.asarray(run.task.model.apply({"params": run.params}, test["x"], valid=test["valid"]))
  logits = np.stack([y[i, test["valid"][i]].mean(0) for i in range(len(y))])
  by_hand = float(np.mean(logits.argmax(-1) == test["label"]))
  assert final["test/metrics/accuracy"] == pytest.approx(by_hand, abs=1e-6)
  assert by_hand >= 0.9  # an untrained model is at chance, 0.5
  assert np.isfinite(final["test/metrics/loss"]) and final["test/metrics/loss"] < np.log(2)
