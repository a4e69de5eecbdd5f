# SPDX-License-Identifier: Apache-2.0
"""Checkpoints: exact resumes, refusals that name the mismatch, files that cannot run code,
symbolic links, atomic and incremental writes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from _models import adam, normal_guide, normal_mean_model, svi_runner
from pyro.infer.autoguide import AutoNormal

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO
from pyro_elbo_lab.runner import Checkpointing
from pyro_elbo_lab.schedules import LinearWarmup

N = 20


@pytest.fixture
def data():
    return torch.linspace(-1.0, 3.0, N)


model = normal_mean_model()
guide = normal_guide()


def write_checkpoint(path, data, num_steps=10, every=5, **options):
    """A run of `num_steps` that leaves its checkpoint at `path`."""
    svi_runner(
        model,
        guide,
        seed=0,
        checkpoint=Checkpointing(path, every=every),
        **options,
    ).run(data, num_steps=num_steps)
    pyro.clear_param_store()


def history_rows(path):
    with open(str(path) + ".history.jsonl") as f:
        return [json.loads(line) for line in f]


# -- exact resumes ---------------------------------------------------------------------------


def _resume_setup(kind):
    if kind == "adam":
        return model, guide, adam(), BetaELBO(beta=LinearWarmup(10))
    # autoguide (lazy prototype set-up), vectorised particles (plate guess), lr schedule
    optim = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "gamma": 0.99})
    return model, AutoNormal(model), optim, BetaELBO(num_particles=3, vectorize_particles=True)


@pytest.mark.parametrize("kind", ["adam", "autoguide-scheduler"])
def test_resume_equals_uninterrupted(data, tmp_path, kind):
    # the copy keeps the file name (a renamed checkpoint is another test's subject)
    path, at_14 = str(tmp_path / "ckpt.pt"), str(tmp_path / "at-14" / "ckpt.pt")
    os.mkdir(tmp_path / "at-14")

    def keep_14(step, row):
        if step == 14:  # the checkpoint of step 14 is written: keep a copy of it
            shutil.copy(path, at_14)
            shutil.copy(path + ".history.jsonl", at_14 + ".history.jsonl")

    m, g, optim, loss = _resume_setup(kind)
    full = svi_runner(
        m, g, optim=optim, loss=loss, seed=11, callbacks=[keep_14], checkpoint=Checkpointing(path, every=7)
    ).run(data, num_steps=20)
    # a fresh process continues from step 14; one resumed from the finished run's last
    # checkpoint (step 20) gets the finished run
    for resume_from in (at_14, path):
        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        m, g, optim, loss = _resume_setup(kind)
        resumed = svi_runner(m, g, optim=optim, loss=loss, seed=11).run(data, num_steps=20, resume_from=resume_from)
        assert resumed.history["step"].tolist() == list(range(20))
        # same parameters, optimiser and scheduler state, loss state and RNG state: the resumed
        # steps do the same floating-point operations, so the histories are bit-equal
        for column in ("loss", "elbo", "kl", "beta"):
            assert resumed.history[column].tolist() == full.history[column].tolist()
        for name, value in full.params.items():
            assert torch.equal(resumed.params[name], value)
        assert loss.step == 20


def test_resume_after_interrupt_with_chains(data, tmp_path):
    # Ctrl-C in chain 1 after its checkpoint at step 5; the resumed run keeps chain 0 and
    # finishes chain 1 exactly as the uninterrupted run does
    path = tmp_path / "ckpt.pt"

    def make(callbacks=()):
        return svi_runner(
            model,
            AutoNormal(model),
            num_chains=2,
            seed=3,
            checkpoint=Checkpointing(path, every=5),
            callbacks=callbacks,
        )

    full = make().run(data, num_steps=10)
    pyro.clear_param_store()
    calls = []

    def interrupt(step, row):
        calls.append(step)
        if len(calls) == 17:  # chain 1, step 6
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="interrupted"):
        partial = make([interrupt]).run(data, num_steps=10)
    assert partial.num_steps == [10, 7] and partial.stop_reasons == ["num_steps", "interrupted"]
    pyro.clear_param_store()
    resumed = make().run(data, num_steps=10, resume_from=path)
    assert resumed.num_steps == [10, 10]
    assert resumed.history["loss"].tolist() == full.history["loss"].tolist()
    for c in range(2):
        for name, value in full.chain_states[c]["params"].items():
            assert torch.equal(resumed.chain_states[c]["params"][name], value)
    # chain 0's terms came back from JSON: the values of its last row
    assert resumed.terms[0].elbo == full.chain_history(0)["elbo"].iloc[-1]


def test_resume_with_a_list_of_batches_equals_uninterrupted(data, tmp_path):
    path = tmp_path / "ckpt.pt"
    batches = [data[:5], data[5:12], data[12:]]
    seen = []

    def m(x):
        seen.append(x.shape[0])
        model(x)

    full = svi_runner(m, guide, seed=2, checkpoint=Checkpointing(path, every=4)).run(num_steps=6, batches=batches)
    assert seen == [5, 7, 8, 5, 7, 8]
    pyro.clear_param_store()
    resumed = svi_runner(m, guide, seed=2).run(num_steps=6, batches=batches, resume_from=path)
    assert resumed.history["loss"].tolist() == full.history["loss"].tolist()
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value)


def test_a_resumed_run_appends_to_the_same_checkpoint(data, tmp_path):
    # 20 steps in two runs of 10, both checkpointing to the same file, give the rows and
    # parameters of one run of 20; the history file holds each row once
    full_path, path = tmp_path / "full.pt", tmp_path / "ckpt.pt"
    full = svi_runner(model, guide, seed=4, checkpoint=Checkpointing(full_path, every=5)).run(data, num_steps=20)
    pyro.clear_param_store()
    svi_runner(model, guide, seed=4, checkpoint=Checkpointing(path, every=5)).run(data, num_steps=10)
    pyro.clear_param_store()
    second = svi_runner(model, guide, seed=4, checkpoint=Checkpointing(path, every=5)).run(
        data, num_steps=20, resume_from=path
    )
    assert second.history["loss"].tolist() == full.history["loss"].tolist()
    rows = history_rows(path)
    assert [r["step"] for r in rows] == list(range(20))
    assert [r["loss"] for r in rows] == full.history["loss"].tolist()


def test_continuing_a_finished_checkpoint_leaves_the_state_of_the_longer_run(data, tmp_path):
    # a checkpoint of a run that finished at step 10, continued to 20: afterwards the
    # optimiser (Adam's own step count), the loss's step and the RNG are those at step 20
    # of an uninterrupted run (they were rolled back to the checkpoint's step 10)
    runner = svi_runner(model, guide, seed=0)
    runner.run(data, num_steps=20)
    full_rng = torch.get_rng_state()
    full_steps = {n: float(s["state"][0]["step"]) for n, s in runner.optim.get_state().items()}
    pyro.clear_param_store()
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, data, num_steps=10)
    runner = svi_runner(model, guide, seed=0)
    runner.run(data, num_steps=20, resume_from=path)
    assert runner.loss.step == 20
    assert {n: float(s["state"][0]["step"]) for n, s in runner.optim.get_state().items()} == full_steps
    assert full_steps == {"loc": 20.0, "scale": 20.0}
    assert torch.equal(torch.get_rng_state(), full_rng)


def test_rows_of_a_write_that_never_committed_are_ignored_and_dropped(data, tmp_path):
    # a crash between appending the rows and replacing the checkpoint leaves extra bytes
    # after the committed ones: the resume reads only the committed rows, and the next
    # checkpoint writes over the extra bytes
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, data, num_steps=10)
    with open(str(path) + ".history.jsonl", "a") as f:
        f.write('{"step": 999, "loss": 1.0}\n{"step": 1000, "lo')
    result = svi_runner(model, guide, seed=0, checkpoint=Checkpointing(path, every=5)).run(
        data, num_steps=15, resume_from=path
    )
    assert result.history["step"].tolist() == list(range(15))
    assert [r["step"] for r in history_rows(path)] == list(range(15))


# -- refusals --------------------------------------------------------------------------------


def other_names_guide(x):
    m = pyro.param("mean", torch.tensor(0.0))
    pyro.sample("z", dist.Normal(m, 1.0))


def other_shape_guide(x):
    loc = pyro.param("loc", torch.zeros(2))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc.sum(), scale))


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"guide": other_names_guide},
            r"parameters not in the checkpoint: \['mean'\].*checkpoint parameters this "
            r"model and guide do not have: \['loc', 'scale'\]",
        ),
        ({"guide": other_shape_guide}, r"other shapes: 'loc' \(\) then, \(2,\) now"),
        ({"optim": lambda: pyro.optim.SGD({"lr": 0.01})}, r"optimiser Adam, this runner has SGD"),
        ({"loss": BetaMeanFieldELBO}, r"loss pyro_elbo_lab.*BetaELBO, this runner has .*BetaMeanFieldELBO"),
        ({"num_chains": 2}, r"num_chains=1, this runner num_chains=2"),
        ({"num_steps": 9}, r"at step 10 \(chain 0\), beyond num_steps=9"),
    ],
    ids=["names", "shapes", "optimiser", "loss", "num_chains", "num_steps"],
)
def test_resume_refuses_a_mismatch(data, tmp_path, change, match):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, data, num_steps=10)
    runner = svi_runner(
        model,
        change.get("guide", guide),
        optim=change.get("optim", adam)(),
        loss=change.get("loss", BetaELBO)(),
        num_chains=change.get("num_chains", 1),
    )
    with pytest.raises(ValueError, match=rf"resume_from='{path}'(.|\n)*{match}"):
        runner.run(data, num_steps=change.get("num_steps", 20), resume_from=path)


def test_resume_warns_when_the_data_shapes_differ(data, tmp_path):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, data, num_steps=10)
    runner = svi_runner(model, guide)
    with pytest.warns(UserWarning, match=r"resume_from=.*differ in shape or dtype") as caught:
        runner.run(data[:7], num_steps=12, resume_from=path)
    assert caught[0].filename == __file__  # the warning points at the caller's line


class Evil:
    """Unpickling this runs ``open(marker, "w")``: a file that must never be created."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_files(tmp_path, data):
    good = tmp_path / "good.pt"
    write_checkpoint(good, data, num_steps=10)
    raw = good.read_bytes()
    marker = tmp_path / "MARKER"
    files = {
        "empty": (b"", "the file is empty"),
        "truncated": (raw[: len(raw) // 2], "cannot be read as one"),
        "random bytes": (os.urandom(4096), "cannot be read as one"),
        "plain pickle": (pickle.dumps(Evil(str(marker))), "cannot be read as one"),
    }
    out = {}
    for name, (content, match) in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        path.write_bytes(content)
        out[name] = (path, match)
    foreign = tmp_path / "foreign.pt"
    torch.save({"foo": torch.ones(2), "num_chains": 1}, foreign)
    out["foreign torch file"] = (foreign, "no format tag")
    evil_zip = tmp_path / "evil_zip.pt"
    torch.save({"format": "pyro_elbo_lab.checkpoint", "meta": Evil(str(marker)), "tensors": {}}, evil_zip)
    out["torch file that runs code, right tag"] = (evil_zip, "cannot be read as one")
    no_history = tmp_path / "no_history.pt"
    no_history.write_bytes(raw)
    out["history file missing"] = (no_history, "history file .* is missing")
    return out, marker


def test_bad_files_are_refused_and_run_nothing(data, tmp_path):
    files, marker = _bad_files(tmp_path, data)
    runner = svi_runner(model, guide)
    for path, match in files.values():
        with pytest.raises(ValueError, match=rf"resume_from='{path}' is not a usable checkpoint(.|\n)*{match}"):
            runner.run(data, num_steps=20, resume_from=path)
    with pytest.raises(ValueError, match="no such checkpoint file"):
        runner.run(data, num_steps=3, resume_from=tmp_path / "missing.pt")
    # the crafted pickles would have created the marker file had they been unpickled
    assert not marker.exists()
    Evil(str(marker)).__reduce__()[0](str(marker), "w").close()  # the payload itself works
    assert marker.exists()


def test_a_short_history_file_is_refused(data, tmp_path):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, data, num_steps=10)
    history = str(path) + ".history.jsonl"
    with open(history, "rb+") as f:
        f.truncate(os.path.getsize(history) - 10)
    with pytest.raises(ValueError, match=r"resume_from=.*history file .* is shorter than"):
        svi_runner(model, guide).run(data, num_steps=20, resume_from=path)


# -- paths, links, atomic and incremental writes ------------------------------------------------------


def test_checkpoint_path_checked_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"Checkpointing.path=.*the directory .* does not exist"):
        Checkpointing(tmp_path / "nope" / "ckpt.pt", every=5)
    with pytest.raises(ValueError, match=r"Checkpointing.path=.* is a directory"):
        Checkpointing(tmp_path, every=5)
    with pytest.raises(ValueError, match=r"Checkpointing.every must be an integer >= 1"):
        Checkpointing(tmp_path / "ckpt.pt", every=0)
    target = tmp_path / "target"
    target.write_text("keep me")
    (tmp_path / "link.pt").symlink_to(target)
    with pytest.raises(ValueError, match=r"Checkpointing.path=.* is a symbolic link"):
        Checkpointing(tmp_path / "link.pt", every=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, where no file can be created")
def test_unwritable_checkpoint_directory_refused_at_construction():
    with pytest.raises(ValueError, match=r"Checkpointing.path='/proc/ckpt.pt' is not writable"):
        Checkpointing("/proc/ckpt.pt", every=5)


@pytest.mark.parametrize("where", ["output", "temporary", "history"])
def test_a_planted_symlink_is_never_followed(data, tmp_path, where):
    path = tmp_path / "ckpt.pt"
    checkpoint = Checkpointing(path, every=2)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = {"output": path, "temporary": tmp_path / "ckpt.pt.tmp", "history": tmp_path / "ckpt.pt.history.jsonl"}
    # the path is checked at construction; the link is planted afterwards, before the first write
    runner = svi_runner(model, guide, checkpoint=checkpoint)
    link[where].symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        runner.run(data, num_steps=4)
    assert target.read_text() == "keep me"
    assert os.path.islink(link[where])


def test_a_failed_write_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    # the write of the checkpoint at step 10 fails (as on a full disk): the run raises an
    # OSError that says the previous checkpoint is kept, no temporary file is left, and the
    # checkpoint of step 5 still resumes
    path = tmp_path / "ckpt.pt"
    import pyro_elbo_lab.runner.checkpoint as checkpoint_module

    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    runner = svi_runner(model, guide, checkpoint=Checkpointing(path, every=5))
    with pytest.raises(OSError, match="No space left on device.*previous checkpoint.*kept"):
        runner.run(data, num_steps=20)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.history.jsonl"]
    pyro.clear_param_store()
    resumed = svi_runner(model, guide).run(data, num_steps=7, resume_from=path)
    assert resumed.history["step"].tolist() == list(range(7))


def test_history_is_written_by_appending(data, tmp_path):
    # each checkpoint appends only its new rows: the bytes written by the checkpoint at step
    # 10 are the start of the file after the one at step 30, unchanged
    path = tmp_path / "ckpt.pt"
    history = str(path) + ".history.jsonl"
    snapshots = {}

    def snapshot(step, row):
        if step in (10, 20):  # callbacks run before the checkpoint of their step
            with open(history, "rb") as f:
                snapshots[step] = f.read()

    result = svi_runner(
        model,
        guide,
        callbacks=[snapshot],
        checkpoint=Checkpointing(path, every=10),
    ).run(data, num_steps=30)
    with open(history, "rb") as f:
        final = f.read()
    assert snapshots[10].count(b"\n") == 10 and snapshots[20].count(b"\n") == 20
    assert final.startswith(snapshots[20]) and snapshots[20].startswith(snapshots[10])
    rows = [json.loads(line) for line in final.splitlines()]
    # JSON keeps every float exactly
    assert [r["loss"] for r in rows] == result.history["loss"].tolist()
    assert [r["kl"] for r in rows] == result.history["kl"].tolist()


def test_resume_keeps_the_convergence_rule_state(data, tmp_path):
    # the rule's window of parameter iterates and its count of stationary checks travel in the
    # checkpoint: a run resumed mid-window stops at the same step with the same statistics
    from pyro_elbo_lab.runner import Convergence

    # a loose threshold so that it stops early: this test is about the state, not the threshold
    convergence = Convergence(window=40, num_chains=2, rhat=4.0, params=True, average=15)
    path = str(tmp_path / "fit.ckpt")
    pyro.set_rng_seed(0)
    full = svi_runner(model, guide, seed=5, convergence=convergence).run(data, num_steps=3000)
    assert full.stop_reason == "converged", full.convergence
    stop = len(full.history)
    pyro.clear_param_store()
    svi_runner(
        model,
        guide,
        seed=5,
        convergence=convergence,
        checkpoint=Checkpointing(path, every=stop - 7),
    ).run(data, num_steps=stop - 7)
    pyro.clear_param_store()
    resumed = svi_runner(model, guide, seed=5, convergence=convergence).run(data, num_steps=3000, resume_from=path)
    assert resumed.stop_reason == "converged" and len(resumed.history) == stop
    assert resumed.history["loss"].tolist() == full.history["loss"].tolist()
    assert resumed.convergence[0]["param_rhat"] == full.convergence[0]["param_rhat"]
    # the checkpoint falls inside the averaging phase (15 iterates): the running mean resumed
    assert full.convergence[0]["averaging_since"] < stop - 7
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value)


