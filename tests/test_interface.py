"""The interface between the loop, the evaluators and the families: named predict functions, the splits evaluators
read (validation in training, test once), runs loaded by their workdir, and the import rule behind it."""

import ast
import dataclasses
import glob
import json
import os

import jax
import numpy as np
import pytest

from nbp import evaluators
from nbp import tasks
from nbp.training import loop as train
from nbp.training import metrics as metrics_lib
from tests.conftest import REPO, config_flags_for, run_module, tiny_ntp_config


# ---------------------------------------------------------------------------
# Task.predict_fn: the named functions a family offers.

def _loss(params, batch, rng):
  del params, batch, rng
  return 1.0, {}


def _eval_loss(params, batch, rng):
  del params, batch, rng
  return 2.0, {}


def _task(**predict_fns):
  return tasks.Task(model=None, init_inputs=dict, loss=_loss, data=None, predict_fns=predict_fns)


def test_predict_fn_returns_what_the_family_offers():
  sample = lambda params, rng: params
  task = _task(sample=sample, eval_loss=_eval_loss)
  assert task.predict_fn("sample", who="x") is sample
  assert task.predict_fn("eval_loss") is _eval_loss  # the family's own held-out loss wins over the loss
  assert task.offers("sample") and not task.offers("score")


def test_a_missing_name_names_the_asker_and_what_the_family_offers():
  task = _task(sample=lambda params, rng: params, to_videos=np.asarray)
  with pytest.raises(ValueError, match=r"the rollout evaluator asks for predict function 'rollout', which this "
                                       r"family does not offer; it offers \['sample', 'to_videos'\]"):
    task.predict_fn("rollout", who="the rollout evaluator")
  with pytest.raises(ValueError, match=r"predict function 'score'.*it offers \[\]"):
    _task().predict_fn("score")


def test_eval_loss_falls_back_on_the_loss():
  task = _task()
  assert task.offers("eval_loss") and task.predict_fn("eval_loss", who="x") is _loss


def test_the_standard_names_are_documented_and_task_has_no_per_family_fields():
  """The standard names mean one thing everywhere: PREDICT_FNS documents each."""
  assert {"eval_loss", "sample", "write_samples", "sample_images", "to_images", "to_videos", "from_videos",
          "split_arrays", "score", "rollout"} <= set(tasks.PREDICT_FNS)
  assert not any(hasattr(tasks.Task, name) for name in ("evaluate", "sample", "to_videos", "examples", "score",
                                                        "rollout", "sample_images"))  # no per-family fields


@dataclasses.dataclass(eq=False)
class _FakeSetup:
  """What the loss evaluator reads of nbp.training.loop.Setup before it compiles anything."""

  config: object
  task: tasks.Task


def test_an_evaluator_config_naming_a_missing_function_fails_with_that_error():
  task = _task(sample=lambda params, rng: params)
  task = dataclasses.replace(task, data=lambda split, **kw: iter([{"x": np.zeros(2)}]))
  setup = _FakeSetup(config=type("C", (), {"batch_size": 2, "seed": 0})(), task=task)
  context = evaluators.Context(setup=setup, params=None, params_name="params", step=0, workdir="",
                               rng=jax.random.key(0))
  built = evaluators.build({"eval": dict(type="loss", pred="held_out")})
  with pytest.raises(ValueError, match=r"the loss evaluator asks for predict function 'held_out'.*\['sample'\]"):
    evaluators.run(built, context, final=True)
  psnr = evaluators.build({"psnr": dict(type="psnr", pred="reconstruct")})
  with pytest.raises(ValueError, match=r"the psnr evaluator asks for predict function 'reconstruct'"):
    evaluators.run(psnr, context, final=True)


