"""The timing benchmarks' floors (nbp.roofline) on tiny models: what they count, not how fast anything runs."""

import jax
import pytest
from absl import flags
from absl.testing import flagsaver

from experiments import benchmark_ebt, benchmark_generation, benchmark_throughput, benchmark_xar
from nbp import roofline
from nbp.training import loop as train


@pytest.fixture
def tiny_setting(monkeypatch):
  # 2 layers, width 64, vocab 64, a 3x4x4 grid with 1 given frame: 16 prefix tokens, 32 generated.
  monkeypatch.setitem(benchmark_generation.SETTINGS, "tiny", (2, 64, 4, 64, (3, 4, 4), 1))
  return "tiny"


def test_generation_rows_carry_step_and_prefill_floors(tiny_setting):
  rows = benchmark_generation.measure(tiny_setting, 2, [(1, 1, 4)], repeats=1, cache_phases=[2], before_rev="",
                                      bandwidth=1e10)
  assert [r["sampler"] for r in rows] == ["ntp", "nbp 1x1x4"]
  for r in rows:
    for what in ("step", "prefill"):
      assert r[f"{what}_floor_ms"] > 0 and r[f"{what}_floor_bound"] in ("bandwidth", "compute")
      assert r[f"{what}_of_floor"] == pytest.approx(
          (r["ms_per_step"] if what == "step" else 1e3 * r["prefill_seconds"]) / r[f"{what}_floor_ms"])


def test_a_block_step_is_floored_by_its_weights_cache_and_flops(tiny_setting):
  """The block step's FLOPs are at least the projections' 2 x weights x rows; its bytes the weights and cache."""
  api = benchmark_generation.Api()
  batch, block = 2, (1, 1, 4)
  model = api.build(tiny_setting, block)
  params = jax.jit(model.init)(jax.random.key(0), jax.numpy.zeros((1, model.num_tokens), jax.numpy.int32))["params"]
  machine_bandwidth = 1e10
  floors = benchmark_generation.step_floors(api, model, params, batch, machine_bandwidth, repeats=1)
  weights = roofline.tree_bytes(params)
  rows = batch * model.block_len
  decoder_weights = sum(x.size for x in jax.tree.leaves(params["decoder"]))
  step = floors["step"]
  # Every layer's projections over the block's rows, and the head, but not the whole sequence.
  matmuls = 2 * rows * (decoder_weights + sum(x.size for x in jax.tree.leaves(params["head"])))
  assert matmuls <= step.flops <= 2 * matmuls, (step.flops, matmuls)
  # Weights and the cache of the mean step: 16 prefix + 4 start slots, then blocks 1..7 of 4 tokens.
  slot_bytes = 2 * 2 * batch * 64 * 4  # layers x (key, value) x batch x width x float32
  mean_slots = 16 + sum((k + 1) * 4 for k in range(1, model.num_blocks)) / (model.num_blocks - 1)
  assert step.bytes_read == pytest.approx(weights + slot_bytes * mean_slots, rel=1e-6)
  assert step.memory_seconds == pytest.approx(step.bytes_read / machine_bandwidth)
  prefill = floors["prefill"]
  assert prefill.flops > step.flops  # 20 rows against 4


@pytest.mark.parametrize("family", list(benchmark_throughput.FAMILIES))
def test_throughput_configs_take_the_size_asked_for(family):
  config = benchmark_throughput.family_config(family, "M", batch=4)
  assert config.model.variant == "M" and config.batch_size == 4
  model = train.setup(config).task.model
  assert (model.depth, model.embed_dim) == type(model).SIZES["M"][:2]


def test_throughput_names_a_config_without_attention_impl():
  with pytest.raises(ValueError, match="aaren_forecasting.py's model has no attention_impl"):
    benchmark_throughput.family_config("aaren", "S", impl="xla")


def test_throughput_times_a_given_config_as_it_is():
  """--step_config: the config's own sizes and batch, the attention impl asked for; a model without one named."""
  from experiments.configs import nbp_digits, video_tokenizer_digits  # pylint: disable=g-import-not-at-top
  given = nbp_digits.get_config("XS,local,tokens,row")
  config = benchmark_throughput.family_config("next_block", "XS", impl="xla_blocksparse", given=given)
  assert config.model.attention_impl == "xla_blocksparse" and given.model.attention_impl == "auto"
  assert config.batch_size == given.batch_size and config.model.num_class_tokens == 4
  with pytest.raises(ValueError, match="the given video_tokenizer config's model has no attention_impl"):
    benchmark_throughput.family_config("video_tokenizer", "", impl="xla",
                                       given=video_tokenizer_digits.get_config("local"))


