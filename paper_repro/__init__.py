"""Scripts that rebuild the experiments of arXiv 2201.12240 on deqlab (see docs/paper_repro.md).

Each script (``mnist.py``, ``svhn.py``, ``cifar10.py``, ``imagenet.py``) is an
:class:`~paper_repro.cli.ExperimentSpec` run by :func:`paper_repro.run.main`; ``summarize.py`` turns the
results into tables and plots, ``timing.py`` times trained networks round-robin. The shared machinery, one
job per module:

* :mod:`paper_repro.cli`: ``ExperimentSpec``, the arguments and typed flags, their checks;
* :mod:`paper_repro.plan`: devices (``DevicePlan``), each run's resolved settings (``RunConfig``), the
  grid (``Grid``, ``paper_grid``), steps, the printed plan;
* :mod:`paper_repro.results`: the CSV columns, writing rows (shared tables, per-cell files) and reading
  them back merged (no torch, no Lightning);
* :mod:`paper_repro.data`: ``PaperData``, the ``LightningDataModule`` with fixed subsets;
* :mod:`paper_repro.recording`: ``RunRecorder``, the ``pl.Callback`` that times steps and writes epoch rows;
* :mod:`paper_repro.run`: ``main`` and ``run_one``.

Importing the package imports nothing; ``cli`` and ``plan`` import torch (``deqlab.models``) and only
``data``, ``recording`` and a starting run import Lightning.
"""