def test_resume_from_a_checkpoint_on_a_check_step_stops_where_the_run_did(data, tmp_path):
    # checkpoints every 50 steps, the rule checks every 50 (window 200 / 4 chains): the
    # checkpoint written on a check step holds the rule's state after that check, and the
    # run's last checkpoint records the chain as done
    from pyro_elbo_lab.runner import Convergence

    def fit(path, num_steps=3000, resume=None, callbacks=()):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        return svi_runner(
            model,
            guide,
            loss=BetaMeanFieldELBO(),
            seed=0,
            convergence=Convergence(),
            checkpoint=Checkpointing(path, every=50),
            callbacks=callbacks,
        ).run(data, num_steps=num_steps, resume_from=resume)

    full = fit(str(tmp_path / "a.ckpt"))
    stop = len(full.history)
    assert full.stop_reason == "converged" and stop % 50 == 0 and stop >= 250

    def crash(step, row):
        if step == stop - 50:  # the step after the checkpoint at stop - 50 (a check step)
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        fit(str(tmp_path / "b.ckpt"), callbacks=[crash])
    for path in ("b.ckpt", "a.ckpt"):  # the crashed run's checkpoint; the finished run's last one
        resumed = fit(str(tmp_path / path), resume=str(tmp_path / path))
        assert resumed.stop_reason == "converged" and len(resumed.history) == stop
        assert resumed.history["loss"].tolist() == full.history["loss"].tolist()
        assert resumed.convergence[0]["step"] == full.convergence[0]["step"]
        for name, value in full.params.items():
            assert torch.equal(resumed.params[name], value)


