"""What a compiled model's quantization method (its recipe's ``method``) brings to QAT: the
training hooks it attaches by itself (ODM's regularizer and cooperative backward) and the graph
saved as the result (ODM's trained offsets folded into their convs)."""

from __future__ import annotations

from typing import Any

from torch import fx


def method_hooks(gm: fx.GraphModule) -> tuple[list, Any]:
    """``(regularizers, backward)`` the compiled model's method brings to training: ODM's
    regularizer and cooperative backward (fxquant/train/odm.py); none for other methods."""
    recipe = getattr(gm, "fxquant_recipe", None)
    if recipe is not None and recipe.method == "odm":
        from fxquant.train.odm import odm_hooks

        return odm_hooks(gm, recipe.options)
    return [], None


def deployable(gm: fx.GraphModule) -> fx.GraphModule:
    """What gets saved as a result: ``gm``, with trained ODM offsets folded into their convs
    (``fold-offsets``) so the saved graph has no extra op; the training graph is untouched."""
    from fxquant.quant.offsets import ChannelOffset

    if not any(isinstance(m, ChannelOffset) for m in gm.modules()):
        return gm
    import fxquant

    return fxquant.transformed_copy(gm, "fold-offsets")
