"""Tutorial: a reduced-dimension DEQ.

Generated from docs/tutorials/reduced_dim_deq.md by docs/tutorials/make_scripts.py: edit the page, not this file.
The page explains every step; this file is its code blocks, in order.

Quick mode (default, the embedded digits, what the test suite runs):
    .venv/bin/python docs/tutorials/reduced_dim_deq.py
Full mode (real MNIST; /path/to/data/MNIST/raw holds the four IDX files):
    DEQLAB_TUTORIAL_FULL=1 DEQLAB_MNIST_DIR=/path/to/data .venv/bin/python docs/tutorials/reduced_dim_deq.py
"""

import os
import pytorch_lightning as pl
import torch
from torch import nn

from deqlab.data import DigitsDataModule, MNISTDataModule
from deqlab.nn import DeepEquilibriumNetwork, ImplicitBackward, SkipDeepEquilibriumNetwork, ZeroGuess
from deqlab.solvers import DiscreteDEQSolver
from deqlab.zoo import DEQClassifier

FULL = os.environ.get("DEQLAB_TUTORIAL_FULL") == "1"
torch.set_num_threads(1 if not FULL else torch.get_num_threads())
if FULL:
    data, PIXELS = MNISTDataModule(data_dir=os.environ["DEQLAB_MNIST_DIR"], batch_size=32, flatten=True), 784
    PRETRAIN_EPOCHS, EPOCHS, LIMIT, LR = 2, 3, 2500 // 32, 5e-4
else:      # every training digit each epoch (41 batches); 164 steps instead of 390, so a 4x larger step
    data, PIXELS = DigitsDataModule(batch_size=32, flatten=True), 64
    PRETRAIN_EPOCHS, EPOCHS, LIMIT, LR = 1, 3, 41, 2e-3
STATE, INJECTION = 128, 512

# -------- The model -------------------------------------------------------------------------------

def dense(n_in, n_out):
    layer = nn.Linear(n_in, n_out, bias=False)
    nn.init.trunc_normal_(layer.weight, std=0.01)
    return layer


class ReducedMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.on_z, self.on_x = dense(STATE, 64), dense(INJECTION, 64)
        self.mid, self.out = dense(64, 64), dense(64, STATE)

    def forward(self, z, x):                       # z: (B, 128), x: (B, 512)
        h = torch.tanh(self.on_z(z)) + torch.tanh(self.on_x(x))
        return self.out(torch.tanh(self.mid(h)))


class ReducedDEQ(nn.Module):
    def __init__(self, model_type):
        super().__init__()
        self.model_type = model_type
        self.down = nn.Sequential(nn.Linear(PIXELS, INJECTION), nn.GELU())
        solver = DiscreteDEQSolver("newton_krylov", abstol_termination=1e-2, reltol_termination=1e-2, max_steps=10)
        backward = ImplicitBackward("gmres", tol=1e-3, max_steps=10)
        if model_type == "skip":                   # init = Dense(512 => 128, tanh): predicts the 128-d state
            self.deq = SkipDeepEquilibriumNetwork(ReducedMap(), solver, nn.Sequential(dense(INJECTION, STATE), nn.Tanh()),
                                                  skip_loss="l2", backward=backward)
        else:                                      # init = zeros(128, B): the state's shape, not x's
            self.deq = DeepEquilibriumNetwork(ReducedMap(), solver, init=ZeroGuess(shape=(STATE,)), backward=backward)
        self.classifier = nn.Sequential(nn.Linear(STATE, 128), nn.GELU(), nn.Linear(128, 10))

    def forward(self, x):
        z_star, solution = self.deq(self.down(x))
        return self.classifier(z_star), solution

    def explicit_forward(self, x):
        return self.classifier(self.deq.explicit(self.down(x))) if self.model_type == "skip" else None

net = ReducedDEQ("vanilla")
z_star, sol = net.deq(net.down(torch.randn(4, PIXELS)))
assert z_star.shape == (4, STATE) and sol.u0.shape == (4, STATE)
print("state", tuple(z_star.shape), "NFE", sol.nfe, sol.status)

skip_reg = SkipDeepEquilibriumNetwork(ReducedMap(), DiscreteDEQSolver("lbroyden", max_steps=10), None, z_shape=(STATE,))
z_star, sol = skip_reg(torch.randn(4, INJECTION))
assert sol.u0.shape == (4, STATE)

# -------- Training --------------------------------------------------------------------------------

def train(model_type):
    pl.seed_everything(0, verbose=False)
    model = DEQClassifier(ReducedDEQ(model_type), lr=LR, optimizer="adam", scheduler="none", skip_loss_weight=0.01,
                          pretrain_steps=PRETRAIN_EPOCHS * LIMIT, pretrain_depth=5, log_figures=False)
    trainer = pl.Trainer(max_epochs=PRETRAIN_EPOCHS + EPOCHS, limit_train_batches=LIMIT, limit_val_batches=4,
                         accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    test = trainer.test(model, data, verbose=False)[0]
    print(f"{model_type:8s} test acc {test['test/accuracy']:.3f}  NFE {test['solver/test_nfe']:.1f}  "
          f"converged {test['solver/test_samples_converged']:.3f}  "
          f"explicit acc {test.get('test/explicit_accuracy', float('nan')):.3f}")
    return test


results = {t: train(t) for t in ("vanilla", "skip")}
MIN_ACCURACY = 0.85                # both modes; measured: 88.8-91.1 %
for result in results.values():
    assert result["test/accuracy"] > MIN_ACCURACY and result["solver/test_samples_converged"] == 1.0, result
