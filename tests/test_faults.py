"""Damaged files: checkpoints fall back to the previous step, damaged data stops the run after saving it.

Every test damages files it wrote itself (a copy of a trained workdir, a
dataset built in its own directory), by truncating a file or flipping bytes in
its middle, as a full disk or a bad copy would.
"""

import logging
import os
import pickle
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python import array_record_module
from flax import serialization

from nbp.data import moving_digits
from nbp.data import pipeline
from nbp.data import tokens as tokens_lib
from nbp.training import checkpoint as checkpoint_lib
from nbp.training import loop as train
from tests.conftest import tiny_ntp_config


def _truncate(path: str) -> None:
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _garble(path: str, offset: int, n: int = 8) -> None:
  """Flips the bits of n bytes at `offset`."""
  with open(path, "r+b") as f:
    f.seek(offset)
    data = bytearray(f.read(n))
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


def _largest_file(directory: str) -> str:
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def _warnings(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---------------------------------------------------------------------------
# Checkpoints of a toy state (no model): every kind of damage, fast.

def _toy_state(k: float):
  return {"w": jnp.full((16, 32), k, jnp.float32), "b": jnp.arange(4, dtype=jnp.float32) + k}


def _toy_iterator():
  return iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())


def _toy_checkpoints(directory, steps=(2, 4, 6)):
  """Saves the toy state k at step k, the iterator having yielded one batch per saved step."""
  ckpt = checkpoint_lib.Checkpoints(directory, keep=3, async_save=False)
  it = _toy_iterator()
  for step in steps:
    next(it)
    ckpt.save(step, _toy_state(step), it)
  ckpt.close()


DAMAGES = {
    "truncated_metadata": ("state/_METADATA", _truncate),
    "truncated_array": ("state/d", lambda path: _truncate(_largest_file(path))),
    "truncated_iterator": ("data/process_0-of-1.json", _truncate),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_restore_skips_a_damaged_latest_step_and_saves_over_it(tmp_path, caplog, damage):
  _toy_checkpoints(tmp_path)
  relative, damage_fn = DAMAGES[damage]
  damage_fn(str(tmp_path / "6" / relative))
  abstract = jax.eval_shape(lambda: _toy_state(0.0))

  caplog.set_level(logging.WARNING)
  ckpt = checkpoint_lib.Checkpoints(str(tmp_path), keep=3, async_save=False)
  it = _toy_iterator()
  step, state = ckpt.restore_latest(abstract, it)
  assert step == 4 and float(state["w"][0, 0]) == 4.0
  np.testing.assert_array_equal(next(it), [4, 5])  # the iterator is where step 4 left it
  warned = _warnings(caplog)
  assert "step 6" in warned and "Skipped it" in warned and "can be removed" in warned
  if damage != "truncated_array":  # the parse error does not name the file: the warning does
    assert os.path.join(str(tmp_path), "6", relative) in warned, warned
  assert os.path.isdir(tmp_path / "6")  # nothing deleted at restore time

  # Training on from 4 saves 5 and 6: the damaged 6 is moved aside, not refused.
  for s in (5, 6, 7):
    ckpt.save(s, _toy_state(s), it)
  ckpt.close()
  assert os.path.isdir(tmp_path / ("6" + checkpoint_lib.DAMAGED_SUFFIX))
  step, state = checkpoint_lib.restore_state(str(tmp_path), abstract)
  assert step == 7 and float(state["w"][0, 0]) == 7.0
  ckpt = checkpoint_lib.Checkpoints(str(tmp_path), keep=3, async_save=False)
  step, state = ckpt.restore_latest(abstract, _toy_iterator())
  assert step == 7 and not ckpt.skipped  # <step>.damaged is not a step to orbax
  ckpt.close()


def test_no_restorable_step_names_every_step(tmp_path):
  _toy_checkpoints(tmp_path)
  for step in (2, 4, 6):
    _truncate(str(tmp_path / str(step) / "state" / "_METADATA"))
  abstract = jax.eval_shape(lambda: _toy_state(0.0))
  ckpt = checkpoint_lib.Checkpoints(str(tmp_path), keep=3, async_save=False)
  with pytest.raises(checkpoint_lib.CheckpointRestoreError) as info:
    ckpt.restore_latest(abstract, _toy_iterator())
  message = str(info.value)
  assert str(tmp_path) in message
  for step in (6, 4, 2):
    assert f"step {step}: " in message and os.path.join(str(tmp_path), str(step), "state", "_METADATA") in message
  ckpt.close()
  with pytest.raises(checkpoint_lib.CheckpointRestoreError, match="step 2: "):
    checkpoint_lib.restore_state(str(tmp_path), abstract)


def test_restore_params_skips_a_damaged_step(tmp_path, caplog):
  _toy_checkpoints(tmp_path)
  _truncate(_largest_file(str(tmp_path / "6" / "state" / "d")))
  caplog.set_level(logging.WARNING)
  step, state = checkpoint_lib.restore_state(str(tmp_path), jax.eval_shape(lambda: _toy_state(0.0)))
  assert step == 4 and float(state["b"][1]) == 5.0
  assert "step 6" in _warnings(caplog)
  assert sorted(os.listdir(tmp_path)) == ["2", "4", "6"]  # read-only: nothing moved


# ---------------------------------------------------------------------------
# A trained tiny model: resume and parameter loading.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir of the tiny config trained 6 steps, with checkpoints at 2, 4 and 6 (copy before damaging)."""
  data_dir = str(tmp_path_factory.mktemp("fault_data"))
  workdir = str(tmp_path_factory.mktemp("fault_trained"))
  config = tiny_ntp_config(data_dir, num_steps=6, checkpoint_every=2)
  train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  return config, workdir


def _damaged_copy(trained, tmp_path) -> str:
  """A copy of the trained workdir whose step 6 has a truncated `_METADATA`."""
  _, workdir = trained
  copy = str(tmp_path / "work")
  shutil.copytree(workdir, copy)
  _truncate(os.path.join(copy, "checkpoints", "6", "state", "_METADATA"))
  return copy


@pytest.mark.slow  # two trainings of the tiny model (compilation: ~20 s each on 2 cores)
def test_training_resumes_from_the_step_before_a_damaged_one(trained, tmp_path, caplog):
  config, intact = trained
  workdir = _damaged_copy(trained, tmp_path)
  caplog.set_level(logging.WARNING)
  result = train.train_and_evaluate(config, workdir)  # the same 6 steps: 5 and 6 are trained again
  assert result["status"] == "done" and result["step"] == 6
  warned = _warnings(caplog)
  assert "Checkpoint step 6" in warned and os.path.join(workdir, "checkpoints", "6", "state", "_METADATA") in warned
  assert "at step 4" in warned  # "Resuming from ... at step 4."
  # Step 6 was saved anew beside the damaged one, and equals the uninterrupted run's step 6.
  names = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert names == ["2", "4", "6", "6" + checkpoint_lib.DAMAGED_SUFFIX], names
  s = train.setup(config)
  (step_a, a), (step_b, b) = (checkpoint_lib.restore_state(w, s.abstract_state) for w in (intact, workdir))
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))


