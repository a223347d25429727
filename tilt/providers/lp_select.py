"""Lp-Reg's candidate tokens (catalogue A6), decided once over the kept batch."""
from __future__ import annotations

from torch import Tensor

from tilt.providers import Provider, Run, StepData, provides


@provides("lp_select")
class LowProbabilitySelection(Provider):
    """Lp-Reg's candidate tokens (catalogue A6, arXiv:2510.03222), [N, T] bool, decided once over the
    kept batch: the lowest-probability ``neg_frac`` / ``pos_frac`` of the negative / positive-
    advantage tokens by the sampling policy's log-probs, among the tokens the loss sees, so
    splitting into micro-batches cannot change the choice. Settings shared with the loss."""

    def __init__(self, run: Run, names: frozenset[str], *, neg_frac: float = 0.01, pos_frac: float = 0.0):
        super().__init__(run, names)
        self.neg_frac, self.pos_frac = neg_frac, pos_frac

    def selected(self, data: StepData) -> dict[str, Tensor]:
        from tilt.losses.regularizers import lp_reg_selection

        b = data.batch
        mask = b.completion_mask if b.loss_mask is None else b.loss_mask  # [N, T]
        return {"lp_select": lp_reg_selection(b.old_logp, b.advantages, mask.float(), neg_frac=self.neg_frac,
                                              pos_frac=self.pos_frac)}
