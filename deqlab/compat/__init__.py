"""Drop-in APIs of other DEQ libraries, on deqlab's core (``deqlab.compat.torchdeq``).

Not to be confused with ``deqlab._compat``, the home of deqlab's own *deprecated* names: this package
holds *other libraries'* names, kept on purpose so their users' scripts run by changing their imports.
"""

__all__ = ["torchdeq"]
