"""Tutorial: a multiscale convolutional DEQ (MDEQ) on MNIST.

Generated from docs/tutorials/mdeq_mnist.md by docs/tutorials/make_scripts.py: edit the page, not this file.
The page explains every step; this file is its code blocks, in order.

Quick mode (default, the embedded digits, what the test suite runs):
    .venv/bin/python docs/tutorials/mdeq_mnist.py
Full mode (real MNIST; /path/to/data/MNIST/raw holds the four IDX files):
    DEQLAB_TUTORIAL_FULL=1 DEQLAB_MNIST_DIR=/path/to/data .venv/bin/python docs/tutorials/mdeq_mnist.py
"""

import os
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from deqlab.data import DigitsDataModule, MNISTDataModule
from deqlab.nn import Downsample, ImplicitBackward, MultiScaleSkipDeepEquilibriumNetwork, ResidualBlock, Upsample
from deqlab.solvers import DiscreteDEQSolver
from deqlab.zoo import DEQClassifier

FULL = os.environ.get("DEQLAB_TUTORIAL_FULL") == "1"
torch.set_num_threads(1 if not FULL else torch.get_num_threads())
if FULL:
    data, SIDE, C = MNISTDataModule(data_dir=os.environ["DEQLAB_MNIST_DIR"], batch_size=64), 28, 16
    PRETRAIN_STEPS, EPOCHS, LIMIT = 200, 5, None
else:      # every training digit each epoch (41 batches of 32); the first epoch pretrains
    data, SIDE, C = DigitsDataModule(batch_size=32), 8, 8
    PRETRAIN_STEPS, EPOCHS, LIMIT = 41, 3, None
SCALES = [(C, SIDE, SIDE), (C, SIDE // 2, SIDE // 2)]

# -------- The model -------------------------------------------------------------------------------

class MDEQ(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, C, 3, padding=1, bias=False), nn.GroupNorm(4, C), nn.ReLU())
        main = [ResidualBlock(C, expansion=2, num_groups=4, dropout=0.1), ResidualBlock(C, expansion=2, num_groups=4)]
        mapping = [[None, Downsample(C, C, factor=2)], [Upsample(C, C, factor=2), None]]
        # every path from the state back into itself ends in a GroupNorm: start their scale γ at 0.25 (see below)
        for norm in (main[0].gn3, main[1].gn3, main[1].gn2, mapping[0][1].net[-1], mapping[1][0].norm):
            nn.init.constant_(norm.weight, 0.25)
        shortcut = [nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.GELU()),
                    nn.Sequential(nn.Conv2d(C, C, 3, stride=2, padding=1), nn.GELU())]
        solver = DiscreteDEQSolver("lbroyden", abstol_termination=5e-2, reltol_termination=5e-2, max_steps=18)  # the paper: 5e-2, 18
        self.deq = MultiScaleSkipDeepEquilibriumNetwork(main, mapping, None, solver, SCALES, shortcut_layers=shortcut,
                                                        backward=ImplicitBackward("gmres", tol=1e-3, max_steps=15))
        self.head = nn.Sequential(nn.Linear(2 * C * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def classify(self, zs):
        return self.head(torch.cat([F.adaptive_avg_pool2d(z, 4).flatten(1) for z in zs], dim=1))

    def forward(self, x):
        zs, solution = self.deq(self.stem(x))
        return self.classify(zs), solution

    def explicit_forward(self, x):
        return self.classify(self.deq.explicit(self.stem(x)))


pl.seed_everything(0, verbose=False)
net = MDEQ()
zs, sol = net.deq(net.stem(torch.randn(2, 1, SIDE, SIDE)))
print([tuple(z.shape) for z in zs], "NFE", sol.nfe, sol.status.value)
assert [tuple(z.shape[1:]) for z in zs] == SCALES and sol.converged.all()

# -------- Training --------------------------------------------------------------------------------

pl.seed_everything(0, verbose=False)
model = DEQClassifier(MDEQ(), lr=2e-3, skip_loss_weight=0.01, pretrain_steps=PRETRAIN_STEPS, pretrain_depth=5,
                      log_figures=False)
trainer = pl.Trainer(max_epochs=EPOCHS, limit_train_batches=LIMIT, limit_val_batches=4, accelerator="auto",
                     devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
trainer.fit(model, data)
test = trainer.test(model, data, verbose=False)[0]
print({k: round(v, 3) for k, v in test.items() if k in ("test/accuracy", "test/explicit_accuracy", "solver/test_nfe",
                                                         "solver/test_samples_converged")})
assert test["test/accuracy"] > 0.93 and test["solver/test_samples_converged"] == 1.0, test
assert test["solver/test_nfe"] < 12, test
