"""Seeing inside a run and surviving preemption: TensorBoard beside metrics.jsonl, MFU, the
profiler, SIGTERM/SIGINT stops with a checkpoint at the step in flight, one run per workdir,
time-based checkpoints, hooks that need no loop edit, a torn metrics line."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import preemption as driver
from conftest import EXPERIMENTS, experiment
from dcmodel import cli, hostenv
from dcmodel.perf import calibrate, hardware, peak, trace
from dcmodel.train import hooks as hooks_lib
from dcmodel.train import optimizer, preemption
from dcmodel.train.loop import train
from dcmodel.train.metrics import read

CNN = str(EXPERIMENTS / "digits_cnn.py")


def cnn(*overrides):
  return experiment("digits_cnn", "train.steps=12", "train.log_every=3", "checkpoint.every_steps=6", *overrides)


def tensorboard_scalars(workdir):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(workdir), size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_same_values_as_metrics_jsonl(tmp_path):
  result = train(cnn("train.eval_every=6"), tmp_path / "w")
  records = [r for r in read(tmp_path / "w" / "metrics.jsonl") if r["split"] in ("train", "eval", "data")]
  scalars = tensorboard_scalars(tmp_path / "w")
  compared = 0
  for r in records:
    for key, value in r.items():
      if key in ("step", "split", "time") or isinstance(value, (bool, str)):
        continue
      assert scalars[f"{r['split']}/{key}"][r["step"]] == np.float32(value), (r["split"], key, r["step"])
      compared += 1
  assert compared > 50
  train_keys = {k.split("/", 1)[1] for k in scalars if k.startswith("train/")}
  assert {"loss", "accuracy", "learning_rate", "grad_norm", "examples_per_s", "tokens_per_s", "mfu", "step_time_s"} <= train_keys
  assert {"eval/loss", "eval/accuracy"} <= set(scalars) and sorted(scalars["eval/loss"]) == [6, 12]
  assert result.final_eval["loss"] == pytest.approx(scalars["eval/loss"][12], rel=1e-6)


def test_learning_rate_grad_norm_and_mfu_are_what_they_say(tmp_path):
  cfg = cnn("train.log_every=1")
  train(cfg, tmp_path / "w")
  records = read(tmp_path / "w" / "metrics.jsonl")
  run = next(r for r in records if r["split"] == "run")
  steps = [r for r in records if r["split"] == "train"]
  schedule = optimizer.schedule(cfg.optimizer, cfg.train.steps)
  for r in steps:   # the rate step k applied is the schedule at the optimizer's count before it, k - 1
    assert r["learning_rate"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6)
    assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    assert r["mfu"] == pytest.approx(run["flops_per_step"] / r["step_time_s"] / run["peak_flops"], rel=1e-6)
    assert r["tokens_per_s"] == pytest.approx(r["examples_per_s"])      # a classifier's tokens are its examples
  assert run["flops_per_step"] > 1e8 and run["peak_flops"] == 8 * 2e10    # conftest's seeded peak, 8 devices
  assert "seeded by tests/conftest.py" in run["peak"]


def test_grad_norm_is_the_norm_of_the_gradient(tmp_path):
  """One step from the fresh state: the logged norm equals optax's norm of jax.grad's gradient."""
  import jax
  import optax
  from flax import nnx
  from dcmodel.train import state as state_lib
  from dcmodel.train import tasks
  cfg = experiment("digits_cnn", "train.steps=1", "train.log_every=1", "checkpoint.enabled=false", "train.final_eval=false",
                   "mesh.data=1", "data.global_batch_size=16")
  seen = []
  train(cfg, tmp_path / "w", batch_hooks=(lambda step, b: seen.append(b),), devices=jax.devices()[:1])
  logged = [r for r in read(tmp_path / "w" / "metrics.jsonl") if r["split"] == "train"][0]["grad_norm"]
  placed = state_lib.place(cfg, jax.devices()[:1])
  model = placed.model(placed.init())
  spec = cfg.model.batch_spec()
  batch = {k: jax.numpy.asarray(seen[0][k]) for k in spec.fields}
  params = nnx.state(model, nnx.Param)
  gdef, _, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p: tasks.get(cfg.model.task)(nnx.merge(gdef, p, rest)(batch["x"]), batch)[0]
  assert logged == pytest.approx(float(jax.jit(lambda p: optax.tree.norm(jax.grad(loss)(p)))(params)), rel=1e-5)


def test_a_new_hook_needs_no_loop_edit_and_checkpoints_go_by_time(tmp_path):
  """A hook of its own with a time schedule, start and close; checkpoint.every_seconds saves
  between the step-based ones (each step here takes >= 0.15 s: a batch hook sleeps)."""
  class Spy(hooks_lib.Hook):
    def __init__(self):
      self.schedule = hooks_lib.Schedule(every_seconds=0.3)
      self.started = self.closed = False
      self.calls, self.saved = [], set()

    def start(self, run):
      self.started = run.step == 0

    def __call__(self, run):
      self.calls.append(run.step)

    def close(self, run):
      self.closed = True

  spy = Spy()
  saved = []

  class Saves(hooks_lib.Hook):
    schedule = hooks_lib.Schedule(every_steps=1)

    def __call__(self, run):
      if run.saved_step is not None and (not saved or saved[-1] != run.saved_step):
        saved.append(run.saved_step)

  train(cnn("checkpoint.every_steps=0", "checkpoint.every_seconds=0.5", "checkpoint.max_to_keep=10"), tmp_path / "w",
        batch_hooks=(lambda step, b: time.sleep(0.15),), hooks=(spy, Saves()))
  assert spy.started and spy.closed and len(spy.calls) >= 3
  assert all(b - a >= 1 for a, b in zip(spy.calls, spy.calls[1:]))
  assert len(saved) >= 3 and saved[-1] == 12, saved        # by time, then at the end
  assert sorted(int(p) for p in os.listdir(tmp_path / "w" / "checkpoints") if p.isdigit()) == saved


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_a_line(tmp_path):
  work = tmp_path / "w"
  train(cnn("train.steps=6"), work)
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "split": "train", "loss": 0.12')        # a crash mid-write
  train(cnn(), work)
  lines = (work / "metrics.jsonl").read_text().splitlines()
  assert '{"step": 7, "split": "train", "loss": 0.12' in lines     # kept as it was, alone on its line
  assert [r["step"] for r in read(work / "metrics.jsonl") if r["split"] == "train"] == [3, 6, 9, 12]


def test_a_resumed_run_supersedes_what_a_dead_run_logged_past_its_checkpoint(tmp_path):
  """A run dies after logging steps its checkpoint does not hold: the rerun redoes them, and both
  sinks show each step once (metrics.read drops the dead run's records, TensorBoard purges them)."""
  import shutil
  work = tmp_path / "w"
  train(cnn("train.log_every=1"), work)
  shutil.rmtree(work / "checkpoints" / "12")                      # as if killed before saving step 12
  train(cnn("train.log_every=1"), work)
  raw = [r["step"] for r in read(work / "metrics.jsonl", superseded=True) if r["split"] == "train"]
  assert raw == [*range(1, 13), *range(7, 13)]
  assert [r["step"] for r in read(work / "metrics.jsonl") if r["split"] == "train"] == list(range(1, 13))
  assert sorted(tensorboard_scalars(work)["train/loss"]) == list(range(1, 13))


def test_signal_before_the_first_step_stops_cleanly_with_nothing_to_save(tmp_path):
  cfg = cnn()
  before = signal.getsignal(signal.SIGINT)
  with preemption.Signals():
    os.kill(os.getpid(), signal.SIGINT)         # recorded, not raised: no KeyboardInterrupt here
    time.sleep(0.1)
    result = train(cfg, tmp_path / "w")
  assert result.stop_signal == signal.SIGINT and result.steps_run == 0 and result.saved_step is None
  assert cli.stopped_message(cfg, str(tmp_path / "w"), result).startswith(
      "dcmodel: SIGINT: stopped at step 0 of 12; no new step to save (newest checkpoint: none)")
  assert signal.getsignal(signal.SIGINT) is before       # the handlers are restored


def test_only_the_preemption_hook_asks_jaxs_sync_point(tmp_path, monkeypatch):
  """JAX's preemption sync manager takes the last number passed to it as the process's count;
  Orbax's manager passed its checkpoint steps (in save and from its finalize thread), which on a
  resumed run moved the agreed stop 11 steps late. Checkpoints must not call it at all."""
  from jax.experimental import multihost_utils
  calls = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: calls.append(step) or False)
  result = train(cnn(), tmp_path / "w")
  assert result.saved_step == 12 and calls == []


