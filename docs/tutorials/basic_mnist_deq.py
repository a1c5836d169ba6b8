"""Tutorial: a convolutional DEQ classifier on MNIST.

Generated from docs/tutorials/basic_mnist_deq.md by docs/tutorials/make_scripts.py: edit the page, not this file.
The page explains every step; this file is its code blocks, in order.

Quick mode (default, the embedded digits, what the test suite runs):
    .venv/bin/python docs/tutorials/basic_mnist_deq.py
Full mode (real MNIST; /path/to/data/MNIST/raw holds the four IDX files):
    DEQLAB_TUTORIAL_FULL=1 DEQLAB_MNIST_DIR=/path/to/data .venv/bin/python docs/tutorials/basic_mnist_deq.py
"""

# -------- Setup -----------------------------------------------------------------------------------

import os
import pytorch_lightning as pl
import torch
from torch import nn

from deqlab.data import DigitsDataModule, MNISTDataModule
from deqlab.nn import DeepEquilibriumNetwork, ImplicitBackward, SkipDeepEquilibriumNetwork
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver
from deqlab.zoo import DEQClassifier

FULL = os.environ.get("DEQLAB_TUTORIAL_FULL") == "1"
torch.set_num_threads(1 if not FULL else torch.get_num_threads())
pl.seed_everything(0, verbose=False)

CHANNELS = 64 if FULL else 16
if FULL:   # the Julia tutorial: 2500 MNIST training images per epoch (it takes the first 2500), batch 32
    data = MNISTDataModule(data_dir=os.environ["DEQLAB_MNIST_DIR"], batch_size=32, val_fraction=0.2)
    PRETRAIN_EPOCHS, EPOCHS, LIMIT, LR = 2, 3, 2500 // 32, 5e-4
else:      # every training digit each epoch (41 batches); 164 steps instead of 390, so a 10x larger step
    data = DigitsDataModule(batch_size=32)
    PRETRAIN_EPOCHS, EPOCHS, LIMIT, LR = 1, 3, 41, 5e-3

# -------- The model -------------------------------------------------------------------------------

def conv3x3(c_in, c_out):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    nn.init.trunc_normal_(conv.weight, std=0.01)
    return conv


class DEQMap(nn.Module):
    """Chain(Parallel(+, conv(z) |> tanh, conv(x) |> tanh), conv |> tanh)."""
    def __init__(self, c):
        super().__init__()
        self.on_z, self.on_x, self.out = conv3x3(c, c), conv3x3(c, c), conv3x3(c, c)

    def forward(self, z, x):
        return torch.tanh(self.out(torch.tanh(self.on_z(z)) + torch.tanh(self.on_x(x))))


class MNISTDEQ(nn.Module):
    def __init__(self, solver, model_type="skip", c=CHANNELS):
        super().__init__()
        self.model_type = model_type
        # down: Conv(3x3, 1=>c, gelu) -> GroupNorm -> Conv(4x4, c=>c, stride 2, pad 1): 28 -> 26 -> 13 (8 -> 6 -> 3)
        self.down = nn.Sequential(nn.Conv2d(1, c, 3), nn.GELU(), nn.GroupNorm(c, c), nn.Conv2d(c, c, 4, stride=2, padding=1))
        backward = ImplicitBackward("gmres", tol=1e-3, max_steps=10)       # linsolve_kwargs = (; maxiters = 10)
        if model_type == "vanilla":                                          # init = missing
            self.deq = DeepEquilibriumNetwork(DEQMap(c), solver, backward=backward)
        elif model_type == "skip":                                           # init = Conv(3x3, c=>c, gelu)
            shortcut = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU())
            self.deq = SkipDeepEquilibriumNetwork(DEQMap(c), solver, shortcut, skip_loss="l2", backward=backward)
        else:                                                                # init = nothing: Skip Reg.
            self.deq = SkipDeepEquilibriumNetwork(DEQMap(c), solver, None, skip_loss="l2", backward=backward)
        self.classifier = nn.Sequential(nn.GroupNorm(c, c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))

    def forward(self, x):
        z_star, solution = self.deq(self.down(x))
        return self.classifier(z_star), solution

    def explicit_forward(self, x):
        if self.model_type == "vanilla":       # no explicit prediction without a Skip guess
            return None
        return self.classifier(self.deq.explicit(self.down(x)))

# -------- The solvers, and what `max_steps` counts ------------------------------------------------

tol = dict(abstol_termination=1e-2, reltol_termination=1e-2)
discrete_solver = DiscreteDEQSolver("newton_krylov", **tol, max_steps=10)   # NewtonRaphson(linsolve=KrylovJL_GMRES())
continuous_solver = ContinuousDEQSolver("tsit5", ode_abstol=1e-4, ode_reltol=1e-2, **tol, max_steps=30)  # <= 182 NFE

pl.seed_everything(0, verbose=False)
data.setup()
x, _ = next(iter(data.train_dataloader()))
untrained = MNISTDEQ(continuous_solver, "vanilla")
for ode_abstol in (1e-2, 1e-4):
    untrained.deq.solver = ContinuousDEQSolver("tsit5", ode_abstol=ode_abstol, ode_reltol=1e-2, **tol, max_steps=30)
    with torch.no_grad():
        _, sol = untrained.deq(untrained.down(x))
    steps = sol.solver_result.steps
    print(f"ode_abstol {ode_abstol:g}: {sol.status.value} after {steps} steps, NFE {sol.nfe} = 2 + 6*{steps}, "
          f"relative residual <= {float(sol.solver_result.rel_residual.max()):.3f}")
    assert sol.nfe == 2 + 6 * steps
    assert sol.converged.all() if ode_abstol == 1e-4 else steps == 30 and not sol.converged.all()

# -------- Training --------------------------------------------------------------------------------

def train(solver, model_type):
    pl.seed_everything(0, verbose=False)
    net = MNISTDEQ(solver, model_type)
    model = DEQClassifier(net, lr=LR, optimizer="adam", scheduler="none", skip_loss_weight=0.01,
                          pretrain_steps=PRETRAIN_EPOCHS * LIMIT, pretrain_depth=5, log_figures=False)
    trainer = pl.Trainer(max_epochs=PRETRAIN_EPOCHS + EPOCHS, limit_train_batches=LIMIT, limit_val_batches=4,
                         accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    test = trainer.test(model, data, verbose=False)[0]
    print(f"{model_type:8s} {type(solver).__name__:20s} test acc {test['test/accuracy']:.3f}  "
          f"NFE {test['solver/test_nfe']:.1f}  converged {test['solver/test_samples_converged']:.3f}  "
          f"explicit acc {test.get('test/explicit_accuracy', float('nan')):.3f}")
    return test


discrete = train(discrete_solver, "skip_reg")       # NewtonRaphson(linsolve=KrylovJL_GMRES()), :regdeq
continuous = train(continuous_solver, "vanilla")    # VCAB3(), :deq (here Tsit5)

MIN_ACCURACY = 0.85
for result in (discrete, continuous):
    assert result["test/accuracy"] > MIN_ACCURACY and result["solver/test_samples_converged"] == 1.0, result
assert continuous["solver/test_nfe"] < 2 + 6 * 30   # it converged before its step limit
