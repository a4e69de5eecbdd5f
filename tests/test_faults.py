# SPDX-License-Identifier: Apache-2.0
"""
A failing run loses nothing (issue 11 §2): validation errors as NonFiniteError, partial
results on every exception, interrupts that keep parameters and history in step, and
processes killed (SIGKILL) during checkpoint writes or interrupted (SIGINT).

The fit is a model without latent variables, ``x_i ~ Normal(loc, 1)`` with ``loc`` a
parameter, under plain SGD with Pyro's ``Trace_ELBO``: the loss and its gradient are
deterministic, so the parameter after ``k`` steps and the loss at every step have a closed
form, :math:`\\mathrm{loc}_k = \\bar x\\,(1 - (1 - n\\,\\mathrm{lr})^k)`, against which the
history and parameters a run keeps are checked.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_elbo_lab.runner import Checkpointing, Evaluation, NonFiniteError, SVIRunner
from pyro_elbo_lab.runner import checkpoint as checkpoint_module

LR = 0.01
DATA = [1.0, 3.0]


def model(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def guide(x):
    pass


def loc_after(k: int) -> float:
    """``loc`` after ``k`` SGD steps from 0, in closed form."""
    n, mean = len(DATA), sum(DATA) / len(DATA)
    return mean * (1.0 - (1.0 - n * LR) ** k)


def loss_at(k: int) -> float:
    """The loss (−log p(x | loc), nats) at step ``k``, evaluated before that step's update."""
    loc = loc_after(k)
    return sum(0.5 * (x - loc) ** 2 + 0.5 * math.log(2 * math.pi) for x in DATA)


@pytest.fixture
def data():
    return torch.tensor(DATA)


def runner(m=model, g=guide, **options):
    return SVIRunner(m, g, pyro.optim.SGD({"lr": LR}), Trace_ELBO(), progress_bar=False, **options)


def assert_consistent(result, steps: int):
    """``steps`` completed steps: the history has them, and ``loc`` is their closed-form value."""
    assert result.history["step"].tolist() == list(range(steps))
    assert result.history["loss"].tolist() == pytest.approx([loss_at(k) for k in range(steps)], rel=1e-12)
    assert float(result.params["loc"]) == pytest.approx(loc_after(steps), rel=1e-12, abs=1e-15)


# -- validation errors are non-finite steps ---------------------------------------------------


def zero_scale_model(bad_steps, where):
    """
    The model (``where="x"``) or the guide (``where="u"``) with a zero scale during the steps
    in ``bad_steps``; returns ``(model, guide, callback)``, the callback keeping the step count
    (so that any pass of the model during a step sees the same fault).
    """
    current = [0]

    def m(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = torch.tensor(0.0 if current[0] in bad_steps and where == "x" else 1.0)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, scale), obs=x)
        if where == "u":
            pyro.sample("u", dist.Normal(0.0, 1.0))

    def g(x):
        if where == "u":
            pyro.sample("u", dist.Normal(0.0, torch.tensor(0.0 if current[0] in bad_steps else 1.0)))

    def callback(step, row):
        current[0] = step + 1

    return m, g, callback


@pytest.mark.parametrize("validation", [True, False], ids=["validation-on", "validation-off"])
@pytest.mark.parametrize("where", ["x", "u"], ids=["model-site", "guide-site"])
def test_zero_scale_is_nonfinite_error_with_partial_result(data, validation, where):
    pyro.enable_validation(validation)
    m, g, callback = zero_scale_model({3}, where)
    with pytest.raises(NonFiniteError, match=rf"step 3\b(.|\n)*'{where}'") as info:
        runner(m, g, callbacks=[callback]).run(data, num_steps=10)
    err = info.value
    assert err.step == 3 and where in err.sites
    assert err.partial_result is err.result
    assert err.result.stop_reason == "nonfinite"
    if where == "x":  # the u site adds noise to the loss; the closed form is for the x-only model
        assert_consistent(err.result, 3)
    else:
        assert len(err.result.history) == 3


@pytest.mark.parametrize("validation", [True, False], ids=["validation-on", "validation-off"])
def test_skip_skips_zero_scale_steps(data, validation):
    pyro.enable_validation(validation)
    m, g, callback = zero_scale_model({2, 4}, "x")
    result = runner(m, g, on_nonfinite="skip", callbacks=[callback]).run(data, num_steps=6)
    assert result.history["skipped"].tolist() == [False, False, True, False, True, False]
    assert result.stop_reason == "num_steps"
    # 4 updates applied, each the closed-form SGD step; the skipped steps changed nothing
    assert float(result.params["loc"]) == pytest.approx(loc_after(4), rel=1e-12)
    finite = result.history[~result.history["skipped"]]["loss"].tolist()
    assert finite == pytest.approx([loss_at(k) for k in range(4)], rel=1e-12)


