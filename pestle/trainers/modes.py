"""The two fine-tuning recipes of Deng et al., npj Comput. Mater. 11:9 (2025), "Systematic
softening in universal machine learning interatomic potentials", as every trainer offers them
(``Params.mode``):

* ``full``: every parameter trainable, energy/force/stress loss weights 0.1/100/0.1, MSE,
  Adam at 1e-3 decayed to 1e-5 over the run (100 epochs unless ``epochs`` is given), the
  epoch with the lowest validation force error kept;
* ``linear_correction``: one scale ``s`` on the model's energy without its per-element
  reference energies (so forces and stress scale by ``s``), everything else frozen, fitted
  in closed form (``pestle.trainers.linear``) and baked into the model so the checkpoint is
  an ordinary model of its family.

``custom`` leaves every field as the user gave it. The paper's numbers live here only; each
family adds the fields its own library needs to follow the recipe (e.g. CHGNet's ``freeze``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel

Mode = Literal["custom", "linear_correction", "full"]

PAPER_LOSS_WEIGHTS: dict[str, float] = {
    "energy_weight": 0.1,
    "force_weight": 100.0,
    "stress_weight": 0.1,
}
PAPER_LEARNING_RATE = 1e-3
PAPER_FINAL_LEARNING_RATE = 1e-5
PAPER_EPOCHS = 100
# What ``full`` fixes in every family (the learning-rate decay is each library's own).
PAPER_FULL: dict[str, Any] = {
    **PAPER_LOSS_WEIGHTS,
    "learning_rate": PAPER_LEARNING_RATE,
    "epochs": PAPER_EPOCHS,
}


def apply_mode(
    params: BaseModel,
    *,
    full: Mapping[str, Any],
    linear: Mapping[str, Any],
    unused_by_linear: Sequence[str],
) -> None:
    """Fill in the fields a mode fixes (``full`` / ``linear``: field -> value). A value the
    user set that contradicts the mode is an error rather than silently overridden;
    ``epochs`` stays the user's in ``full``; fields in ``unused_by_linear`` set to anything
    but their default are refused in ``linear_correction``, which has no optimiser. Call
    from an ``after`` model validator."""
    mode = params.mode  # type: ignore[attr-defined]
    if mode == "custom":
        return
    fixed = dict(full if mode == "full" else linear)
    given = params.model_fields_set
    if mode == "full" and "epochs" in given:
        fixed.pop("epochs", None)
    if mode == "linear_correction":
        defaults = type(params).model_fields
        unused = [
            name
            for name in unused_by_linear
            if name in given and getattr(params, name) != defaults[name].default
        ]
        if unused:
            raise ValueError(
                f"mode linear_correction fits one scale in closed form; "
                f"{', '.join(unused)} do not apply to it"
            )
    for name, value in fixed.items():
        if name in given and getattr(params, name) != value:
            raise ValueError(
                f"mode {mode} fixes {name} = {value!r} (Deng et al. 2025); "
                f"got {getattr(params, name)!r}. Use mode custom to choose it."
            )
        setattr(params, name, value)
