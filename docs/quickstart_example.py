"""deqlab quickstart: a DEQ after a dense layer, solved as a continuous DEQ, differentiated implicitly.

A port of DeepEquilibriumNetworks.jl's README example. Run it with ``python docs/quickstart_example.py``
(add ``--device cuda`` to run on a GPU).
"""

import argparse

import torch
from torch import nn

from deqlab.nn import DeepEquilibriumNetwork
from deqlab.solvers import ContinuousDEQSolver


class Parallel(nn.Module):
    """f(z, x) = Wz z + Wx x: the DEQ map sums a branch on the state and a branch on the injection."""

    def __init__(self):
        super().__init__()
        self.on_z = nn.Linear(2, 2, bias=False)
        self.on_x = nn.Linear(2, 2, bias=False)

    def forward(self, z, x):
        return self.on_z(z) + self.on_x(x)


def main(device: str = "cpu") -> dict:
    torch.manual_seed(0)
    stem = nn.Linear(2, 2)
    deq = DeepEquilibriumNetwork(
        Parallel(),
        ContinuousDEQSolver(ode_abstol=0.1, ode_reltol=0.1, abstol_termination=0.1, reltol_termination=0.1),
    )
    model = nn.ModuleDict({"stem": stem, "deq": deq}).to(device)

    x = torch.rand(1, 2, device=device)
    z_star, solution = model["deq"](model["stem"](x))
    loss = (z_star**2).sum()  # squared error against zero
    loss.backward()

    grads = {name: p.grad for name, p in model.named_parameters()}
    print(f"z* = {z_star.detach().cpu().numpy()}, nfe = {solution.nfe}, residual = {solution.abs_residual.tolist()}")
    for name, g in grads.items():
        print(f"d loss / d {name} = {g.cpu().numpy().tolist()}")
    return {"z_star": z_star, "solution": solution, "grads": grads}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    main(parser.parse_args().device)
