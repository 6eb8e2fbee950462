"""The discrete-event simulator: event loop, instance models, KV network, cluster, results."""

from simulations import MODE
from simulations._loader import package_dir

if MODE == "compiled":  # the compiled modules are found before the .py files here
    __path__.insert(0, str(package_dir(__name__)))

__all__ = ["MODE"]