def test_a_hook_can_stop_the_run_and_it_still_checkpoints(tmp_path):
  class StopAt5(hooks_lib.Hook):
    schedule = hooks_lib.Schedule(every_steps=1)

    def __call__(self, run):
      if run.step == 5:
        run.stopping = "enough"

  result = train(cnn(), tmp_path / "w", hooks=(StopAt5(),))
  assert result.stopped == "enough" and result.saved_step == 5 and result.stop_signal is None
  assert [r["step"] for r in read(tmp_path / "w" / "metrics.jsonl") if r["split"] == "train"] == [3, 5]


def test_profile_trace_of_steps_and_its_top_ops(tmp_path, capsys):
  work = tmp_path / "w"
  assert cli.main(["train", CNN, "--workdir", str(work), "--set", "train.steps=5", "--set", "train.progress=false",
                   "--set", "train.final_eval=false", "--profile-steps", "2:4"]) == 0
  found = trace.find(work)
  assert found.parent == work / "profile" / "plugins" / "profile"
  assert list(found.glob("*.xplane.pb")) and (found / trace.HLO_FILE).exists()
  assert json.loads((found / trace.INFO_FILE).read_text())["steps"] == 2
  capsys.readouterr()
  assert cli.main(["bench", "--trace", str(work), "--top", "8", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert len(report["ops"]) == 8 and report["steps"] == 2 and report["devices"] == 8
  assert sum(r["share"] for r in report["ops"]) <= 1 + 1e-9 and report["ops"][0]["share"] >= report["ops"][-1]["share"]
  matmuls = [r for r in report["ops"] if r.get("flops")]
  assert matmuls and all(r["predicted_s"] > 0 and r["measured_s"] > 0 for r in matmuls)


def test_hlo_flops_of_a_dot_and_a_fusion():
  text = """HloModule m
%fused (p0: f32[16,64], p1: f32[64,32]) -> f32[16,32] {
  %p0 = f32[16,64]{1,0} parameter(0)
  %p1 = f32[64,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[16,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
ENTRY %main (a: f32[16,64], b: f32[64,32]) -> f32[16,32] {
  %a = f32[16,64]{1,0} parameter(0)
  %b = f32[64,32]{1,0} parameter(1)
  %fusion.1 = f32[16,32]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused, metadata={op_name="jit(f)/dot_general"}
  ROOT %add.1 = f32[16,32]{1,0} add(%fusion.1, %fusion.1)
}"""
  ops = trace.parse_hlo(text)
  assert trace.op_flops(ops["fusion.1"], ops) == 2 * 16 * 64 * 32
  assert trace.op_bytes(ops["fusion.1"], ops) == 4 * (16 * 64 + 64 * 32 + 16 * 32)
  assert trace.op_flops(ops["add.1"], ops) == 0 and ops["fusion.1"].source == "dot_general"


def test_the_peak_is_calibrated_once_and_cached(tmp_path, monkeypatch):
  import jax
  monkeypatch.setenv("DCMODEL_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(peak, "CALIBRATION_SIZES", (128,))
  monkeypatch.setattr(peak, "BANDWIDTH_MIB", 8)
  first = peak.for_devices(jax.devices()[:2])
  assert first.flops_per_device > 0 and first.bandwidth_per_device > 0 and "calibrated" in first.source
  assert peak.cache_file(jax.devices()[:2]).exists()
  monkeypatch.setattr(calibrate, "matmul_peak", lambda *a, **k: pytest.fail("calibrated again"))
  assert peak.for_devices(jax.devices()[:2]) == first


@pytest.mark.parametrize("kind, chip", [("TPU v4", "tpu-v4"), ("TPU v5 lite", "tpu-v5e"), ("TPU v5p", "tpu-v5p"),
                                        ("TPU v6 lite", "tpu-v6e"), ("NVIDIA H100 80GB HBM3", "h100"),
                                        ("NVIDIA A100-SXM4-40GB", "a100"), ("cpu", None)])
def test_catalog_chip_by_device_kind(kind, chip):
  found = hardware.for_device_kind(kind)
  assert (found.name if found else None) == chip


# ---------------------------------------------------------------------------- real processes, real signals

@pytest.mark.slow
def test_sigterm_and_sigint_at_random_moments_one_process(tmp_path):
  """A SIGTERM and a SIGINT, each at a random moment of its own launch (benchmarks/preemption.py
  runs 5 SIGTERM and 10 SIGINT): each exits 128 + signal with the one-line message and a
  checkpoint at the step in flight; the finished run is bitwise equal to an uninterrupted one
  and logged every step once."""
  out = driver.stops(tmp_path, "w", [signal.SIGTERM, signal.SIGINT], 1, random.Random(0))
  assert out["all_exits_conventional"] and out["all_messages_clean"] and out["all_checkpoints_saved"], out
  assert all(abs(o) <= 1 for o in out["off_by"]), out
  assert out["every_step_logged_once"] and out["bitwise_equal_to_uninterrupted"], out


@pytest.mark.slow
def test_sigterm_two_processes_during_checkpoint_writes(tmp_path):
  """Two launches of a 2-process run, each signalled right after a checkpoint step is logged (the
  second a run resumed at the first stop): both processes stop at the step in flight (+-1)."""
  out = driver.stops(tmp_path, "w", [signal.SIGTERM] * 2, 2, random.Random(2), tail=6, at_checkpoint=True)
  assert out["all_exits_conventional"] and out["all_messages_clean"] and out["all_checkpoints_saved"], out
  assert all(abs(o) <= 1 for o in out["off_by"]), out
  assert out["every_step_logged_once"] and out["bitwise_equal_to_uninterrupted"], out


@pytest.mark.slow
def test_concurrent_runs_on_one_workdir_and_a_stale_lock(tmp_path):
  out = driver.concurrent(tmp_path)
  assert out["overlapped"] and out["second_exit"] == 2 and out["names_holder"], out
  assert "is in use by another run" in out["second_message"] and socket.gethostname() in out["second_message"]
  assert out["first_exit"] == 0 and out["first_logged_every_step_once"] and out["first_bitwise_equal_to_solo"], out
  assert out["stale_lock_left"] and out["rerun_after_kill_9_exit"] == 0 and out["rerun_after_kill_9_bitwise_equal"], out


# A 256 MB block allocated, written and freed twice on a thread (as XLA:CPU's runtime threads do
# with a call's temporaries); prints the minor page faults of the second round, then whatever
# dcmodel's CLI prints (its usage error).
_REUSE = """
import ctypes, os, resource, sys, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def use():
  p = libc.malloc(1 << 28); ctypes.memset(p, 1, 1 << 28); libc.free(p)
print(os.getpid(), "hugetlb" in os.environ.get("GLIBC_TUNABLES", "") or (
    "mimalloc" in os.environ.get("LD_PRELOAD", "") and os.environ.get("MIMALLOC_PURGE_DELAY") == "-1"), flush=True)
for _ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t = threading.Thread(target=use); t.start(); t.join()
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
from dcmodel import cli
sys.exit(cli.main())
"""


def _huge_pages() -> str:
  """The kernel's transparent huge page mode (always, madvise, never; "" where there is none)."""
  try:
    return open("/sys/kernel/mm/transparent_hugepage/enabled").read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return ""


@pytest.mark.parametrize("switch", [
    pytest.param(None, marks=pytest.mark.skipif(sys.platform != "linux" or _huge_pages() == "always",
                                                reason="Linux, huge pages not for every mapping")),
    pytest.param("hugetlb", marks=pytest.mark.skipif(not hostenv._glibc() or _huge_pages() in ("", "never"),
                                                     reason="glibc >= 2.35 and transparent huge pages")),
    pytest.param("mimalloc", marks=pytest.mark.skipif(sys.platform != "linux", reason="Linux"))])
def test_the_cli_reexecs_once_with_the_allocator_asked_for(switch):
  """A 256 MB block freed and allocated again on a thread (as XLA:CPU's temporaries are, each
  call): glibc's defaults fault all of it in again; hugetlb in 2 MiB pages; mimalloc not at all,
  its pages kept from the first round. Asked for, the CLI re-executes its process once."""
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", hostenv.SWITCH)}
  env["PYTHONPATH"] = str(EXPERIMENTS.parent)
  if switch:
    env[hostenv.SWITCH] = switch
  proc = subprocess.run([sys.executable, "-c", _REUSE], env=env, capture_output=True, text=True, timeout=120)
  lines = proc.stdout.split("\n")
  assert proc.returncode == 2 and "the following arguments are required: command" in proc.stderr, proc.stderr
  pid = lines[0].split()[0]
  if not switch:  # glibc's default: the block comes back as fresh mmap'd pages, 65,536 faults of 4 KiB
    assert lines[0] == f"{pid} False" and len(lines) == 3 and int(lines[1].split()[1]) > 60_000, lines
  else:           # the same process (pid) re-executed once, then the block comes in 2 MiB pages or is reused
    assert lines[0] == f"{pid} False" and lines[2] == f"{pid} True" and len(lines) == 5, lines
    assert int(lines[1].split()[1]) > 60_000 and int(lines[3].split()[1]) < (1_000 if switch == "hugetlb" else 100), lines


@pytest.mark.skipif(sys.platform != "linux", reason="Linux")
def test_a_run_under_mimalloc_trains_and_records_it(tmp_path):
  """`dcmodel train` end to end with DCMODEL_HOST_MALLOC=mimalloc (XLA, Grain's threads, Orbax's
  checkpoint writes all on the preloaded allocator): it finishes and config.json says so."""
  env = {**{k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", hostenv.SWITCH)}, hostenv.SWITCH: "mimalloc"}
  proc = subprocess.run([sys.executable, "-m", "dcmodel.cli", "--host-devices", "2", "train", str(EXPERIMENTS / "digits_mlp.py"),
                         "--workdir", str(tmp_path / "w"), "--set", "train.steps=4", "--set", "train.progress=false"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  saved = json.loads((tmp_path / "w" / "config.json").read_text())
  assert saved["_run"]["host_malloc"] == "mimalloc"
  assert any(p.name.isdigit() for p in (tmp_path / "w" / "checkpoints").iterdir())


def test_malloc_settings_only_when_asked_and_beside_a_users_own():
  assert hostenv.with_host_malloc({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) == {"GLIBC_TUNABLES": "glibc.rtld.nns=2"}
  assert hostenv.with_host_malloc({hostenv.SWITCH: "system"}) == {hostenv.SWITCH: "system"}
  if hostenv._glibc():
    env = hostenv.with_host_malloc({"GLIBC_TUNABLES": "glibc.rtld.nns=2", hostenv.SWITCH: "hugetlb"})
    assert env["GLIBC_TUNABLES"] == ":".join(["glibc.rtld.nns=2", *hostenv.MALLOC_TUNABLES])
    assert hostenv.with_host_malloc(env) == env      # once: the re-executed process keeps it
  assert hostenv.with_host_malloc({hostenv.SWITCH: ""}) == {hostenv.SWITCH: ""}     # empty: the default
  if sys.platform == "linux":   # a dependency on Linux: installed, a real file
    assert os.path.isfile(hostenv.mimalloc_library())
    env = hostenv.with_host_malloc({"LD_PRELOAD": "/lib/own.so", "MIMALLOC_PURGE_DELAY": "5", hostenv.SWITCH: "mimalloc"})
    assert env["LD_PRELOAD"] == f"{hostenv.mimalloc_library()}:/lib/own.so" and hostenv.active(env) == "mimalloc"
    assert env["MIMALLOC_PURGE_DELAY"] == "5" and env["MIMALLOC_ALLOW_LARGE_OS_PAGES"] == "1"   # the user's kept
    assert hostenv.with_host_malloc(env) == env
  with pytest.raises(ValueError, match="DCMODEL_HOST_MALLOC='jemalloc' is not one of system, mimalloc, hugetlb"):
    hostenv.with_host_malloc({hostenv.SWITCH: "jemalloc"})


def test_mimalloc_without_its_library_is_an_error_on_linux_and_nothing_elsewhere(monkeypatch):
  monkeypatch.setattr(hostenv, "mimalloc_library", lambda: None)
  monkeypatch.setattr(hostenv.sys, "platform", "linux")
  with pytest.raises(ValueError, match="DCMODEL_HOST_MALLOC=mimalloc needs the cmeel-mimalloc package"):
    hostenv.with_host_malloc({hostenv.SWITCH: "mimalloc"})
  monkeypatch.setattr(hostenv.sys, "platform", "darwin")
  assert hostenv.with_host_malloc({hostenv.SWITCH: "mimalloc"}) == {hostenv.SWITCH: "mimalloc"}


def test_an_unknown_allocator_is_a_one_line_error():
  env = {**os.environ, hostenv.SWITCH: "tcmalloc", "PYTHONPATH": str(EXPERIMENTS.parent)}
  proc = subprocess.run([sys.executable, "-c", "import sys; from dcmodel import cli; sys.exit(cli.main())", "train"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr == "dcmodel: error: DCMODEL_HOST_MALLOC='tcmalloc' is not one of system, mimalloc, hugetlb\n"
