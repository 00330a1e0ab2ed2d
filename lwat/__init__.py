"""lwat: efficient layerwise adversarial training (Sankaranarayanan et al., AAAI 2018) for PyTorch."""

from lwat.perturb import Handle, attach, default_points, select_points

__all__ = ["Handle", "attach", "default_points", "select_points"]
__version__ = "0.1.0"