def test_every_step_skipped_is_reported(data):
    m, g, _ = zero_scale_model(set(range(100)), "x")
    with pytest.warns(UserWarning, match="every step of chain 0 .*skipped"):
        result = runner(m, g, on_nonfinite="skip").run(data, num_steps=5)
    assert result.stop_reason == "all_skipped"
    assert float(result.params["loc"]) == 0.0


def test_other_value_errors_are_not_relabelled(data):
    def bad_model(x):
        pyro.param("loc", torch.tensor(0.0))
        raise ValueError("a bug in the model")

    with pytest.raises(ValueError, match="a bug in the model") as info:
        runner(bad_model).run(data, num_steps=3)
    assert not isinstance(info.value, NonFiniteError)
    assert len(info.value.partial_result.history) == 0


# -- every exception keeps the partial result --------------------------------------------------


def test_raising_callback_keeps_partial_result(data):
    def callback(step, row):
        if step == 4:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed") as info:
        runner(callbacks=[callback]).run(data, num_steps=10)
    partial = info.value.partial_result
    assert partial.stop_reason == "error"
    assert_consistent(partial, 5)  # step 4 was applied and recorded before its callback ran


def test_failing_evaluation_keeps_partial_result(data):
    # the evaluation data has the wrong type: estimate_evidence fails inside the model
    with pytest.raises(Exception) as info:
        runner(evaluation=Evaluation(every=3, args=("not a tensor",), num_samples=10)).run(data, num_steps=10)
    assert_consistent(info.value.partial_result, 3)