@pytest.mark.slow  # the shared trained workdir: one training of the tiny model (~40 s on 2 cores)
def test_parameters_of_a_workdir_with_a_damaged_latest_step(trained, tmp_path, caplog):
  config, workdir = trained
  damaged = _damaged_copy(trained, tmp_path)
  caplog.set_level(logging.WARNING)
  s, params, name, step = train.load_params(config, damaged)  # parameters only, as sampling and eval read them
  assert step == 4 and name == "params"
  assert "step 6" in _warnings(caplog)
  # The parameters of the intact workdir's step 4.
  ckpt = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=3)
  intact = ckpt.restore(4, s.abstract_state)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(intact.params))


# ---------------------------------------------------------------------------
# Damaged dataset files.

def _records_end(path: str) -> int:
  """Where an ArrayRecord file's records end: the first run of zero padding (the index follows it)."""
  data = np.fromfile(path, np.uint8)
  zero = np.concatenate([[False], data == 0, [False]]).astype(np.int8)
  starts, ends = np.flatnonzero(np.diff(zero) == 1), np.flatnonzero(np.diff(zero) == -1)
  long_runs = starts[(ends - starts) >= 256]
  return int(long_runs[0]) if len(long_runs) else len(data)


def _broken_records(source) -> list[int]:
  broken = []
  for i in range(len(source)):
    try:
      source[i]
    except pipeline.DataCorruptionError as e:
      broken.append(e.record)
  return broken


def _damage_record(path: str, record: int, open_source) -> None:
  """Flips bytes inside `record` of an ArrayRecord file written one record per chunk.

  Chunks follow the records' order but vary in size, so the offset is found by
  bisection: flip, read back which records broke, restore, move. Past the
  records lies the index (all records break). `open_source()` opens the file
  afresh (a reader keeps what it has read).
  """
  with open(path, "rb") as f:
    original = f.read()
  lo, hi = 0, _records_end(path)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    _garble(path, mid)
    broken = _broken_records(open_source())
    if broken == [record]:
      return
    with open(path, "wb") as f:
      f.write(original)
    if len(broken) <= 2 and (not broken or broken[0] < record):  # before the record (or straddling into it)
      lo = mid
    else:
      hi = mid
  raise AssertionError(f"could not damage record {record} of {path} alone")


