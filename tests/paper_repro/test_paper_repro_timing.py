"""paper_repro/timing.py: every configuration is timed on the same batches and the table has its ratios."""

from __future__ import annotations

from paper_repro import timing


def test_round_robin_timing_table(mnist_dir, tmp_path):
    out = tmp_path / "timing.md"
    text = timing.main(
        [
            "--data-dir",
            str(mnist_dir),
            "--warm-steps",
            "2",
            "--rounds",
            "2",
            "--batch-size",
            "4",
            "--test-subset",
            "16",
            "--configs",
            "vanilla:discrete,skip:discrete,skip_reg:continuous",
            "--output",
            str(out),
        ]
    )
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| vanilla |") or line.startswith("| skip")]
    assert len(rows) == 3
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[2:6])  # step, forward, backward, prediction times were measured
        assert float(cells[7]) >= 1  # test NFE
    assert "| vanilla discrete / skip discrete |" in text


def test_the_grids_trained_networks_are_timed_as_saved(mnist_dir, tmp_path):
    from conftest import out_args

    from paper_repro import mnist
    from paper_repro.run import main

    main(
        mnist.SPEC,
        [
            "--arch",
            "dense",
            "--grid",
            "--seeds",
            "7",
            "--model-types",
            "vanilla",
            "--solvers",
            "continuous,discrete",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--train-subset",
            "16",
            "--test-subset",
            "16",
            "--data-dir",
            str(mnist_dir),
            "--save-model",
            *out_args(tmp_path),
        ],
    )
    models = tmp_path / "results" / "models"
    assert len(list(models.glob("*.pt"))) == 2
    text = timing.main(
        [
            "--data-dir",
            str(mnist_dir),
            "--models-dir",
            str(models),
            "--rounds",
            "2",
            "--batch-size",
            "4",
            "--test-subset",
            "16",
            "--also-ode",
            "tsit5",
            "--reference-solver",
        ]
    )
    assert "the networks trained by the grid" in text
    rows = [line for line in text.splitlines() if line.startswith("| vanilla |")]
    labels = [r.split("|")[2].strip() for r in rows]
    # each trained DEQ once as trained, once re-solved with the paper's MNIST column's solver (same weights)
    assert labels == [
        "continuous/tsit5",
        "reference L-Broyden (trained continuous/tsit5)",
        "discrete",
        "reference L-Broyden (trained discrete)",
    ]
    solvers = [cfg for cfg in timing.load_trained(models, [], 0, reference_solver=True) if "reference" in cfg.name]
    for cfg in solvers:
        solver = cfg.net.deq.solver
        assert solver.termination.batch_wide and solver.termination.mode == "rel_norm"
        assert "LimitedMemoryBroyden" in repr(solver)
    for line in rows:  # the paper's count is beside ours: more than ours by its start-up and final z*
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[8]) > float(cells[7]) >= 1
    assert "| vanilla continuous/tsit5 / vanilla discrete |" in text
    ratios = [line for line in text.splitlines() if " / " in line and line.startswith("| ")]
    assert len(ratios) == len(set(ratios))  # each pair once


def test_a_timing_runs_every_network_eager_unless_asked_whatever_it_was_trained_with(tmp_path):
    # a network trained with compile_solver=True and one without are timed alike: eager by default,
    # compiled for every configuration with --compile-solver
    import torch

    from deqlab.models import build_model

    models = tmp_path / "models"
    models.mkdir()
    for name, options in (("a", {"compile_solver": True}), ("b", {})):
        net = build_model("mnist", "dense", model_type="vanilla", solver="continuous", **options)
        torch.save(
            {"state_dict": net.state_dict(), "model_type": "vanilla", "solver": "continuous", "ode_solver": "tsit5",
             "model_options": {"ode_solver": "tsit5", **options}, "protocol": "paper"},
            models / f"{name}.pt",
        )  # fmt: skip
    assert [c.net.deq.solver.compile for c in timing.load_trained(models, [], 0)] == [False, False]
    compiled = timing.load_trained(models, ["vcab3"], 0, compile_solver=True)
    assert [c.net.deq.solver.compile for c in compiled] == [True] * 4