def test_failed_checkpoint_write_keeps_partial_result(data, tmp_path, monkeypatch):
    write = checkpoint_module.CheckpointWriter.write
    calls = [0]

    def failing_write(self, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device")
        return write(self, *a, **k)

    monkeypatch.setattr(checkpoint_module.CheckpointWriter, "write", failing_write)
    path = str(tmp_path / "fit.ckpt")
    with pytest.raises(OSError) as info:
        runner(checkpoint=Checkpointing(path, every=2)).run(data, num_steps=10)
    assert_consistent(info.value.partial_result, 4)
    # the previous checkpoint (step 2) still resumes
    monkeypatch.setattr(checkpoint_module.CheckpointWriter, "write", write)
    pyro.clear_param_store()
    assert_consistent(runner().run(data, num_steps=6, resume_from=path), 6)


def test_sigint_during_a_step_finishes_the_step(data):
    calls = [0]

    def m(x):
        calls[0] += 1
        if calls[0] == 4:  # inside step 3, before its update and history row
            signal.raise_signal(signal.SIGINT)
        model(x)

    with pytest.warns(UserWarning, match="interrupted"):
        result = runner(m).run(data, num_steps=100)
    assert result.stop_reason == "interrupted"
    assert_consistent(result, 4)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_during_the_last_step_of_a_chain_stops_the_run(data):
    # chain 0 ends at step 5 by its callback while a Ctrl-C is held: chain 1 does not start
    calls = [0]

    def m(x):
        calls[0] += 1
        if calls[0] == 6:  # inside step 5 of chain 0
            signal.raise_signal(signal.SIGINT)
        model(x)

    with pytest.warns(UserWarning, match="interrupted .* 6 completed steps of chain 0 .*1 of 2 chains"):
        result = runner(m, num_chains=2, seed=0, callbacks=[lambda step, row: step == 5]).run(data, num_steps=100)
    assert result.stop_reasons == ["callback"] and calls[0] == 6
    assert_consistent(result, 6)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- processes killed during checkpoint writes, or interrupted ---------------------------------

DRIVER = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    mode, count, folder, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    sys.path.insert(0, os.path.dirname(folder))
    import torch, pyro, pyro.distributions as dist
    from pyro.infer import Trace_ELBO
    from pyro_elbo_lab.runner import Checkpointing, SVIRunner
    torch.set_default_dtype(torch.float64)
    rng = random.Random(seed)

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pass

    def child(i, ready):
        def callback(step, row):
            if step == 1:
                os.write(ready, b"1")
        pyro.clear_param_store()
        ckpt = Checkpointing(os.path.join(folder, f"{i}.ckpt"), every=1) if mode == "kill" else None
        runner = SVIRunner(model, guide, pyro.optim.SGD({"lr": %(lr)r}), Trace_ELBO(), progress_bar=False,
                           checkpoint=ckpt, callbacks=[callback])
        result = runner.run(torch.tensor(%(data)r), num_steps=10**6)
        with open(os.path.join(folder, f"{i}.json"), "w") as f:
            json.dump({"stop_reason": result.stop_reason, "loss": result.history["loss"].tolist(),
                       "step": result.history["step"].tolist(), "loc": float(result.params["loc"])}, f)

    # one short run first, so that the lazy imports (pandas, the checkpoint code) are done
    # once here and not in every child
    warm = os.path.join(folder, "warm-up.ckpt")
    SVIRunner(model, guide, pyro.optim.SGD({"lr": 0.1}), Trace_ELBO(), progress_bar=False,
              checkpoint=Checkpointing(warm, every=1)).run(torch.tensor([0.0]), num_steps=2)
    for i in range(count):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            try:
                child(i, ready_w)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)  # the child has written its first checkpoint
        os.close(ready_r)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL if mode == "kill" else signal.SIGINT)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"child": i, "status": status}), flush=True)
    """
) % {"lr": LR, "data": DATA}


def run_driver(tmp_path, mode: str, count: int) -> list[dict]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    folder = tmp_path / mode
    folder.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(script), mode, str(count), str(folder), "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()], folder


def test_sigkill_during_checkpoint_writes_then_resume(tmp_path, data):
    children, folder = run_driver(tmp_path, "kill", 20)
    assert len(children) == 20
    for child in children:
        assert os.WIFSIGNALED(child["status"]) and os.WTERMSIG(child["status"]) == signal.SIGKILL
        path = str(folder / f"{child['child']}.ckpt")
        # resume to 3 steps past the checkpoint: the whole history and the parameter are intact
        steps = checkpoint_module.read_checkpoint(path).meta["step"]
        assert steps >= 1
        pyro.clear_param_store()
        result = runner().run(data, num_steps=steps + 3, resume_from=path)
        assert_consistent(result, steps + 3)


def test_sigint_in_a_child_returns_the_partial_result(tmp_path):
    children, folder = run_driver(tmp_path, "interrupt", 5)
    assert len(children) == 5
    for child in children:
        assert os.WIFEXITED(child["status"])
        with open(folder / f"{child['child']}.json") as f:
            outcome = json.load(f)
        steps = len(outcome["step"])
        assert outcome["stop_reason"] == "interrupted" and steps >= 2
        assert outcome["step"] == list(range(steps))
        assert outcome["loss"] == pytest.approx([loss_at(k) for k in range(steps)], rel=1e-12)
        assert outcome["loc"] == pytest.approx(loc_after(steps), rel=1e-12)


# -- the demo's outputs are checked before fitting ---------------------------------------------


def test_demo_output_not_writable_fails_before_fitting(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from pyro_elbo_lab import cli
    from pyro_elbo_lab.demos import eight_schools

    monkeypatch.setattr(eight_schools, "run", lambda *a, **k: pytest.fail("the demo started fitting"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:  # a directory cannot be made under a file
        cli.main(["demo", "--quick", "--output", str(blocker / "out")])
    assert info.value.code == 2
    assert "--output" in capsys.readouterr().err


def test_demo_refuses_a_symlinked_report(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from pyro_elbo_lab import cli
    from pyro_elbo_lab.demos import eight_schools
    from pyro_elbo_lab.demos.common import Report

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / "report.md")
    monkeypatch.setattr(eight_schools, "run", lambda *a, **k: pytest.fail("the demo started fitting"))
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--quick", "--output", str(out)])
    assert info.value.code == 2 and "symbolic link" in capsys.readouterr().err
    # the report writer itself refuses the link too, and leaves the target alone
    with pytest.raises(ValueError, match="symbolic link"):
        Report(verbose=False).write(str(out / "report.md"))
    assert target.read_text() == "keep me"
    os.unlink(out / "report.md")
    Report(verbose=False).write(str(out / "report.md"))
    assert os.path.isfile(out / "report.md") and not os.path.islink(out / "report.md")
    assert os.listdir(out) == ["report.md"]  # no temporary file left behind
