"""lwat: efficient layerwise adversarial training (Sankaranarayanan et al., AAAI 2018) for PyTorch."""

import sys

if "torch" not in sys.modules and "tqdm" not in sys.modules:
    # torch.hub imports tqdm at import time where it is installed, for a download's progress bar; the core needs
    # torch alone, so torch is imported with tqdm hidden, and hub's bar imports tqdm when a download first draws one.
    sys.modules["tqdm"] = None  # an import of it fails: hub falls back, and the bar below takes its place
    try:
        import torch.hub
    finally:
        del sys.modules["tqdm"]

    def _hub_bar(*args, **kwargs):
        try:
            from tqdm import tqdm
        except ImportError:
            return torch.hub._Faketqdm(*args, **kwargs)
        return tqdm(*args, **kwargs)

    torch.hub.tqdm = _hub_bar

from lwat.perturb import Handle, attach, default_points, handle_of, select_points  # noqa: E402


def fusion_rule():
    """A `with` block inside which torch.compile's inductor fuses each point's cache write into the point's own
    backward loop (lwat/_inductor.py); outside it, inductor is untouched. Use it around the first training steps
    of a compiled attached model (the forward compiles at the first call, the backward at the first backward)."""
    from lwat._inductor import fusion_rule as rule  # private inductor APIs: imported only when asked for
    return rule()


__all__ = ["Handle", "attach", "default_points", "fusion_rule", "handle_of", "select_points"]
__version__ = "0.1.0"
