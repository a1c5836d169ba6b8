"""Scripts that rebuild the experiments of arXiv 2201.12240 on deqlab (see docs/paper_repro.md).

Each script (``mnist.py``, ``svhn.py``, ``cifar10.py``, ``imagenet.py``) is an :class:`~paper_repro.common.ExperimentSpec`
run by :func:`paper_repro.common.main`; ``summarize.py`` turns their CSVs into tables and plots.
"""