def test_throughput_variants_set_typed_config_keys_and_name_a_bad_one():
  """--step_variants: each KEY=VALUE typed like the key it replaces, the given config untouched; bad items named."""
  from experiments.configs import video_tokenizer_digits  # pylint: disable=g-import-not-at-top
  given = video_tokenizer_digits.get_config("local")
  overrides = benchmark_throughput.parse_variant("model.resample=conv,batch_size=4")
  config = benchmark_throughput.family_config("video_tokenizer", "", given=given, overrides=overrides)
  assert (config.model.resample, config.batch_size) == ("conv", 4) and isinstance(config.batch_size, int)
  assert given.model.resample == "space_to_depth" and given.batch_size == 8
  for bad in ("model.resampling", "model.resample.kind"):  # a missing key, a key below a leaf
    with pytest.raises(KeyError, match=bad):
      benchmark_throughput.family_config("video_tokenizer", "", given=given, overrides={bad: "conv"})
  with pytest.raises(ValueError, match="model.resample"):
    benchmark_throughput.parse_variant("model.resample")


def test_throughput_step_counts_xlas_flops(tmp_path):
  config = benchmark_throughput.family_config("xar", "tiny", batch=4, data_dir=str(tmp_path))
  row = benchmark_throughput.train_step_rate(config, repeats=1)
  assert row["step_flops"] > 6 * row["params"] * 4  # forward and backward over every example, at least
  assert row["flops_per_sec"] == pytest.approx(row["step_flops"] / row["seconds_per_step"])
  assert "profile" not in row


def test_throughput_profile_splits_the_train_step(tmp_path):
  config = benchmark_throughput.family_config("xar", "tiny", batch=4, data_dir=str(tmp_path / "data"))
  ops = benchmark_throughput.train_step_rate(config, repeats=1, profile_dir=str(tmp_path / "trace"))["profile"]
  kinds = {r["kind"] for r in ops}
  assert "matmul" in kinds and any("mlp" in r["where"] for r in ops if r["kind"] == "matmul")


@pytest.fixture
def parsed_flags():
  """The benchmarks' absl flags at their defaults, parsed (as `app.run` would), restored afterwards."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver():
    yield flags.FLAGS


def test_xar_solver_calls_carry_their_floor(parsed_flags):
  parsed_flags.smoke = True
  row = benchmark_xar.speed(2, bandwidth=1e10)
  calls = row["calls"]
  assert calls["cell (4 entities)"]["calls"] == 4 * 3  # 2 solver steps and the context's call per entity
  assert calls["token (64 entities)"]["calls"] == 64 * 3
  for c in calls.values():
    assert c["floor_ms"] > 0 and c["of_floor"] == pytest.approx(c["ms_per_call"] / c["floor_ms"])


def test_ebt_thinking_step_carries_its_floor(parsed_flags, tmp_path):
  parsed_flags.ebt_smoke = True
  parsed_flags.ebt_speed_batches = ["2"]
  parsed_flags.ebt_data_dir = str(tmp_path)
  rows = benchmark_ebt.speed_part()
  step = next(r for r in rows if r["what"] == "thinking step")
  assert step["batch"] == 2 and step["of_floor"] == pytest.approx(step["ms"] / step["floor_ms"])
  generation = {r["model"]: r for r in rows if r["what"] == "generation"}
  assert generation["Transformer++"]["vs_transformer_pp"] == 1.0
  assert all(r["tokens_per_s"] > 0 for r in generation.values())


def test_step_breakdown_times_every_part(tiny_setting):
  api = benchmark_generation.Api()
  model = api.build(tiny_setting, (1, 1, 4))
  params = jax.jit(model.init)(jax.random.key(0), jax.numpy.zeros((1, model.num_tokens), jax.numpy.int32))["params"]
  parts = benchmark_generation.step_breakdown(api, model, params, 2, repeats=1, iterations=2)
  assert set(parts) == {"step", "model call", "model call, no cache", "top-p draw"}
  assert all(ms > 0 for ms in parts.values())


def test_generation_profile_traces_the_block_step_and_the_prefill(tiny_setting, tmp_path, capsys):
  api = benchmark_generation.Api()
  run_sampler, _, model = list(benchmark_generation.compiled_runs(api, tiny_setting, 1, [(1, 1, 4)], [2]).values())[-1]
  benchmark_generation.step_floors(api, model, run_sampler.params, 1, 1e10, repeats=1,
                                   profile_dir=str(tmp_path))
  printed = capsys.readouterr().out
  assert f"{tmp_path}: step" in printed and f"{tmp_path}: prefill" in printed and "matmul" in printed
  assert (tmp_path / "step").is_dir() and (tmp_path / "prefill").is_dir()
