"""solver/{stage}_spectral_radius_mean/max: logged when a layer fills solution.spectral_radius, absent otherwise."""

import torch

from deqlab.lightning._stats import summarize
from deqlab.lightning.solver_stats import log_solver_summary
from deqlab.nn import DEQ, DenseDEQBlock, ZeroGuess
from deqlab.solvers import DiscreteDEQSolver


class _Recorder:
    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kw):
        self.logged[name] = (float(value), kw.get("reduce_fx"))


def test_spectral_radius_logged_mean_and_max():
    torch.manual_seed(0)
    solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, max_steps=30)
    deq = DEQ(
        DenseDEQBlock(4, injection_dim=3),
        solver,
        init=ZeroGuess(shape=(4,)),
        spectral_radius=True,
        spectral_radius_iters=4,
    ).eval()
    _, sol = deq(torch.randn(5, 3))
    module = _Recorder()
    log_solver_summary(module, summarize([sol, sol], like=torch.zeros(())), "val")
    mean, _ = module.logged["solver/val_spectral_radius_mean"]
    top, reduce = module.logged["solver/val_spectral_radius_max"]
    assert abs(mean - float(sol.spectral_radius.mean())) < 1e-6 and reduce == "max"
    assert abs(top - float(sol.spectral_radius.max())) < 1e-6
    _, plain = deq.train()(torch.randn(5, 3))  # "eval" mode: nothing while training
    module = _Recorder()
    log_solver_summary(module, summarize([plain], like=torch.zeros(())), "train")
    assert not any("spectral_radius" in k for k in module.logged)