def test_damaged_tfds_record_names_file_record_and_rebuild(tmp_path):
  config = tiny_ntp_config(str(tmp_path))
  builder = moving_digits.builder_from_config(config.data)
  (path,) = [fi.filename for fi in builder.info.splits["train"].file_instructions]
  _damage_record(path, 40, lambda: pipeline.load_source(builder, "train"))
  source = pipeline.load_source(builder, "train")
  source[39], source[41]  # pylint: disable=pointless-statement  # the other records still read
  with pytest.raises(pipeline.DataCorruptionError) as info:
    source[40]
  e = info.value
  assert e.path == path and e.record == e.index == 40
  message = str(e)
  assert path in message and "record 40 " in message
  assert f"delete {builder.data_dir}" in message and "regenerates" in message
  # The error survives the trip back from a grain worker process.
  again = pickle.loads(pickle.dumps(e))
  assert (type(again), again.path, again.record, str(again)) == (type(e), e.path, e.record, message)
  # A bare tfds source given to make_iterator is checked too.
  it = pipeline.make_iterator(builder.as_data_source("train"), global_batch_size=64, seed=0,
                              process_index=0, process_count=1)
  with pytest.raises(pipeline.DataCorruptionError, match="record"):
    next(it)


@pytest.mark.slow  # two trainings of the tiny model (compilation: ~20 s each on 2 cores)
def test_damaged_data_stops_training_after_saving_its_progress(tmp_path):
  config = tiny_ntp_config(str(tmp_path / "data"), num_steps=6, checkpoint_every=100)
  builder = moving_digits.builder_from_config(config.data)
  (path,) = [fi.filename for fi in builder.info.splits["train"].file_instructions]
  # A record of the third batch (after two steps), in the loop's example order.
  order = pipeline.make_dataset(list(range(config.data.num_train)), global_batch_size=config.batch_size,
                                seed=config.seed, process_index=0, process_count=1)
  record, failing_step = int(order[2][3]), 2
  _damage_record(path, record, lambda: pipeline.load_source(builder, "train"))

  workdir = str(tmp_path / "work")
  with pytest.raises(pipeline.DataCorruptionError) as info:
    train.train_and_evaluate(config, workdir)
  e = info.value
  assert e.path == path and e.record == record
  assert path in str(e) and f"record {record}" in str(e) and f"delete {builder.data_dir}" in str(e)
  assert any(f"Saved step {failing_step}" in note for note in e.__notes__), e.__notes__
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(failing_step)]

  # Rebuilt as the message says: the checkpoint holds the state after two
  # steps and the data position before the batch that failed.
  shutil.rmtree(builder.data_dir)
  moving_digits.builder_from_config(config.data)
  s = train.setup(config)
  resumed_iter, fresh_iter = (train.data_iterator(s, "train", config.seed) for _ in range(2))
  ckpt = checkpoint_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep=3)
  state = ckpt.restore(failing_step, s.abstract_state, resumed_iter)
  ckpt.close()
  assert int(state.step) == failing_step
  for _ in range(failing_step):
    next(fresh_iter)
  jax.tree.map(np.testing.assert_array_equal, next(resumed_iter), next(fresh_iter))
  result = train.train_and_evaluate(config, workdir)
  assert result["status"] == "done" and result["step"] == 6


def _write_tokens(directory: str, n: int) -> str:
  os.makedirs(directory, exist_ok=True)
  path = tokens_lib.record_path(directory, "train")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  rng = np.random.default_rng(0)
  for _ in range(n):
    writer.write(serialization.msgpack_serialize(
        {"tokens": rng.integers(0, 8, (2, 2, 2)).astype(np.int32), "label": np.zeros((1,), np.int32)}))
  writer.close()
  with open(os.path.join(directory, tokens_lib.METADATA), "w") as f:
    f.write('{"latent_shape": [2, 2, 2], "codebook_size": 8, "tokenizer_workdir": "/runs/tok"}')
  return path


def test_damaged_token_record_names_file_and_record(tmp_path):
  directory = str(tmp_path / "tokens")
  path = _write_tokens(directory, 32)
  _damage_record(path, 20, lambda: tokens_lib.token_source(directory, "train"))
  source = tokens_lib.token_source(directory, "train", grid=(2, 2, 2), codebook_size=8)
  with pytest.raises(pipeline.DataCorruptionError) as info:
    source[20]
  message = str(info.value)
  assert info.value.path == path and path in message and "record 20 " in message
  assert "experiments.encode_tokens" in message and directory in message
  with pytest.raises(IndexError):  # out of range is not damage
    source[32]
  it = pipeline.make_iterator(source, global_batch_size=32, seed=0, process_index=0, process_count=1)
  with pytest.raises(pipeline.DataCorruptionError, match="record 20 "):
    next(it)