def test_resume_with_the_same_runner_in_the_same_process(data, tmp_path):
    # after an exception the same runner resumes from its checkpoint at step 20: the optimiser
    # state is the checkpoint's, not the live one of step 25
    full = svi_runner(model, guide, seed=0).run(data, num_steps=40)
    pyro.clear_param_store()
    armed = [True]

    def crash(step, row):
        if armed[0] and step == 25:
            raise RuntimeError("boom")

    path = str(tmp_path / "fit.ckpt")
    runner = svi_runner(
        model,
        guide,
        seed=0,
        checkpoint=Checkpointing(path, every=10),
        callbacks=[crash],
    )
    with pytest.raises(RuntimeError, match="boom"):
        runner.run(data, num_steps=40)
    armed[0] = False
    resumed = runner.run(data, num_steps=40, resume_from=path)
    assert resumed.history["loss"].tolist() == full.history["loss"].tolist()
    for name, value in full.params.items():
        assert torch.equal(resumed.params[name], value)


def test_a_renamed_checkpoint_resumes(data, tmp_path):
    # a checkpoint moved with its history file (renamed alike) resumes from the new name
    old, new = str(tmp_path / "old.ckpt"), str(tmp_path / "new.ckpt")
    full = svi_runner(model, guide, seed=0, checkpoint=Checkpointing(old, every=7)).run(data, num_steps=10)
    os.rename(old, new)
    os.rename(old + ".history.jsonl", new + ".history.jsonl")
    pyro.clear_param_store()
    resumed = svi_runner(model, guide, seed=0).run(data, num_steps=20, resume_from=new)
    assert resumed.history["loss"].tolist()[:10] == full.history["loss"].tolist()
    assert len(resumed.history) == 20
    os.remove(new + ".history.jsonl")
    with pytest.raises(ValueError, match="new.ckpt.history.jsonl.* is missing"):
        svi_runner(model, guide, seed=0).run(data, num_steps=20, resume_from=new)