def test_a_config_naming_a_missing_function_fails_before_the_first_step():
  """The loop checks every evaluator's named functions against the family before training (naming the key)."""
  task = _task(sample=lambda params, rng: params, split_arrays=lambda split: {})
  built = evaluators.build({"metrics": dict(type="split_metrics", pred="score"),
                            "sample": dict(type="samples")})
  with pytest.raises(ValueError, match=r"config\.evals\.metrics\.pred='score': this family does not offer it"):
    evaluators.check_predict_fns(built, task)
  # The samples writer is optional (every config has one); a family with a score passes.
  evaluators.check_predict_fns(evaluators.build({"sample": dict(type="samples", pred="draw")}), task)
  evaluators.check_predict_fns(built, _task(score=lambda p, b: {}, split_arrays=lambda split: {}))
  wrong_arrays = evaluators.build({"metrics": dict(type="split_metrics", arrays="examples")})
  with pytest.raises(ValueError, match=r"config\.evals\.metrics\.arrays='examples'"):
    evaluators.check_predict_fns(wrong_arrays, _task(score=lambda p, b: {}, split_arrays=lambda split: {}))


# ---------------------------------------------------------------------------
# The splits the loop's evaluators read: validation in training, test once at the end.

def _recording_make_task(calls: list[str]):
  """tasks.make_task whose Task.data records the split of every call (train, validation or test)."""
  make_task = tasks.make_task

  def wrapped(config):
    task = make_task(config)

    def data(split, **kwargs):
      calls.append(split)
      return task.data(split, **kwargs)
    return dataclasses.replace(task, data=data)
  return wrapped


def _interface_config(data_dir, **overrides):
  """The tiny next-token run, evaluated at step 2 and at its end (step 4); no sample evaluator."""
  c = tiny_ntp_config(data_dir, **overrides)
  c.evals.eval.every = 2
  with c.unlocked():
    del c.evals["sample"]
  return c


@pytest.fixture(scope="module")
def tested_run(data_dir, tmp_path_factory):
  """(workdir, config, rows, splits read) of the tiny run with config.eval_test_at_end=True."""
  workdir = str(tmp_path_factory.mktemp("interface"))
  config = _interface_config(data_dir, eval_test_at_end=True)
  calls = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train.tasks_lib, "make_task", _recording_make_task(calls))
    result = train.train_and_evaluate(config, workdir)
  assert result["status"] == "done" and result["step"] == 4
  return workdir, config, metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")), calls


@pytest.mark.slow
def test_evaluators_read_validation_and_test_is_logged_once_at_the_end(tested_run):
  _, _, rows, calls = tested_run
  assert calls == ["train", "validation", "validation", "test"]  # eval at steps 2 and 4, then test once
  validation = [r for r in rows if "eval/loss" in r]
  test = [r for r in rows if any(k.startswith("test/") for k in r)]
  assert [r["step"] for r in validation] == [2, 4] and [r["step"] for r in test] == [4]
  test_keys = {k for k in test[0] if k.startswith("test/")}
  assert test_keys == {f"test/{k}" for k in validation[-1] if k.startswith("eval/")}  # every evaluator, on test
  assert not any(k.startswith("eval/") for k in test[0])  # logged apart from the validation pass
  assert test[0]["test/eval/loss"] != validation[-1]["eval/loss"]  # other data, another loss
  assert np.isfinite(test[0]["test/eval/loss"])


@pytest.mark.slow
def test_without_eval_test_at_end_nothing_reads_or_logs_test(data_dir, tmp_path):
  config = _interface_config(data_dir, num_steps=2)
  calls = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train.tasks_lib, "make_task", _recording_make_task(calls))
    train.train_and_evaluate(config, str(tmp_path))
  rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert calls == ["train", "validation"]
  assert not any(k.startswith("test/") for r in rows for k in r)
  assert [r["step"] for r in rows if "eval/loss" in r] == [2]


@pytest.mark.slow
def test_load_run_gives_the_parameters_evaluation_used(tested_run):
  """tasks.load_run(workdir) alone (config.json and checkpoint): its eval_loss on the evaluator's batch and key
  is the loop's final eval/loss, and on the test split the logged test/eval/loss."""
  workdir, config, rows, _ = tested_run
  run = tasks.load_run(workdir)
  assert run is tasks.load_run(workdir)  # loaded once per process
  assert run.config.family == config.family and run.task.model.grid == tuple(config.model.grid)
  _, params, _, step = train.load_params(config, workdir)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), jax.device_get(params))
  eval_loss = jax.jit(run.predict("eval_loss"))
  logged = {"validation": [r for r in rows if "eval/loss" in r][-1]["eval/loss"],
            "test": [r for r in rows if "test/eval/loss" in r][-1]["test/eval/loss"]}
  for split, value in logged.items():
    batch = next(run.task.data(split, seed=config.seed, process_index=0, process_count=1,
                               batch_size=config.batch_size))  # the loss evaluator's one batch
    loss, _ = eval_loss(batch, jax.random.fold_in(jax.random.key(config.seed + 2), 0))
    np.testing.assert_allclose(float(loss), value, rtol=1e-5)
  with pytest.raises(ValueError, match=rf"a user of the run in {workdir} asks for predict function 'rollout'"):
    run.predict("rollout")


