"""lwat: efficient layerwise adversarial training (Sankaranarayanan et al., AAAI 2018) for PyTorch."""

from lwat.perturb import Handle, attach, default_points, handle_of, select_points


def fusion_rule():
    """A `with` block inside which torch.compile's inductor fuses each point's cache write into the point's own
    backward loop (lwat/_inductor.py); outside it, inductor is untouched. Use it around the first training steps
    of a compiled attached model (the forward compiles at the first call, the backward at the first backward)."""
    from lwat._inductor import fusion_rule as rule  # private inductor APIs: imported only when asked for
    return rule()


__all__ = ["Handle", "attach", "default_points", "fusion_rule", "handle_of", "select_points"]
__version__ = "0.1.0"
