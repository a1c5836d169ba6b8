"""deqlab: Deep Equilibrium Networks (DEQ, Skip DEQ, Skip Reg. DEQ, continuous DEQ) for PyTorch."""
__version__ = "0.1.0"