@pytest.mark.slow
def test_evaluate_with_split_test_writes_its_own_file(tested_run):
  workdir, config, rows, _ = tested_run
  flags = ["--config", "experiments/configs/ntp_digits.py:tiny,local", "--workdir", workdir,
           *config_flags_for(config)]
  result = run_module(["-m", "experiments.evaluate", *flags, "--split", "test"])
  assert result.returncode == 0, result.stderr[-3000:]
  path = os.path.join(workdir, "eval_4_test.json")
  with open(path) as f:
    written = json.load(f)
  assert written == json.loads(result.stdout.strip().splitlines()[-1])
  assert written["step"] == 4 and written["params"] == "params"
  logged = [r for r in rows if "test/eval/loss" in r][-1]
  np.testing.assert_allclose(written["test/eval/loss"], logged["test/eval/loss"], rtol=1e-5)  # the same pass
  assert not os.path.exists(os.path.join(workdir, "eval_4.json"))  # the validation report is another file
  result = run_module(["-m", "experiments.evaluate", *flags, "--split", "dev"])
  assert result.returncode != 0 and "dev" in result.stderr
  result = run_module(["-m", "experiments.evaluate", *flags, "--split", "test", "--step", "4", "--raw_params"])
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "eval_4_test_raw.json")) as f:
    assert json.load(f)["params"] == "params"  # a run without an EMA: its raw parameters either way
  result = run_module(["-m", "experiments.evaluate", *flags, "--step", "3"])
  assert result.returncode != 0 and "No checkpoint of step 3" in result.stderr


# ---------------------------------------------------------------------------
# Imports: no evaluator imports a family, no family imports another; what they share lives elsewhere.

FAMILY_MODULES = set(tasks.FAMILIES.values())


def _imported_modules(path: str, package: str) -> set[str]:
  """Every module `path` imports (at any depth of the file), absolute; `from a import b` counts a and a.b."""
  tree = ast.parse(open(path).read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the file's package upwards
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      names.add(base)
      names.update(f"{base}.{alias.name}" for alias in node.names)
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      names.add(node.args[0].value)
  return names


def _families_imported(path: str, package: str) -> set[str]:
  """The family modules (nbp.tasks.FAMILIES) `path` imports, or imports from."""
  return {f for m in _imported_modules(path, package) for f in FAMILY_MODULES if m == f or m.startswith(f + ".")}


def test_the_import_parser_sees_every_form(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("import nbp.tasks.xar\nfrom nbp.tasks import kl_vae as k\nfrom . import next_block\n"
                  "def f():\n  from nbp.tasks.events import loss\n  importlib.import_module('nbp.tasks.decision')\n"
                  "from nbp import tasks\n")
  assert _families_imported(str(path), "nbp.tasks") == {
      "nbp.tasks.xar", "nbp.tasks.kl_vae", "nbp.tasks.next_block", "nbp.tasks.events", "nbp.tasks.decision"}


def _files(pattern: str) -> list[str]:
  return sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, pattern)))


@pytest.mark.parametrize("name", _files("nbp/evaluators/*.py"))
def test_no_evaluator_imports_a_family(name):
  assert not _families_imported(os.path.join(REPO, name), "nbp.evaluators")


@pytest.mark.parametrize("name", _files("nbp/tasks/*.py"))
def test_no_family_imports_another(name):
  module = "nbp.tasks." + os.path.basename(name)[:-3]
  assert name.endswith("__init__.py") or module in FAMILY_MODULES, f"{name} is in nbp/tasks but not a family"
  assert not _families_imported(os.path.join(REPO, name), "nbp.tasks") - {module}


def test_every_family_module_exists():
  for module in FAMILY_MODULES:
    assert os.path.exists(os.path.join(REPO, *module.split(".")) + ".py"), module
