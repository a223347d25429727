"""LoRA through ``peft``: the policy is the base model with adapters, the reference is the same
module with the adapters switched off, so a LoRA run holds one copy of the base weights.

LoRA (Hu et al., arXiv:2106.09685, Eq. 3): h = W0 x + (alpha / r) B A x with W0 frozen, A [r, in]
random, B [out, r] zero at init, so the policy starts equal to the reference.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tilt.config import ConfigError


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def apply_lora(model: torch.nn.Module, lora, *, where: str) -> torch.nn.Module:
    """Wrap ``model`` in a ``peft.PeftModel`` with fresh LoRA adapters (only they are trainable).

    ``lora`` is a ``tilt.config.LoraCfg``; ``where`` names the model in error messages.
    Raises ConfigError when peft is missing, a target module does not exist in the model, or the
    model (or a targeted module) is of a kind peft cannot wrap.
    """
    if not peft_available():
        raise ConfigError("model.lora.enabled=true needs the peft package: pip install 'tilt-rl[lora]'")
    from peft import LoraConfig, get_peft_model

    pcfg = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                      target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, pcfg)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError is a ValueError too
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"model.lora.target_modules={lora.target_modules!r}: peft cannot wrap {where!r} "
            f"(model type {getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)!r}): "
            f"{exc} Linear modules of this model: {', '.join(names) or 'none'}") from None


def is_lora(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class AdapterDisabledRef(torch.nn.Module):
    """The reference policy of a LoRA run: the policy's own base weights, adapters disabled.

    ``forward`` runs the wrapped ``PeftModel`` under ``disable_adapter()`` and in eval mode (no
    dropout), so it computes exactly the base model's function. The peft model is held, not
    registered: this module has no parameters of its own, so nothing trains or saves through it.
    """

    def __init__(self, peft_model: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)

    @property
    def config(self):
        return self.peft_model.config

    @property
    def device(self) -> torch.device:
        return self.peft_model.device

    def forward(self, *args: Any, **kwargs: Any):
        model = self.peft_model
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                return model(*args, **kwargs)
        finally:
            model.train(was_training)


class AdapterWeights(torch.nn.Module):
    """What a LoRA run checkpoints as its model: the trainable (adapter) parameters only.

    They are registered here as the same Parameter objects the policy trains ("." in names
    becomes "/"), so ``state_dict`` reads them and ``load_state_dict`` writes them in place.
    """

    def __init__(self, peft_model: torch.nn.Module):
        super().__init__()
        self.adapter = torch.nn.ParameterDict(
            {n.replace(".", "/"): p for n, p in peft_model.named_parameters() if p.requires_grad})


def checkpoint_view(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state a checkpoint holds: the adapters of a LoRA policy, else the model."""
    return AdapterWeights(model) if is_lora(model) else model


def save_merged(model: torch.nn.Module, tokenizer, out: Path) -> None:
    """Write base + (alpha / r) B A merged into plain weights, loadable with AutoModelForCausalLM.
    The policy itself is untouched (a copy is merged)."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
